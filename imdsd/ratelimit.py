"""The upstream rate cap: at most `rotation.max_rate` issuer calls a second, whatever asks
(priming, rotation, retries, an admin rotate), and slower for a while after a throttling answer.

A token bucket of one second's calls. A throttling answer from the upstream (its account is
over its own quota) halves the rate for the whole backend, not just the association that met
it, and each quiet minute doubles it back up to the cap: other hosts and tools share that
quota, and hammering it back is what keeps it throttled. Time is injected (monotonic seconds
and a sleep), so tests move it instead of waiting. Never imports aiohttp.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

COOL_OFF_SECONDS = 60.0  # a throttled rate recovers one doubling per quiet minute
_EPSILON = 1e-9
_MIN_SLEEP = 1e-4  # never a sleep too short to move the clock (a spin)
log = structlog.get_logger("imdsd.rotation")


class RateLimit:
    """At most `rate` acquisitions a second (bursts of one second's worth)."""

    def __init__(
        self,
        rate: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.cap = self.rate = float(rate)
        self._monotonic, self._sleep = monotonic, sleep
        self._tokens, self._stamp = float(rate), monotonic()
        self._throttled_at: float | None = None
        self._lock = asyncio.Lock()  # waiters are served in order

    async def acquire(self) -> None:
        """Wait until one more call fits under the rate."""
        async with self._lock:
            while True:
                now = self._monotonic()
                self._recover(now)
                self._tokens = min(self.rate, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= 1.0 - _EPSILON:  # a float a hair short of 1 is a whole token
                    self._tokens = max(0.0, self._tokens - 1.0)
                    return
                await self._sleep(max(_MIN_SLEEP, (1.0 - self._tokens) / self.rate))

    def throttled(self) -> None:
        """The upstream said it is throttling us: halve the rate (at least 1 call a second)."""
        now = self._monotonic()
        if self._throttled_at is not None and now - self._throttled_at < 1.0:
            return  # one answer per second counts: a burst of refusals is one signal
        self._throttled_at = now
        self.rate = max(1.0, self.rate / 2)
        self._tokens = min(self._tokens, self.rate)
        log.warning("upstream throttling; every issuer call slows down", calls_per_second=self.rate)

    def _recover(self, now: float) -> None:
        if self._throttled_at is not None and now - self._throttled_at >= COOL_OFF_SECONDS:
            self.rate = min(self.cap, self.rate * 2)
            self._throttled_at = None if self.rate >= self.cap else now
