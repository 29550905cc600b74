"""Rotation timing (pure tables) and the Rotator driven by a fake clock, without sleeping."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from imdsd.backends.local import LocalIssuer
from imdsd.config import Config
from imdsd.errors import BackendError
from imdsd.imds import render
from imdsd.inventory import Inventory
from imdsd.model import RotationPolicy, Session
from imdsd.ratelimit import RateLimit
from imdsd.refresh import first_refresh_at, refresh_at, retry_after, too_short
from imdsd.scheduler import Rotator
from imdsd.sessions import SessionCache
from tests.fakes import START, FakeClock, FlakyBackend
from tests.helpers import ROLE_A, VM_A, VM_B, make_config

H, M, S = timedelta(hours=1), timedelta(minutes=1), timedelta(seconds=1)
DEFAULT = RotationPolicy()


def session(lifetime: timedelta) -> Session:
    return Session(access_key_id="ASIAX", secret_access_key="s", token="t",
                   issued_at=START, expiration=START + lifetime)  # fmt: skip


@pytest.mark.parametrize(
    ("lifetime", "u", "after_issue"),
    [
        (6 * H, 0.0, 3 * H),             # half the lifetime comes first
        (6 * H, 0.999999, 2 * H + 50 * M),  # ... minus up to 10 minutes of jitter
        (90 * M, 0.0, 30 * M),           # 60 minutes before expiry comes first
        (12 * H, 0.5, 6 * H - 5 * M),
        (15 * M, 0.0, 3 * M + 45 * S),   # refresh_before > lifetime: a quarter of the life
        (15 * M, 0.999999, 1 * M + 53 * S),  # ... jitter limited to half of that wait
    ],
)  # fmt: skip
def test_refresh_at_table(lifetime: timedelta, u: float, after_issue: timedelta) -> None:
    """Default policy: half-life or 60 min before expiry, whichever is first, minus jitter."""
    due = refresh_at(session(lifetime), DEFAULT, u)
    assert abs(due - (START + after_issue)) < S


def test_refresh_at_short_session_jitter_is_bounded() -> None:
    """A short session is never refreshed the moment it arrives, whatever the jitter draw."""
    policy = RotationPolicy(refresh_before=M, min_remaining=M, jitter=H)
    due = refresh_at(session(4 * M), policy, 0.999)
    assert START + M - S <= due <= START + 2 * M
    policy = RotationPolicy(refresh_before=H, min_remaining=M, jitter=0 * S)
    assert refresh_at(session(20 * M), policy, 0.0) == START + 5 * M


def test_refresh_leaves_min_remaining_for_default_lifetimes() -> None:
    """Invariant 2, by arithmetic: at the refresh instant the old session still has
    well over min_remaining left, for every jitter draw and every lifetime from 1 to 12 h."""
    rng = random.Random(7)
    for hours in range(2, 13):
        for _ in range(200):
            s = session(hours * H)
            due = refresh_at(s, DEFAULT, rng.random())
            assert s.expiration - due >= DEFAULT.refresh_before > DEFAULT.min_remaining
            assert due > s.issued_at


@pytest.mark.parametrize(
    ("attempt", "u", "expected"),
    [(0, 0.0, 0.5 * S), (0, 1.0, 1 * S), (1, 0.0, 1 * S), (3, 0.5, 6 * S),
     (8, 0.0, 128 * S), (9, 1.0, 5 * M), (50, 0.0, 150 * S)],
)  # fmt: skip
def test_retry_after_table(attempt: int, u: float, expected: timedelta) -> None:
    """Exponential from retry_initial, capped at retry_max, with equal jitter."""
    assert retry_after(attempt, DEFAULT, u) == expected


class Rig:
    """A Rotator over the real local issuer (wrapped to fail on cue) and a fake clock."""

    def __init__(
        self,
        policy: RotationPolicy = DEFAULT,
        lifetime: timedelta = 6 * H,
        config: Config | None = None,
    ) -> None:
        config = config or make_config()
        self.clock = FakeClock()
        self.backend = FlakyBackend(LocalIssuer(b"k" * 32, lifetime, self.clock))
        self.inventory = Inventory(
            config.instances, config.profiles, config.associations, self.clock
        )
        self.sessions = SessionCache(render.credentials, render.failure, render.read_credentials)
        # The rate cap waits in real time: these tests move a fake clock through hundreds of
        # refreshes, so theirs is generous (tests/test_ratelimit.py pins the cap itself).
        self.rotator = Rotator(self.backend, self.inventory, self.sessions, policy, self.clock,
                               rng=random.Random(1), rate=RateLimit(100_000))  # fmt: skip

    async def replaced_in_flight(self) -> tuple[asyncio.Task[None], asyncio.Task[None]]:
        """VM_A's refresh hanging on the issuer (gated), then its association replaced with
        profile-b and reconciled: (the old role's refresh, the new one's settle), both in
        flight."""
        self.backend.gate = asyncio.Event()
        old = asyncio.create_task(self.rotator.refresh(VM_A))
        while self.backend.in_flight == 0:
            await asyncio.sleep(0)
        await self.inventory.commit(lambda: self.inventory.replace_association(VM_A, "profile-b"))
        self.rotator.reconcile(VM_A)
        new = asyncio.create_task(self.rotator.settle(VM_A))
        while self.backend.in_flight < 2:
            await asyncio.sleep(0)
        return old, new

    def served(self, key: str = VM_A) -> bytes:
        association = self.inventory.association(key)
        assert association is not None
        return b"".join(
            self.sessions.answer(
                key, association.profile.role.arn, extended=False, now=self.clock.now()
            )
        )

    def key_id(self, key: str = VM_A) -> str:
        entry = self.sessions.get(key)
        assert entry is not None
        return entry.session.access_key_id

    async def advance(self, delta: timedelta, step: timedelta = M) -> None:
        """Move the clock in steps, waking the rotator's job after each step and awaiting the
        refreshes it starts."""
        end = self.clock.now() + delta
        while self.clock.now() < end:
            self.clock.advance(min(step, end - self.clock.now()))
            await asyncio.gather(*await self.rotator.wake())


async def test_prime_gives_every_association_a_session() -> None:
    """At start, before any listener, each association has a session named after its instance."""
    rig = Rig()
    await rig.rotator.prime()
    assert sorted(rig.sessions.keys()) == sorted([VM_A, VM_B])
    assert sorted(rig.backend.names) == sorted([VM_A, VM_B])
    assert b'"Code" : "Success"' in rig.served()


async def test_rotation_happens_at_refresh_at() -> None:
    """A session is replaced when refresh_at() says, not before; the next one is scheduled."""
    rig = Rig()
    await rig.rotator.refresh(VM_A)  # issued outside a cold start's wave: refresh_at() decides
    first, due = rig.key_id(), rig.rotator.due(VM_A)
    assert due is not None and due == START + 3 * H - DEFAULT.jitter * random.Random(1).random()
    rig.clock.set(due - S)
    await asyncio.gather(*await rig.rotator.wake())
    assert rig.key_id() == first
    rig.clock.set(due)
    await asyncio.gather(*await rig.rotator.wake())
    assert rig.key_id() != first
    next_due = rig.rotator.due(VM_A)
    assert next_due is not None and next_due > due


async def test_healthy_issuer_keeps_min_remaining_for_two_days() -> None:
    """Invariant 2: sampled every minute over 48 h, the served credentials always have at
    least min_remaining (30 min) left, and new ones exist well before the old expire."""
    rig = Rig(RotationPolicy())
    await rig.rotator.prime()
    seen = set()
    for _ in range(48 * 60):
        await rig.advance(M)
        entry = rig.sessions.get(VM_A)
        assert entry is not None
        assert entry.session.expiration - rig.clock.now() >= DEFAULT.min_remaining
        seen.add(entry.session.access_key_id)
    assert len(seen) >= 15  # rotated about every 3 hours


async def test_failure_keeps_serving_then_never_serves_expired() -> None:
    """Invariant 3: while the issuer fails, the current session is served until its own
    expiry; after it, EC2's failure document (HTTP 200 shape with Code/Message), never keys."""
    rig = Rig()
    await rig.rotator.prime()
    good = rig.served()
    rig.backend.failing = BackendError("ServiceUnavailable", "upstream is down")
    await rig.advance(6 * H - S)
    assert rig.served() == good
    assert rig.backend.calls > 10  # it kept retrying, with backoff
    await rig.advance(S)
    body = rig.served()
    assert body.startswith(
        b'{\n  "Code" : "ServiceUnavailable",\n  "Message" : "upstream is down",\n  "LastUpdated" : "'
    )
    assert b"AccessKeyId" not in body


