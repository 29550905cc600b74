"""What one guest may consume, and the ledger that keeps count (DESIGN invariant 7).

A guest is an instance, known by its id; every address that is no instance shares the one
STRANGERS account. Each account has a cap on simultaneous connections and a token bucket for
requests; the whole process has a connection ceiling below its open-files limit, so accept()
never runs out of descriptors. Guest-caused incidents (throttling, refused connections,
timeouts, malformed requests) are counted here and reported as one summary line per guest per
interval, never one line per event, and never with the guest's bytes.

Its types are what [budgets] parses into (config/budgets.py). Never imports aiohttp, asyncio
or the config reader: the arithmetic is tested without sockets or a loop.
"""

from __future__ import annotations

import random
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

STRANGERS = "strangers"  # the shared account of every address that is no known instance
Refusal = Literal["instance", "strangers", "global"]
Incident = Literal[
    "refused_instance",
    "refused_strangers",
    "refused_global",
    "idle_timeout",
    "head_timeout",
    "body_limit",
    "bad_request",
    "throttled",
]
INCIDENTS: tuple[Incident, ...] = Incident.__args__  # type: ignore[attr-defined]
FD_HEADROOM_MIN = 128  # descriptors kept for listeners, the admin socket, upstream calls, files
# A throttled answer is held back until a token is due, within these bounds, then times a
# jitter in [1, 2): a retry loop cannot spin on 429s, and a guest's throttled connections do
# not all wake in the same instant (a burst other guests would wait behind).
THROTTLE_WAIT_MIN = 0.1
THROTTLE_WAIT_MAX = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """One account's allowance: simultaneous connections, and a request token bucket."""

    connections: int = 32
    requests_per_second: int = 50
    burst: int = 200


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetPolicy:
    """Every guest's allowance and the connection timeouts ([budgets] in the config)."""

    instance: Budget = Budget()
    strangers: Budget = Budget(connections=16, requests_per_second=5, burst=20)
    overrides: Mapping[str, Budget] = field(default_factory=dict)  # by instance id
    idle_timeout: timedelta = timedelta(seconds=30)  # waiting for a request to begin
    head_timeout: timedelta = timedelta(seconds=5)  # from its first byte to a complete head
    max_body: int = 1024  # bytes a request may declare; no endpoint reads a body

    def budget(self, key: str) -> Budget:
        if key == STRANGERS:
            return self.strangers
        return self.overrides.get(key, self.instance)


def connection_ceiling() -> int:
    """Raise the soft open-files limit to the hard one, then keep headroom below it: the most
    guest connections the process may hold at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # hard is RLIM_INFINITY on some hosts: keep the soft one
            pass
    return max(1, soft - max(FD_HEADROOM_MIN, soft // 8))


class _Account:
    __slots__ = ("connections", "incidents", "last_throttled", "stamp", "tokens")

    def __init__(self, burst: int, now: float) -> None:
        self.connections = 0
        self.tokens = float(burst)
        self.stamp = now
        self.incidents: Counter[Incident] = Counter()
        self.last_throttled: float | None = None


class Ledger:
    """Per-guest connection counts, request buckets and incident tallies."""

    def __init__(
        self,
        policy: BudgetPolicy,
        ceiling: int,
        monotonic: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,  # u in [0, 1); not a secret
    ) -> None:
        self.policy = policy
        self.ceiling = ceiling
        self.open_connections = 0
        self._monotonic = monotonic
        self._jitter = jitter
        self._accounts: dict[str, _Account] = {}

    def _account(self, key: str) -> _Account:
        account = self._accounts.get(key)
        if account is None:
            budget = self.policy.budget(key)
            account = self._accounts[key] = _Account(budget.burst, self._monotonic())
        return account

    def open(self, key: str) -> Refusal | None:
        """Admit a new connection (None), or say which cap refuses it."""
        if self.open_connections >= self.ceiling:
            return "global"
        account = self._account(key)
        if account.connections >= self.policy.budget(key).connections:
            return "strangers" if key == STRANGERS else "instance"
        account.connections += 1
        self.open_connections += 1
        return None

    def close(self, key: str) -> None:
        """A connection admitted by open(key) has ended."""
        self.open_connections -= 1
        self._account(key).connections -= 1

    def spend(self, key: str) -> float:
        """Take one request from the key's bucket: 0.0 when allowed, else how many seconds to
        hold the throttled answer back (until a token is due, within fixed bounds, jittered)."""
        budget = self.policy.budget(key)
        account = self._account(key)
        now = self._monotonic()
        tokens = min(budget.burst, self._refilled(account, budget, now))
        account.stamp = now
        if tokens >= 1.0:
            account.tokens = tokens - 1.0
            return 0.0
        account.tokens = tokens
        account.last_throttled = now
        wait = (1.0 - tokens) / budget.requests_per_second
        return min(THROTTLE_WAIT_MAX, max(THROTTLE_WAIT_MIN, wait)) * (1.0 + self._jitter())

    def forget(self, keys: Iterable[str]) -> None:
        """Drop the accounts of instances that left the inventory (a later instance reusing
        the address starts with a full budget). One with a connection still open stays until
        it closes; summaries() collects it then."""
        for key in keys:
            account = self._accounts.get(key)
            if account is not None and account.connections == 0:
                del self._accounts[key]

    def note(self, key: str, incident: Incident) -> None:
        """Count a guest-caused incident for the next summary."""
        self._account(key).incidents[incident] += 1

    def summaries(self) -> list[tuple[str, dict[Incident, int]]]:
        """Each guest's incidents since the last call (then reset), and forget accounts that
        hold nothing: no connection, a full bucket, no recent throttling (so removed
        instances and one-off strangers leave no memory behind)."""
        now = self._monotonic()
        out: list[tuple[str, dict[Incident, int]]] = []
        for key, account in list(self._accounts.items()):
            if account.incidents:
                out.append((key, dict(sorted(account.incidents.items()))))
                account.incidents.clear()
            elif account.connections == 0 and not self._recent(account, now, 3600.0):
                budget = self.policy.budget(key)
                if self._refilled(account, budget, now) >= budget.burst:
                    del self._accounts[key]
        return out

    def throttled_recently(self, within: float = 3600.0) -> dict[str, float]:
        """Guests throttled in the last `within` seconds -> seconds since it last happened."""
        now = self._monotonic()
        return {
            key: round(now - account.last_throttled, 3)
            for key, account in self._accounts.items()
            if account.last_throttled is not None and self._recent(account, now, within)
        }

    @staticmethod
    def _refilled(account: _Account, budget: Budget, now: float) -> float:
        return account.tokens + (now - account.stamp) * budget.requests_per_second

    @staticmethod
    def _recent(account: _Account, now: float, within: float) -> bool:
        return account.last_throttled is not None and now - account.last_throttled < within
