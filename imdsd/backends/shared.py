"""session_scope = "profile": one upstream session per instance profile, shared by its instances.

A decorator around any Backend (caching is never a flag inside a backend). Fewer upstream
calls, at a price the README states: the upstream's audit trail names the profile, not the VM,
and revoking one VM's session revokes it for every VM of the profile.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import timedelta

from imdsd.backends.base import Backend
from imdsd.clock import Clock
from imdsd.model import InstanceProfile, Session

SESSION_NAME_PREFIX = "imdsd-"


class ProfileScoped:
    """Hands every instance of a profile the same session while it is young.

    A session counts as young for `reuse_for` after its issue (the rotation jitter plus a
    margin): the instances' refreshes, spread by that jitter, then all land on one new session
    instead of each asking the upstream.
    """

    def __init__(self, inner: Backend, clock: Clock, reuse_for: timedelta) -> None:
        self._inner = inner
        self._clock = clock
        self._reuse_for = reuse_for
        # Keyed by the whole profile value (name, role, external id ...): a profile whose role
        # changed by reload never gets the old role's session under the new role's name.
        self._current: dict[InstanceProfile, Session] = {}
        self._locks: defaultdict[InstanceProfile, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def issue(self, profile: InstanceProfile, *, session_name: str) -> Session:
        async with self._locks[profile]:
            current = self._current.get(profile)
            if current is not None and self._clock.now() - current.issued_at <= self._reuse_for:
                return current
            for stale in [p for p in self._current if p.name == profile.name and p != profile]:
                del self._current[stale]  # that profile's old role: never again
                self._locks.pop(stale, None)
            name = (SESSION_NAME_PREFIX + profile.name)[:64]
            session = await self._inner.issue(profile, session_name=name)
            if session.expiration > self._clock.now():  # a dead answer is never handed on
                self._current[profile] = session
            return session