async def test_recovery_resumes_normal_schedule() -> None:
    """After an outage the next retry succeeds and the normal schedule returns."""
    rig = Rig()
    await rig.rotator.prime()
    rig.backend.failing = BackendError("Throttling", "slow down")
    await rig.advance(7 * H)
    assert b"Throttling" in rig.served()
    rig.backend.failing = None
    await rig.advance(6 * M)  # backoff is capped at retry_max (5 min)
    assert b'"Code" : "Success"' in rig.served()
    due = rig.rotator.due(VM_A)
    assert due is not None and due - rig.clock.now() > 2 * H


async def test_backoff_grows_then_caps() -> None:
    """Retries back off exponentially from retry_initial up to retry_max."""
    rig = Rig()
    await rig.rotator.prime()
    rig.backend.failing = BackendError("InternalError", "boom")
    rig.clock.set(START + 4 * H)
    gaps = []
    for _ in range(12):
        before = rig.clock.now()
        await asyncio.gather(*await rig.rotator.wake())
        due = rig.rotator.due(VM_A)
        assert due is not None
        gaps.append(due - before)
        rig.clock.set(due)
    assert gaps[1] < gaps[4] < gaps[8]
    assert max(gaps) <= DEFAULT.retry_max


async def test_non_retryable_failure_waits_retry_max() -> None:
    """A refusal (AccessDenied) is not hammered: the next attempt is retry_max away."""
    rig = Rig()
    await rig.rotator.prime()
    rig.backend.failing = BackendError("AccessDenied", "not allowed", retryable=False)
    rig.clock.set(START + 4 * H)
    await asyncio.gather(*await rig.rotator.wake())
    assert rig.rotator.due(VM_A) == rig.clock.now() + DEFAULT.retry_max


