"""A backend that is not open yet: its callers wait until the daemon hands over the opened one.

Opening a backend may wait on the network (the sts backend resolves the host's own
credentials, which botocore's chain may fetch from a container or instance metadata
endpoint), so the daemon opens it after the listeners (invariant 8). What is built before
them (the rotator, the admin API) holds this stand-in.
"""

from __future__ import annotations

import asyncio

from imdsd.backends.base import Backend
from imdsd.model import InstanceProfile, Session


class Deferred:
    """Issues through the backend given to open(); until then every caller waits."""

    def __init__(self) -> None:
        self._opened: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()

    def open(self, backend: Backend) -> None:
        self._opened.set_result(backend)

    async def issue(self, profile: InstanceProfile, *, session_name: str) -> Session:
        backend = await self._opened  # at once once open
        return await backend.issue(profile, session_name=session_name)
