"""Fixtures: a fake clock, and the real daemon (in this process) on a loopback port."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import pytest
import structlog

from imdsd.backends.base import Backend
from imdsd.daemon import Daemon, running
from tests.fakes import FakeClock, FlakyBackend, StalledUpstream, wrapping
from tests.helpers import isolate, make_config


@pytest.fixture(autouse=True)
def fresh_logging() -> Iterator[None]:
    """log.configure() is process-global (it writes to the stream it was given, which pytest
    closes after the test): every test starts and ends with structlog's defaults."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers, root.level = handlers, level


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def flaky() -> list[FlakyBackend]:
    """Filled with the daemon's FlakyBackend wrapper once the daemon fixture starts."""
    return []


@pytest.fixture
async def daemon(clock: FakeClock, flaky: list[FlakyBackend]) -> AsyncIterator[Daemon]:
    """The real daemon on 127.0.0.1:<ephemeral>, its issuer wrapped so tests can make it fail."""

    def wrap(backend: Backend) -> Backend:
        flaky.append(FlakyBackend(backend))
        return flaky[0]

    async with running(make_config(), clock, open_backend=wrapping(wrap)) as d:
        yield d


@pytest.fixture
def url(daemon: Daemon) -> str:
    return daemon.urls[0]


@pytest.fixture
async def stalled() -> AsyncIterator[StalledUpstream]:
    """An upstream STS that accepts and never answers."""
    upstream = StalledUpstream()
    await upstream.start()
    yield upstream
    await upstream.close()


@pytest.fixture
def host_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sts backend's host credentials from the environment (made up: the upstreams these
    tests use never check them), and no AWS file or metadata probe of this machine."""
    isolate(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