async def test_unexpected_backend_exception_is_contained() -> None:
    """A backend bug (not a BackendError) is logged and retried; the session stays served."""
    rig = Rig()
    await rig.rotator.prime()
    good = rig.served()
    rig.backend.failing = RuntimeError("bug")  # type: ignore[assignment]
    rig.clock.set(START + 4 * H)
    await asyncio.gather(*await rig.rotator.wake())
    assert rig.served() == good
    failure = rig.sessions.failure(VM_A)
    assert failure is not None and failure.code == "InternalError"


async def test_single_flight_per_association() -> None:
    """Concurrent refreshes of one association share one issuer call."""
    rig = Rig()
    rig.backend.gate = asyncio.Event()
    waiters = [asyncio.create_task(rig.rotator.refresh(VM_A)) for _ in range(5)]
    await asyncio.sleep(0)
    rig.backend.gate.set()
    await asyncio.gather(*waiters)
    assert rig.backend.calls == 1


async def test_refresh_right_after_another_is_not_swallowed() -> None:
    """A refresh asked for just as the previous one finishes (before its bookkeeping runs)
    issues a new session instead of returning the finished one's result."""
    rig = Rig()
    await rig.rotator.refresh(VM_A)
    first = rig.key_id()
    finished = asyncio.get_running_loop().create_future()
    finished.set_result(None)
    association = rig.inventory.association(VM_A)
    assert association is not None
    rig.rotator._inflight[VM_A] = (association, finished)  # lingering
    await rig.rotator.refresh(VM_A)
    assert rig.key_id() != first and rig.backend.calls == 2


