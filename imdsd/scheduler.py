"""Rotation: when each session is refreshed, and the engine that does it.

`refresh_at()` and `retry_after()` are pure: tests call them with tables. `Rotator` keeps every
association's next refresh (refresh_at() of its session, or a backoff after a failure) in one
heap of due times, a timer wheel that a single APScheduler job wakes at the earliest of them:
one job per association would cost ~1 KB and ~0.1 ms to add each, a tenth of a 10,000-instance
host's memory budget and most of its start-up. Tests drive that job's own function, `wake()`,
after moving a fake clock. The Rotator bounds concurrent issuer calls and makes concurrent
refreshes of one association share a single call. An issuer failure never removes a session:
the current one is served until its own expiry (invariant 3).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger

from imdsd.backends.base import Backend
from imdsd.clock import Clock
from imdsd.errors import BackendError
from imdsd.inventory import Inventory
from imdsd.model import Association, RotationPolicy, Session, key_display
from imdsd.ratelimit import RateLimit
from imdsd.sessions import SessionCache

log = structlog.get_logger("imdsd.rotation")


def refresh_at(session: Session, policy: RotationPolicy, u: float) -> datetime:
    """When to replace `session`: at `refresh_fraction` of its life or `refresh_before` its
    expiry, whichever is first, minus up to `jitter` (u in [0, 1) picks how much) so sessions
    issued together spread out. A session is used for at least a quarter of its life (a short
    one, e.g. an upstream-clamped duration, must not be re-issued in a loop), but never past
    expiry - min_remaining, the freshness floor guests are promised; only a session too short
    for that floor (see `too_short`) is refreshed at the quarter mark instead, as early as the
    loop guard allows. The jitter takes at most half of the time to that point."""
    issued, expiry = session.issued_at, session.expiration
    lifetime = expiry - issued
    due = max(
        min(issued + lifetime * policy.refresh_fraction, expiry - policy.refresh_before),
        issued + lifetime / 4,
    )
    if not too_short(session, policy):
        due = min(due, expiry - policy.min_remaining)
    return due - min(policy.jitter, (due - issued) / 2) * u


def first_refresh_at(session: Session, policy: RotationPolicy, share: float) -> datetime:
    """The first refresh of a session issued in a cold start's wave: `share` (in [0, 1)) of
    the way from an eighth of its life (never a re-issue right after the issue) to its
    unjittered refresh_at(). Priming gives the i-th of N sessions a share in [i/N, (i+1)/N), so
    their refreshes are spread evenly over the window instead of all coming back in the last
    `jitter` minutes of it; later refreshes keep that phase."""
    due = refresh_at(session, policy, 0.0)
    start = min(due, session.issued_at + (session.expiration - session.issued_at) / 8)
    return start + (due - start) * share


def too_short(session: Session, policy: RotationPolicy) -> bool:
    """A session that reaches the min_remaining floor within an eighth of its life: refreshing
    it there would re-issue such sessions back to back (each as short), so it is refreshed at a
    quarter of its life and the Rotator warns that min_remaining cannot be kept."""
    lifetime = session.expiration - session.issued_at
    return session.expiration - policy.min_remaining < session.issued_at + lifetime / 8


def _expired_answer(session: Session) -> BackendError:
    lifetime = round((session.expiration - session.issued_at).total_seconds())
    return BackendError(
        "InvalidCredentials",
        "The credential issuer returned credentials that have already expired; retrying.",
        detail=f"issued with {lifetime} s of lifetime, expiring {session.expiration.isoformat()}",
    )


def retry_after(attempt: int, policy: RotationPolicy, u: float) -> timedelta:
    """Exponential backoff with equal jitter: half the capped step, plus up to another half."""
    step = min(policy.retry_max, policy.retry_initial * (1 << min(attempt, 20)))
    return step / 2 + step / 2 * u


class Rotator:
    """Keeps a fresh session for every association in the inventory."""

    def __init__(
        self,
        backend: Backend,
        inventory: Inventory,
        sessions: SessionCache,
        policy: RotationPolicy,
        clock: Clock,
        *,
        rng: random.Random | None = None,
        rate: RateLimit | None = None,
    ) -> None:
        self._backend = backend
        self._inventory = inventory
        self._sessions = sessions
        self._policy = policy
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 -- jitter, not a secret
        self._limit = asyncio.Semaphore(policy.concurrency)
        self._rate = rate or RateLimit(policy.max_rate)  # priming, rotation, retries alike
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        # key -> its next refresh; the heap holds (due, key) entries, and an entry counts only
        # while it is the key's current one (`is`): rescheduling pushes, stale entries fall out.
        self._due: dict[str, datetime] = {}
        self._queue: list[tuple[datetime, str]] = []
        self._wake_at: datetime | None = None  # when the APScheduler job is set to run
        self._priming: asyncio.Future[list[None]] | None = None
        self._attempts: dict[str, int] = {}
        # key -> (the association it issues for, the task): single-flight per association, so
        # a replaced association's successor never waits on (or inherits) its refresh.
        self._inflight: dict[str, tuple[Association, asyncio.Task[None]]] = {}
        self._flights: set[asyncio.Task[None]] = set()  # every refresh running, until it ends
        self._started = False
        self._shares: dict[str, float] = {}  # a cold start's wave: key -> its first-refresh share

    async def prime(self, deadline: float | None = None) -> bool:
        """Get a session for every association, waiting at most `deadline` seconds; True when
        all were settled (issued or failed). Refreshes still waiting on the issuer at the
        deadline go on in the background (each is its own task): the listeners are already
        answering, with EC2's failure document until a session arrives (invariant 8)."""
        keys = []
        now = self._clock.now()
        for association in self._inventory.associations():
            key = association.instance_id
            served = self._sessions.current(key, now)
            if (
                served is not None
                and served.role_arn == association.profile.role.arn
                and served.expiration - now > self._policy.min_remaining
            ):
                # taken over from the previous process (warm restart): no upstream call now
                self._schedule(key, refresh_at(served.session, self._policy, self._rng.random()))
            else:
                keys.append(key)
        # Stratified: the i-th of N gets a share in [i/N, (i+1)/N), shuffled so the order of
        # the config file says nothing about who refreshes first.
        strata = [(i + self._rng.random()) / len(keys) for i in range(len(keys))]
        self._rng.shuffle(strata)
        self._shares.update(zip(keys, strata, strict=True))
        # As many workers as issuer calls may run at once, each taking the next key: a task per
        # key would hold 10,000 frames at once for no extra speed (the semaphore admits
        # `concurrency` anyway), and leave the heap fragmented after them.
        work = iter(keys)

        async def worker() -> None:
            for key in work:
                await self.refresh(key)

        workers = min(len(keys), self._policy.concurrency)
        self._priming = asyncio.gather(*(worker() for _ in range(workers)))
        try:
            await asyncio.wait_for(asyncio.shield(self._priming), deadline)
        except TimeoutError:
            pending = sum(
                1 for k in keys if not self._sessions.get(k) and not self._sessions.failure(k)
            )
            log.warning(
                "start-up deadline passed; rotation goes on in the background",
                deadline_seconds=deadline,
                pending=pending,
                associations=len(keys),
            )
            return False
        return True

    def start(self) -> None:
        """Start APScheduler (needs a running loop) with its job set at the earliest due time."""
        self._started = True
        self._scheduler.start()
        self._arm_head()

    async def aclose(self) -> None:
        """Stop: no more wake-ups; priming and every issuer call in flight are cancelled and
        awaited, so nothing is left running (or unretrieved) when the backend closes."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        tasks: list[asyncio.Future[Any]] = list(self._flights)  # superseded ones included
        if self._priming is not None:
            tasks.append(self._priming)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def due(self, key: str) -> datetime | None:
        """When the association's next refresh (or retry) is due, on the injected clock."""
        return self._due.get(key)

    async def wake(self) -> list[asyncio.Task[None]]:
        """The APScheduler job (and tests' one way in after moving the fake clock): start (or
        join) every refresh due on the injected clock, set the job at the next due time, and
        return the refreshes started without waiting for them. It must not wait: APScheduler
        skips a job's run while its previous one is running, and a skipped wake-up would leave
        every later refresh unscheduled. APScheduler drops the tasks; a test awaits them."""
        now, keys = self._clock.now(), []
        while self._queue and self._queue[0][0] <= now:
            due, key = heapq.heappop(self._queue)
            if self._due.get(key) is due:
                keys.append(key)
        self._wake_at = None  # the job that was set is spent (or replaced by this earlier wake)
        self._arm_head()
        return [self._launch(k) for k in keys]

    def reconcile(self, key: str) -> None:
        """Bring one instance's rotation in line with its association, at once and without
        waiting on anything (invariant 9): a removed association loses its session, failure and
        schedule; a new or replaced one starts afresh (no failure, attempts or session of its
        predecessor carried over) with its refresh due now, run behind this call. Before
        start(), priming picks it up instead."""
        association = self._inventory.association(key)
        # The predecessor's session stays only while it is this role's (a profile changed in
        # another way): another role's keys are never reported, or counted, as this one's.
        self._forget(
            key, keep_session=association is not None and self._served_for(key, association)
        )
        if association is not None and self._started:
            self._schedule(key, self._clock.now())

    async def settle(self, key: str) -> None:
        """Wait until the association's current refresh (started now if due) has finished:
        issued or failed. For the admin verbs that promise a session on return."""
        flight = self._inflight.get(key)
        association = self._inventory.association(key)
        if association is None:
            return
        if flight is not None and flight[0] is association and not flight[1].done():
            await asyncio.shield(flight[1])
        elif self._sessions.failure(key) is None and not self._served_for(key, association):
            await self.refresh(key)

    async def refresh(self, key: str) -> None:
        """Replace the association's session; concurrent callers share one issuer call."""
        await asyncio.shield(self._launch(key))

    def _launch(self, key: str) -> asyncio.Task[None]:
        """The current association's refresh in flight, started if there is none."""
        association = self._inventory.association(key)
        flight = self._inflight.get(key)
        # A finished task lingers until its done-callback runs: it must not absorb a new refresh.
        if flight is not None and flight[0] is association and not flight[1].done():
            return flight[1]
        task = asyncio.create_task(self._refresh(key, association), name=f"refresh {key}")
        self._flights.add(task)
        task.add_done_callback(self._flights.discard)
        if association is not None:
            self._inflight[key] = (association, task)
            task.add_done_callback(functools.partial(self._settled, key))
        return task

    def _settled(self, key: str, task: asyncio.Task[None]) -> None:
        """Forget a finished refresh, but only if it is still the one on record: a successor
        started after it finished must stay single-flight."""
        flight = self._inflight.get(key)
        if flight is not None and flight[1] is task:
            del self._inflight[key]

    def _served_for(self, key: str, association: Association) -> bool:
        served = self._sessions.current(key, self._clock.now())
        return served is not None and served.role_arn == association.profile.role.arn

    async def _refresh(self, key: str, association: Association | None) -> None:
        if association is None:
            return self._forget(key)
        try:
            async with self._limit:
                await self._rate.acquire()
                if self._inventory.association(key) is not association:
                    return None  # replaced or removed while queued: no upstream call for it
                session = await self._backend.issue(association.profile, session_name=key)
        except BackendError as exc:
            if exc.throttling:
                self._rate.throttled()
            return self._failed(key, association, exc)
        except Exception as exc:  # any other backend fault: keep serving, retry later
            log.error("issuer bug", instance=key, error=exc.__class__.__name__)
            internal = BackendError("InternalError", "The credential issuer failed; retrying.")
            return self._failed(key, association, internal)
        if session.expiration <= max(session.issued_at, self._clock.now()):
            # Already expired (or granted nothing): serving it is impossible and re-issuing
            # at once would loop at max_rate. A failed attempt, with backoff.
            return self._failed(key, association, _expired_answer(session))
        self._stored(key, association, session)

    def _stored(self, key: str, association: Association, session: Session) -> None:
        if self._inventory.association(key) is not association:
            return  # replaced or removed while the issuer worked: reconcile() saw to its successor
        self._sessions.store(key, session, association.profile.role)
        self._attempts.pop(key, None)
        share = self._shares.pop(key, None)
        if share is not None and not self._shares:
            self._shares = {}  # a dict never shrinks: the wave's table goes with the wave
        if share is None:
            due = refresh_at(session, self._policy, self._rng.random())
        else:
            due = first_refresh_at(session, self._policy, share)
        self._schedule(key, due)
        if too_short(session, self._policy):
            log.warning(
                "session too short for rotation.min_remaining; refreshed at a quarter of its life",
                instance=key,
                role=association.profile.role.arn,
                lifetime_seconds=session.lifetime,
                min_remaining_seconds=self._policy.min_remaining.total_seconds(),
            )
        log.info(
            "session rotated",
            instance=key,
            role=association.profile.role.arn,
            access_key=key_display(session.access_key_id),
            expires=session.expiration.isoformat(),
            next_refresh=due.isoformat(),
        )

    def _failed(self, key: str, association: Association, exc: BackendError) -> None:
        if self._inventory.association(key) is not association:
            return  # the old association's failure is not its successor's (nor a removed one's)
        attempt = self._attempts.get(key, 0)
        self._attempts[key] = attempt + 1
        now = self._clock.now()
        self._sessions.fail(key, exc.code, str(exc), now)
        u = self._rng.random()
        delay = retry_after(attempt, self._policy, u) if exc.retryable else self._policy.retry_max
        self._schedule(key, now + delay)
        served = self._sessions.current(key, now)  # None once the last session has expired
        log.warning(
            "session refresh failed",
            instance=key,
            role=association.profile.role.arn,
            error=exc.__class__.__name__,
            code=exc.code,
            retryable=exc.retryable,
            request_id=exc.request_id,
            status=exc.status,
            detail=exc.detail,
            attempt=attempt + 1,
            retry_in=round(delay.total_seconds(), 3),
            serving_until=served.expiration.isoformat() if served else None,
        )

    def _forget(self, key: str, *, keep_session: bool = False) -> None:
        """Drop what belongs to the key's association: its session (unless a successor may
        serve it until replaced: answers check the role), failure, schedule and attempts."""
        if keep_session:
            self._sessions.clear_failure(key)
        else:
            self._sessions.drop(key)
        self._due.pop(key, None)  # its heap entry is stale now and falls out when reached
        self._attempts.pop(key, None)
        self._shares.pop(key, None)

    def _schedule(self, key: str, due: datetime) -> None:
        self._due[key] = due
        heapq.heappush(self._queue, (due, key))
        if len(self._queue) > 2 * len(self._due) + 64:  # mostly stale (forced refreshes): rebuild
            self._queue = [(d, k) for k, d in self._due.items()]
            heapq.heapify(self._queue)
        self._arm(due)

    def _arm_head(self) -> None:
        """Set the job at the earliest current due time (stale entries at the top are dropped)."""
        while self._queue and self._due.get(self._queue[0][1]) is not self._queue[0][0]:
            heapq.heappop(self._queue)
        if self._queue:
            self._arm(self._queue[0][0])

    def _arm(self, due: datetime) -> None:
        """Make the job run at `due` unless it already runs earlier. A job left set for a due
        time that was forgotten or moved later only wakes to find nothing to do."""
        if not self._scheduler.running or (self._wake_at is not None and self._wake_at <= due):
            return
        self._wake_at = due
        # APScheduler runs on the wall clock; the decision was made on the injected one.
        wall = datetime.now(UTC) + (due - self._clock.now())
        self._scheduler.add_job(
            self.wake,
            DateTrigger(run_date=wall),
            id="rotation",
            name="rotation: run the refreshes that are due",
            replace_existing=True,
            misfire_grace_time=None,
            coalesce=True,
        )
