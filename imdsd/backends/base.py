"""The Backend protocol: one method. A leaf: implementations satisfy it structurally."""

from __future__ import annotations

from typing import Protocol

from imdsd.model import InstanceProfile, Session


class Backend(Protocol):
    """Mints one session for one instance profile. Holds no cache; the scheduler owns freshness.

    Raises imdsd.errors.BackendError (with an EC2/STS-style code) when it cannot.
    """

    async def issue(self, profile: InstanceProfile, *, session_name: str) -> Session: ...