async def test_concurrency_is_bounded() -> None:
    """No more than rotation.concurrency issuer calls run at once."""
    rig = Rig(RotationPolicy(concurrency=1))
    rig.backend.gate = asyncio.Event()
    prime = asyncio.create_task(rig.rotator.prime())
    for _ in range(5):
        await asyncio.sleep(0)
    assert rig.backend.in_flight == 1
    rig.backend.gate.set()
    await prime
    assert rig.backend.max_in_flight == 1 and rig.backend.calls == 2


async def test_refreshes_due_together_take_at_most_concurrency_tasks() -> None:
    """A wake-up with many refreshes due (an etcd batch, a reload) starts no more tasks than
    rotation.concurrency, which take the keys in turn: never one task per key started in one
    turn of the guest loop. Every due key is refreshed all the same."""
    rig = Rig(RotationPolicy(concurrency=1))
    await rig.rotator.prime()
    before = {key: rig.key_id(key) for key in (VM_A, VM_B)}
    rig.rotator.start()
    try:
        rig.clock.advance(12 * H)  # both sessions' refreshes are due
        rig.backend.gate = asyncio.Event()
        workers = await rig.rotator.wake()
        while rig.backend.in_flight == 0:
            await asyncio.sleep(0)
        assert len(workers) == 1 and rig.backend.in_flight == 1
        rig.backend.gate.set()
        await asyncio.gather(*workers)
    finally:
        await rig.rotator.aclose()
    assert all(rig.key_id(key) != before[key] for key in before)
    assert rig.backend.max_in_flight == 1


async def test_a_changed_association_is_issued_once_however_it_is_asked_for() -> None:
    """Reconciled three times while the workers are busy, then settled by the admin verb
    that promises a session: one issuer call for the new association, not one per ask (the
    workers pass over a key whose refresh finished meanwhile)."""
    rig = Rig(RotationPolicy(concurrency=1))
    await rig.rotator.prime()
    rig.rotator.start()
    try:
        before = rig.backend.calls
        await rig.inventory.commit(lambda: rig.inventory.replace_association(VM_A, "profile-b"))
        for _ in range(3):
            rig.rotator.reconcile(VM_A)
        assert rig.rotator.due(VM_A) == rig.clock.now()  # waiting for a worker: due now
        await rig.rotator.settle(VM_A)
        await asyncio.gather(*await rig.rotator.wake())
        assert rig.backend.calls == before + 1
        entry = rig.sessions.get(VM_A)
        assert entry is not None and entry.role_arn.endswith("role-b")
    finally:
        await rig.rotator.aclose()


async def test_nothing_is_issued_after_aclose() -> None:
    """A refresh reconciled just before the stop (its workers not hired yet) starts nothing
    after aclose(): no issuer call outlives the backend."""
    rig = Rig()
    await rig.rotator.prime()
    rig.rotator.start()
    before = rig.backend.calls
    await rig.inventory.commit(lambda: rig.inventory.replace_association(VM_A, "profile-b"))
    rig.rotator.reconcile(VM_A)
    await rig.rotator.aclose()
    for _ in range(5):
        await asyncio.sleep(0)
    assert rig.backend.calls == before and rig.backend.in_flight == 0


