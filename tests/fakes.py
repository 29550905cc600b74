"""Test doubles for the faults real parts cannot produce on cue, and a movable clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from aiohttp import web

from imdsd.backends import Opener, opener
from imdsd.backends.base import Backend
from imdsd.clock import Clock
from imdsd.config.backend import BackendConfig
from imdsd.errors import BackendError
from imdsd.model import InstanceProfile, Session

START = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self, start: datetime = START) -> None:
        self._now = start

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> None:
        self._now += delta

    def set(self, when: datetime) -> None:
        self._now = when


@dataclass
class FlakyBackend:
    """Wraps the real local issuer; fails, or holds calls, on cue.

    The embedded issuer cannot fail by itself, so this is the one stand-in the suite needs
    to show what the engine does when an issuer is down, slow or refusing.
    """

    inner: Backend
    failing: BackendError | None = None
    gate: asyncio.Event | None = None
    calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    names: list[str] = field(default_factory=list)
    issued: list[tuple[str, str]] = field(default_factory=list)  # (session name, role), each call

    async def issue(self, profile: InstanceProfile, *, session_name: str) -> Session:
        self.calls += 1
        self.names.append(session_name)
        self.issued.append((session_name, profile.role.arn))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.failing is not None:
                raise self.failing
            return await self.inner.issue(profile, session_name=session_name)
        finally:
            self.in_flight -= 1


class StalledUpstream:
    """A real HTTP server that accepts every request and never answers it (an STS endpoint
    hung behind a load balancer): each call costs the caller its whole timeout."""

    def __init__(self) -> None:
        self.url = ""
        self.calls = 0
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._hang)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/"

    async def _hang(self, request: web.Request) -> web.Response:
        self.calls += 1
        await self._released.wait()
        return web.Response(status=503)

    async def close(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()


def sts_backend(endpoint: str, *, timeout: str = "10s") -> str:
    """The [backend] tables of an sts daemon whose upstream is `endpoint`."""
    return (
        f'[backend]\nkind = "sts"\n[backend.sts]\nregion = "us-east-1"\n'
        f'endpoint_url = "{endpoint}"\ntimeout = "{timeout}"\n'
    )


def wrapping(wrap: Callable[[Backend], Backend]) -> Opener:
    """The daemon's own opener for the configured kind, its backend handed to `wrap` (a test's
    fault on cue), passed to running() as the opener parameter production also has."""

    def open_backend(config: BackendConfig, clock: Clock) -> AbstractAsyncContextManager[Backend]:
        @asynccontextmanager
        async def opened() -> AsyncIterator[Backend]:
            async with opener(config.kind)(config, clock) as backend:
                yield wrap(backend)

        return opened()

    return open_backend
