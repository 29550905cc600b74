"""The upstream rate cap, on moved time: bursts of one second, then the rate; halved by a
throttling answer for the whole backend; recovered one doubling per quiet minute."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from imdsd.errors import BackendError
from imdsd.ratelimit import COOL_OFF_SECONDS, RateLimit
from tests.helpers import VM_A
from tests.test_scheduler import Rig


class Time:
    """Monotonic seconds that move only when the limiter sleeps (or the test says)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def limit(rate: float) -> tuple[RateLimit, Time]:
    t = Time()
    return RateLimit(rate, monotonic=t, sleep=t.sleep), t


async def test_burst_then_rate() -> None:
    """A full bucket lets one second's calls through at once; then one per 1/rate seconds."""
    rl, t = limit(10)
    for _ in range(10):
        await rl.acquire()
    assert t.now == 100.0
    await rl.acquire()
    assert abs(t.now - 100.1) < 1e-9


@settings(max_examples=100, deadline=None)
@given(rate=st.integers(1, 500), calls=st.integers(1, 2000))
def test_never_more_than_rate_times_time_plus_a_burst(rate: int, calls: int) -> None:
    """However many callers, n calls take at least (n - rate) / rate seconds."""
    rl, t = limit(rate)

    async def run() -> None:
        for _ in range(calls):
            await rl.acquire()

    asyncio.run(run())
    assert t.now - 100.0 >= (calls - rate) / rate - 1e-6


async def test_throttling_halves_then_recovers() -> None:
    """A throttling answer halves the rate (a burst of them counts once a second, never below
    1/s); each quiet minute doubles it back up to the cap."""
    rl, t = limit(16)
    with capture_logs() as logs:
        rl.throttled()
        rl.throttled()  # the same second: one signal
    assert rl.rate == 8 and [e["calls_per_second"] for e in logs] == [8]
    t.now += 1.5
    rl.throttled()
    assert rl.rate == 4
    t.now += COOL_OFF_SECONDS
    await rl.acquire()
    assert rl.rate == 8
    t.now += COOL_OFF_SECONDS
    await rl.acquire()
    assert rl.rate == 16 and rl.cap == 16
    for _ in range(10):
        t.now += 1.5
        rl.throttled()
    assert rl.rate == 1


async def test_a_throttled_refresh_slows_every_refresh() -> None:
    """The Rotator halves its issuer rate when one association's refresh meets Throttling (or
    HTTP 429), not just that association's retry."""
    rig = Rig()
    rate = rig.rotator._rate
    assert rate is not None  # the rig's issuer stands for an upstream: it has a cap
    cap = rate.rate
    rig.backend.failing = BackendError("Throttling", "Rate exceeded", status=400)
    await rig.rotator.refresh(VM_A)
    assert rate.rate == cap / 2
    rig.backend.failing = BackendError("ServiceUnavailable", "down", status=503)
    await rig.rotator.refresh(VM_A)
    assert rate.rate == cap / 2  # other failures do not slow anything