async def test_a_worker_outlives_a_bug_in_one_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault past the backend's own handling (here: storing VM_A's session) is logged and
    the worker goes on to the next key: VM_B still gets its refresh."""
    rig = Rig(RotationPolicy(concurrency=1))
    await rig.rotator.prime()
    rig.rotator.start()
    stored = rig.rotator._stored

    def broken(key: str, *args: object) -> None:
        if key == VM_A:
            raise RuntimeError("bug")
        stored(key, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(rig.rotator, "_stored", broken)
    try:
        before = rig.key_id(VM_B)
        rig.clock.advance(12 * H)
        with capture_logs() as logs:
            await asyncio.gather(*await rig.rotator.wake())
        assert rig.key_id(VM_B) != before
        assert any(e["event"] == "rotation bug" and e["instance"] == VM_A for e in logs)
    finally:
        await rig.rotator.aclose()


async def test_reconcile_replaced_and_removed_association() -> None:
    """Replacing a profile serves the new role's session at once; disassociating drops it."""
    rig = Rig()
    await rig.rotator.prime()
    await rig.inventory.commit(lambda: rig.inventory.replace_association(VM_A, "profile-b"))
    rig.rotator.reconcile(VM_A)
    await rig.rotator.settle(VM_A)
    entry = rig.sessions.get(VM_A)
    assert entry is not None and entry.role_arn != ROLE_A
    await rig.inventory.commit(lambda: rig.inventory.disassociate(VM_A))
    rig.rotator.reconcile(VM_A)
    assert rig.sessions.get(VM_A) is None and rig.rotator.due(VM_A) is None


async def test_replaced_while_issuing_gets_new_role_at_once() -> None:
    """A profile replaced during the old role's issuer call: the new role's session is issued
    at once, beside the hanging call (single-flight per association, not per instance), and
    the old call's answer, when it comes, is never stored over it."""
    rig = Rig()
    old, new = await rig.replaced_in_flight()
    assert rig.backend.gate is not None
    rig.backend.gate.set()
    await asyncio.gather(old, new)
    entry = rig.sessions.get(VM_A)
    assert entry is not None and entry.role_arn.endswith("role-b") and rig.backend.calls == 2


async def test_old_roles_failure_never_shows_at_the_new_roles_path() -> None:
    """Replace-association while the old role's refreshes fail: the old failure is cleared,
    the new role gets its own attempt count, and a failure of the old role's call arriving
    after the replacement is not recorded against the new association."""
    rig = Rig()
    rig.backend.failing = BackendError("AccessDenied", "old role refused", retryable=False)
    await rig.rotator.prime()
    assert rig.sessions.failure(VM_A) is not None
    rig.backend.gate = asyncio.Event()
    old = asyncio.create_task(rig.rotator.refresh(VM_A))  # the old role's retry, in flight
    while rig.backend.in_flight == 0:
        await asyncio.sleep(0)
    await rig.inventory.commit(lambda: rig.inventory.replace_association(VM_A, "profile-b"))
    rig.rotator.reconcile(VM_A)
    assert rig.sessions.failure(VM_A) is None and rig.rotator._attempts.get(VM_A) is None
    rig.backend.gate.set()
    await old  # fails, for the old association: dropped
    assert rig.sessions.failure(VM_A) is None
    rig.backend.failing = None
    await rig.rotator.settle(VM_A)
    entry = rig.sessions.get(VM_A)
    assert entry is not None and entry.role_arn.endswith("role-b")


async def test_an_already_expired_answer_is_a_failure_with_backoff() -> None:
    """An upstream answer whose session has already expired (or grants nothing) is a failed
    issue retried with backoff, never stored and never re-issued in a loop."""
    rig = Rig(lifetime=timedelta(0))
    await rig.rotator.prime()
    failure = rig.sessions.failure(VM_A)
    assert failure is not None and failure.code == "InvalidCredentials"
    assert rig.sessions.get(VM_A) is None
    due = rig.rotator.due(VM_A)
    assert due is not None and due - rig.clock.now() >= DEFAULT.retry_initial / 2
    calls = rig.backend.calls
    await asyncio.gather(*await rig.rotator.wake())
    assert rig.backend.calls == calls  # nothing is due before the backoff


