"""Invariant 7 in arithmetic: per-guest connection caps, request buckets, the process ceiling,
incident summaries, and an account book that forgets guests who hold nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imdsd.budgets import (
    STRANGERS,
    THROTTLE_WAIT_MAX,
    THROTTLE_WAIT_MIN,
    Budget,
    BudgetPolicy,
    Ledger,
)

VM = "i-0aaaaaaaaaaaaaaaa"
OTHER = "i-0bbbbbbbbbbbbbbbb"


class Ticks:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ledger(ceiling: int = 1000, jitter: float = 0.0, **policy: object) -> tuple[Ledger, Ticks]:
    ticks = Ticks()
    book = Ledger(BudgetPolicy(**policy), ceiling, monotonic=ticks, jitter=lambda: jitter)  # type: ignore[arg-type]
    return book, ticks


def test_connection_cap_per_instance_costs_only_that_instance() -> None:
    """An instance past its cap is refused ("instance"); another instance and strangers still
    get in; a closed connection frees a slot."""
    book, _ = ledger(instance=Budget(connections=3))
    assert [book.open(VM) for _ in range(4)] == [None, None, None, "instance"]
    assert book.open(OTHER) is None and book.open(STRANGERS) is None
    book.close(VM)
    assert book.open(VM) is None


def test_strangers_share_one_cap() -> None:
    """Every unknown address spends the one STRANGERS account."""
    book, _ = ledger(strangers=Budget(connections=2))
    assert [book.open(STRANGERS) for _ in range(3)] == [None, None, "strangers"]
    assert book.open(VM) is None


def test_process_ceiling_refuses_before_descriptors_run_out() -> None:
    """Past the process ceiling every new connection is refused ("global"), whoever opens it;
    the count goes down as connections close."""
    book, _ = ledger(ceiling=2)
    assert [book.open(VM), book.open(OTHER), book.open(STRANGERS)] == [None, None, "global"]
    book.close(VM)
    assert book.open(STRANGERS) is None and book.open_connections == 2


def test_per_instance_override() -> None:
    """[budgets.instances.<id>] replaces the default for that instance only."""
    book, _ = ledger(instance=Budget(connections=1), overrides={VM: Budget(connections=3)})
    assert [book.open(VM) for _ in range(4)] == [None, None, None, "instance"]
    assert [book.open(OTHER) for _ in range(2)] == [None, "instance"]


def test_bucket_allows_burst_then_rate() -> None:
    """A full bucket serves `burst` requests at once, then one per 1/rate seconds; a throttled
    request is held back until a token is due, within fixed bounds."""
    book, ticks = ledger(instance=Budget(requests_per_second=5, burst=5))
    assert [book.spend(VM) for _ in range(5)] == [0.0] * 5
    wait = book.spend(VM)
    assert wait == pytest.approx(0.2)
    ticks.now += 0.2
    assert book.spend(VM) == 0.0
    assert book.spend(VM) > 0.0
    assert book.spend(OTHER) == 0.0  # another instance's bucket is its own


@pytest.mark.parametrize("u", [0.0, 0.5, 0.999])
def test_throttle_wait_is_bounded_and_jittered(u: float) -> None:
    """At 1 request/s a throttled answer waits at most THROTTLE_WAIT_MAX, at least MIN, times
    the jitter (1 + u): throttled connections do not all wake at once."""
    book, ticks = ledger(jitter=u, instance=Budget(requests_per_second=1, burst=1))
    assert book.spend(VM) == 0.0
    assert book.spend(VM) == pytest.approx(THROTTLE_WAIT_MAX * (1 + u))
    ticks.now += 0.999
    assert book.spend(VM) == pytest.approx(THROTTLE_WAIT_MIN * (1 + u))


@settings(max_examples=200, deadline=None)
@given(
    rate=st.integers(1, 1000),
    burst=st.integers(1, 1000),
    gaps=st.lists(st.floats(0, 2, allow_nan=False), min_size=1, max_size=300),
)
def test_bucket_never_serves_more_than_burst_plus_rate_times_time(
    rate: int, burst: int, gaps: list[float]
) -> None:
    """Whatever the timing of requests, the served count stays within burst + rate * elapsed."""
    book, ticks = ledger(instance=Budget(requests_per_second=rate, burst=burst))
    start, served = ticks.now, 0
    for gap in gaps:
        ticks.now += gap
        served += book.spend(VM) == 0.0
    assert served <= burst + rate * (ticks.now - start) + 1e-6


def test_summaries_count_then_reset_and_forget_idle_guests() -> None:
    """summaries() reports each guest's incidents once; accounts with no connection and a full
    bucket are then forgotten (removed instances leave nothing behind)."""
    book, ticks = ledger()
    book.note(VM, "bad_request")
    book.note(VM, "bad_request")
    book.note(STRANGERS, "refused_strangers")
    assert book.summaries() == [(VM, {"bad_request": 2}), (STRANGERS, {"refused_strangers": 1})]
    assert book.summaries() == []
    assert book._accounts == {}
    for n in range(10_000):  # many short-lived guests
        key = f"i-{n:08x}"
        assert book.open(key) is None
        book.close(key)
        book.spend(key)
    ticks.now += 3600
    book.summaries()
    assert book._accounts == {}


def test_throttled_recently_names_guests_for_an_hour() -> None:
    """status shows who was throttled in the last hour, and how long ago."""
    book, ticks = ledger(instance=Budget(requests_per_second=1, burst=1))
    book.spend(VM)
    book.spend(VM)
    ticks.now += 30
    assert book.throttled_recently() == {VM: 30.0}
    ticks.now += 3600
    assert book.throttled_recently() == {}


def test_connection_ceiling_keeps_headroom_below_the_open_files_limit() -> None:
    """With the open-files limit at 1024 (systemd's default soft limit), guest connections
    stop at 896: 128 descriptors stay for listeners, the admin socket, upstream calls, files."""
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)); "
        "from imdsd.budgets import connection_ceiling; print(connection_ceiling())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "896"
    raised = subprocess.run(
        [sys.executable, "-c", code.replace("(1024, 1024)", "(1024, 8192)")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert raised.stdout.strip() == str(8192 - 8192 // 8)  # the soft limit is raised to the hard
