"""A kept-alive connection's deadlines as they move (invariant 7): one timer per connection
follows them, so a request costs no timer of its own, and each deadline still holds on time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from imdsd.daemon import Daemon, running
from tests.fakes import FakeClock
from tests.helpers import VM_D, make_config

SLOW = '[budgets]\nhead_timeout = "1s"\nidle_timeout = "2s"\n'
D = "127.0.0.5"
GET = b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
async def slow_daemon(clock: FakeClock) -> AsyncIterator[Daemon]:
    async with running(make_config(SLOW), clock) as daemon:
        yield daemon


def limit_counts(daemon: Daemon) -> dict[str, float]:
    return {
        s.labels["event"]: s.value
        for m in daemon.api.metrics.registry.collect()
        if m.name == "imdsd_guest_limits"
        for s in m.samples
        if s.name.endswith("_total")
    }


async def connect(daemon: Daemon) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = daemon.urls[0].removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port), local_addr=(D, 0))


async def test_a_busy_connection_outlives_idle_timeout_then_a_stalled_head_is_cut(
    slow_daemon: Daemon,
) -> None:
    """Invariant 7: answers every 0.5 s for 3 s (past idle_timeout, 2 s) keep the connection
    open, since each answer moves the idle deadline on; a head then left incomplete is cut at
    head_timeout (1 s, sooner than the idle deadline then pending) and counted as such."""
    reader, writer = await connect(slow_daemon)
    try:
        for _ in range(6):
            writer.write(GET)
            await reader.readuntil(b"\r\n\r\n")
            assert await reader.readexactly(len(VM_D)) == VM_D.encode()
            await asyncio.sleep(0.5)
        started = time.monotonic()
        writer.write(b"GET /latest/meta-data/instance-id HTTP/1.1\r\nX-Slow: a")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.5 < time.monotonic() - started < 1.9
    finally:
        writer.close()
    counts = limit_counts(slow_daemon)
    assert (counts["head_timeout"], counts["idle_timeout"]) == (1, 0)


async def test_quiet_after_answers_is_cut_at_idle_timeout_from_the_last(
    slow_daemon: Daemon,
) -> None:
    """Invariant 7: after several answers, a connection that goes quiet is closed
    idle_timeout (2 s) after its last answer, not earlier, and counted once."""
    reader, writer = await connect(slow_daemon)
    try:
        for _ in range(3):
            writer.write(GET)
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(len(VM_D))
            await asyncio.sleep(0.6)  # past head_timeout's 1 s in all: no head deadline runs
        started = time.monotonic() - 0.6
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 1.5 < time.monotonic() - started < 4.0
    finally:
        writer.close()
    counts = limit_counts(slow_daemon)
    assert (counts["idle_timeout"], counts["head_timeout"]) == (1, 0)