async def test_one_apscheduler_job_wakes_at_the_earliest_due_time() -> None:
    """Once started, a single APScheduler job is set at the earliest refresh due on the heap (its
    wall time follows the injected clock's distance to it); forgetting that association moves
    the job to the next one after it wakes, and a refresh due sooner moves it earlier."""
    rig = Rig()
    await rig.rotator.prime()
    rig.rotator.start()
    try:
        dues = {vm: rig.rotator.due(vm) for vm in (VM_A, VM_B)}
        assert None not in dues.values()
        first, second = sorted(dues, key=lambda vm: dues[vm])  # type: ignore[arg-type,return-value]

        def job_at() -> datetime:
            (job,) = rig.rotator._timetable._scheduler.get_jobs()
            return job.next_run_time.astimezone(UTC)  # type: ignore[no-any-return]

        def wall(due: datetime | None) -> datetime:
            assert due is not None
            return datetime.now(UTC) + (due - rig.clock.now())

        assert abs(job_at() - wall(dues[first])) < timedelta(seconds=5)
        await rig.inventory.commit(lambda: rig.inventory.disassociate(first))
        rig.rotator.reconcile(first)
        await asyncio.gather(*await rig.rotator.wake())  # the job, woken early: nothing due
        assert abs(job_at() - wall(dues[second])) < timedelta(seconds=5)
        soon = rig.clock.now() + M
        rig.rotator._timetable.set(second, soon)
        assert abs(job_at() - wall(soon)) < timedelta(seconds=5)
    finally:
        await rig.rotator.aclose()


async def test_apscheduler_runs_a_due_job() -> None:
    """The real AsyncIOScheduler fires the job for a refresh due in the past, and it rotates."""
    rig = Rig()
    await rig.rotator.prime()
    first = rig.key_id()
    rig.clock.set(START + 4 * H)  # the refresh is now overdue: its wall time is in the past
    rig.rotator.start()
    try:
        for _ in range(200):
            if rig.key_id() != first:
                break
            await asyncio.sleep(0.01)
        assert rig.key_id() != first
    finally:
        await rig.rotator.aclose()


async def test_a_slow_refresh_does_not_hold_up_the_next_wake() -> None:
    """The job starts due refreshes and returns: while one refresh hangs on the issuer, the
    job still wakes for the next due time and starts that one too (APScheduler skips a run of
    a job that is still running, which would strand every refresh after it)."""
    rig = Rig()
    await rig.rotator.prime()
    rig.backend.gate = asyncio.Event()  # every issue from now on hangs until set
    rig.rotator.start()
    try:
        rig.rotator._timetable.set(VM_A, rig.clock.now() - S)
        for _ in range(200):
            if rig.backend.in_flight == 1:
                break
            await asyncio.sleep(0.01)
        rig.rotator._timetable.set(VM_B, rig.clock.now() - S)
        for _ in range(200):
            if rig.backend.in_flight == 2:
                break
            await asyncio.sleep(0.01)
        assert rig.backend.in_flight == 2
        rig.backend.gate.set()
    finally:
        await rig.rotator.aclose()


async def test_stale_heap_entries_do_not_refresh_or_pile_up() -> None:
    """A refresh moved earlier (forced rotations) leaves its old entry behind: that entry never
    refreshes again when reached, and the heap is rebuilt before stale entries outnumber the
    live ones by more than two to one."""
    rig = Rig()
    await rig.rotator.prime()
    calls = rig.backend.calls
    for _ in range(200):
        await rig.rotator.refresh(VM_A)
    assert rig.backend.calls == calls + 200
    assert len(rig.rotator._timetable._queue) <= 2 * 2 + 64
    rig.clock.set(START + 4 * H)
    await asyncio.gather(*await rig.rotator.wake())
    assert rig.backend.calls == calls + 200 + 2  # VM_A once, VM_B once


@pytest.mark.parametrize(
    ("lifetime", "after_issue"),
    [
        (35 * M, 5 * M),    # a quarter (8m45s) would leave 26m15s: min_remaining (30m) wins
        (40 * M, 10 * M),   # a quarter leaves exactly 30m
        (60 * M, 15 * M),   # an STS-clamped hour: a quarter, 45m left
        (32 * M, 8 * M),    # too short for the floor (2m left of 32m): a quarter, with a warning
    ],
)  # fmt: skip
def test_refresh_never_later_than_min_remaining(
    lifetime: timedelta, after_issue: timedelta
) -> None:
    """Invariant 2 at run time: with the defaults (refresh_before 60m, min_remaining 30m), a
    session is refreshed no later than expiry - min_remaining, unless it is too short for the
    floor, where refreshing there would re-issue back to back: then at a quarter of its life."""
    assert refresh_at(session(lifetime), DEFAULT, 0.0) == START + after_issue


@settings(max_examples=300, deadline=None)
@given(
    lifetime=st.integers(60, 43200),
    fraction=st.floats(0.05, 0.95),
    before=st.integers(0, 43200),
    floor=st.integers(0, 43200),
    jitter=st.integers(0, 21600),
    u=st.floats(0, 0.999999),
)
def test_refresh_at_properties(lifetime: int, fraction: float, before: int, floor: int,
                               jitter: int, u: float) -> None:  # fmt: skip
    """For any valid policy and session: the refresh lands inside the session's life, never so
    early that short sessions are re-issued back to back (an eighth of their life at least,
    half that with jitter), and never later than expiry - min_remaining unless the session is
    too short for that floor."""
    policy = RotationPolicy(refresh_fraction=fraction, refresh_before=max(before, floor) * S,
                            min_remaining=floor * S, jitter=jitter * S)  # fmt: skip
    s = session(lifetime * S)
    due = refresh_at(s, policy, u)
    assert s.issued_at + lifetime * S / 16 <= due < s.expiration
    if not too_short(s, policy):
        assert due <= s.expiration - policy.min_remaining


async def test_too_short_session_is_refreshed_at_a_quarter_with_a_warning() -> None:
    """A session shorter than the min_remaining floor allows is not re-issued in a loop: it is
    used for a quarter of its life, and a warning says min_remaining cannot be kept."""
    rig = Rig(lifetime=32 * M)
    with capture_logs() as logs:
        await rig.rotator.prime()
    due = rig.rotator.due(VM_A)
    assert due is not None and START + 4 * M <= due <= START + 8 * M  # a quarter, less jitter
    warnings = [e for e in logs if e["event"].startswith("session too short")]
    assert {e["instance"] for e in warnings} == {VM_A, VM_B}


async def test_single_flight_survives_a_late_done_callback() -> None:
    """A finished refresh whose done-callback runs after its successor started must not
    unregister the successor: concurrent callers still share one issuer call."""
    rig = Rig()
    rig.backend.gate = asyncio.Event()
    first = asyncio.create_task(rig.rotator.refresh(VM_A))
    await asyncio.sleep(0)
    finished = rig.rotator._inflight[VM_A][1]
    rig.backend.gate.set()
    await first
    rig.backend.gate.clear()
    second = asyncio.create_task(rig.rotator.refresh(VM_A))
    await asyncio.sleep(0)
    successor = rig.rotator._inflight[VM_A][1]
    rig.rotator._settled(VM_A, finished)  # the predecessor's callback, arriving late
    assert rig.rotator._inflight[VM_A][1] is successor
    third = asyncio.create_task(rig.rotator.refresh(VM_A))
    await asyncio.sleep(0)
    assert rig.backend.in_flight == 1
    rig.backend.gate.set()
    await asyncio.gather(second, third)
    assert rig.backend.max_in_flight == 1 and rig.backend.calls == 2


async def test_failure_after_expiry_says_nothing_is_served() -> None:
    """The refresh-failed warning's serving_until names the session still served, and None
    once it has expired (never a time in the past)."""
    rig = Rig()
    await rig.rotator.prime()
    rig.backend.failing = BackendError("ServiceUnavailable", "The issuer is unavailable.")
    with capture_logs() as logs:
        await rig.advance(4 * H)
        await rig.advance(3 * H)
    failed = [e for e in logs if e["event"] == "session refresh failed" and e["instance"] == VM_A]
    assert failed[0]["serving_until"] == (START + 6 * H).isoformat()
    assert failed[-1]["serving_until"] is None


def test_first_refresh_at_is_a_share_of_the_window() -> None:
    """first_refresh_at(): share 0 is an eighth of the life (never at once), share 1 the
    unjittered refresh_at()."""
    s = session(6 * H)
    assert first_refresh_at(s, DEFAULT, 0.0) == START + 45 * M
    assert first_refresh_at(s, DEFAULT, 0.5) == START + 45 * M + (3 * H - 45 * M) / 2
    assert first_refresh_at(s, DEFAULT, 0.999999) - (START + 3 * H) < S


def test_cold_start_of_10000_sessions_never_comes_back_as_a_wave() -> None:
    """10,000 sessions (6 h) issued together: with the first refresh of each at its stratified
    share of the window and every later one at refresh_at() (jitter included), the busiest
    minute from the first hour on holds at most twice the rotation's steady rate (N per
    refresh period of 3 h, 56 a minute). Without the spread, all 10,000 came back within the
    last 10 minutes before half-life."""
    n, rng = 10_000, random.Random(5)
    lifetime, horizon = 6 * H, 24 * H
    shares = [(i + rng.random()) / n for i in range(n)]
    counts: Counter[int] = Counter()
    for share in shares:
        due = first_refresh_at(session(lifetime), DEFAULT, share)
        while due < START + horizon:
            counts[int((due - START) / M)] += 1
            s = Session(access_key_id="A", secret_access_key="s", token="t", issued_at=due,
                        expiration=due + lifetime)  # fmt: skip
            due = refresh_at(s, DEFAULT, rng.random())
    steady_per_minute = n / (lifetime / 2 / M)
    busiest = max(v for minute, v in counts.items() if minute >= 60)
    assert busiest <= 2 * steady_per_minute, (busiest, steady_per_minute)
    unspread = Counter(
        int((refresh_at(session(lifetime), DEFAULT, rng.random()) - START) / M) for _ in range(n)
    )
    assert max(unspread.values()) > 10 * steady_per_minute  # what the spread prevents


async def test_priming_spreads_first_refreshes_over_the_window() -> None:
    """The Rotator gives primed sessions stratified shares: over 64 associations their first
    refreshes cover the window (none later than refresh_at(), gaps well under the jitter)."""
    config = make_config("".join(
        f'[[instances]]\nid = "i-{n:08x}"\naddresses = ["127.0.8.{n}"]\n'
        f'[[associations]]\ninstance = "i-{n:08x}"\nprofile = "profile-a"\n' for n in range(1, 65)))  # fmt: skip
    rig = Rig()
    rig.inventory = Inventory(config.instances, config.profiles, config.associations, rig.clock)
    rig.rotator = Rotator(rig.backend, rig.inventory, rig.sessions, DEFAULT, rig.clock,
                          rng=random.Random(3), rate=RateLimit(100_000))  # fmt: skip
    await rig.rotator.prime()
    dues = sorted(d for a in rig.inventory.associations() if (d := rig.rotator.due(a.instance_id)))
    assert len(dues) == 66 and dues[-1] <= START + 3 * H
    assert max(b - a for a, b in itertools.pairwise(dues)) < DEFAULT.jitter
    assert START + 45 * M <= dues[0] < START + 55 * M < START + 170 * M < dues[-1]
