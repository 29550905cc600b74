"""Rotation: the engine that keeps every association's session fresh (when is decided by the
pure functions of refresh.py).

`Rotator` keeps every association's next refresh (refresh_at() of its session, or a backoff
after a failure) in the timetable (timetable.py), whose one APScheduler job calls `wake()` at
the earliest of them; tests call `wake()` themselves after moving a fake clock. The Rotator
bounds concurrent issuer calls, holds them to the rate cap it is given (the composition root
gives one to an issuer with an upstream, none to the embedded issuer) and makes concurrent
refreshes of one association share a single call. An issuer failure never removes a
session: the current one is served until its own expiry (invariant 3).
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import structlog

from imdsd.backends.base import Backend
from imdsd.clock import Clock
from imdsd.errors import BackendError
from imdsd.inventory import Inventory
from imdsd.model import Association, RotationPolicy, Session, key_display
from imdsd.ratelimit import RateLimit
from imdsd.refresh import expired_answer, first_refresh_at, refresh_at, retry_after, too_short
from imdsd.sessions import SessionCache
from imdsd.timetable import Timetable

log = structlog.get_logger("imdsd.rotation")
PRIMING_STEP = 25  # associations priming reads back per turn of the loop (~0.15 ms on a warm start)
# Keys a turn when a batch is reconciled (~1-2 us each alone, 4x that beside an etcd server
# and guests on two cores): an etcd transaction of 1,000 changes took 5 ms in one turn.
RECONCILE_STEP = 100


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
        # The upstream's cap, for priming, rotation and retries alike; None: an issuer with
        # no upstream to protect (the embedded one) is not capped.
        self._rate = rate
        self._timetable = Timetable(clock, self.wake)
        self._priming: asyncio.Future[list[None]] | None = None
        self._attempts: dict[str, int] = {}
        # key -> (the association it issues for, its future): single-flight per association, so
        # a replaced association's successor never waits on (or inherits) its refresh.
        self._inflight: dict[str, tuple[Association, asyncio.Future[None]]] = {}
        self._flights: set[asyncio.Task[None]] = set()  # every refresh running, until it ends
        self._started = False
        self._shares: dict[str, float] = {}  # a cold start's wave: key -> its first-refresh share
        self._due: collections.deque[str] = collections.deque()  # woken, waiting for a worker
        # The keys in _due still wanting their refresh: one entry a key, and a key whose
        # refresh finished meanwhile (an admin's, settle()'s) leaves it, so none is issued twice.
        self._queued: set[str] = set()
        self._closed = False
        self._workers: set[asyncio.Task[None]] = set()
        self._hiring = False  # a _hire() is due behind the current turn of the loop
        # A batch's keys still to reconcile, RECONCILE_STEP a turn (a dict: one entry a key)
        self._reconciling: dict[str, None] = {}
        self._stepping = False  # a step is due behind the current turn
        self._stepped = asyncio.Event()  # set (and replaced) after each step

    async def prime(self, deadline: float | None = None) -> bool:
        """Get a session for every association, waiting at most `deadline` seconds; True when
        all were settled (issued or failed). Refreshes still waiting on the issuer at the
        deadline go on in the background (each is its own task): the listeners are already
        answering, with EC2's failure document until a session arrives (invariant 8)."""
        keys = []
        now = self._clock.now()
        for n, association in enumerate(self._inventory.associations(), 1):
            if n % PRIMING_STEP == 0:  # reading sessions back is ~6 us each: guests go between
                await asyncio.sleep(0)
            key = association.instance_id
            if self._inventory.association(key) is not association:
                continue  # changed meanwhile: reconcile() has scheduled its successor
            served = self._sessions.current(key, now)
            if (
                served is not None
                and served.role_arn == association.profile.role.arn
                and served.expiration - now > self._policy.min_remaining
            ):
                # taken over from the previous process (warm restart): no upstream call now
                self._timetable.set(
                    key, refresh_at(served.session, self._policy, self._rng.random())
                )
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
        workers = min(len(keys), self._policy.concurrency)
        self._priming = asyncio.gather(*(self._work(work) for _ in range(workers)))
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
        self._timetable.start()

    async def aclose(self) -> None:
        """Stop: no more wake-ups; priming and every issuer call in flight are cancelled and
        awaited, so nothing is left running (or unretrieved) when the backend closes."""
        self._timetable.shutdown()
        self._closed = True  # a _hire() already scheduled starts nothing now
        self._reconciling.clear()
        self._stepped.set()
        self._due.clear()
        self._queued.clear()
        tasks: list[asyncio.Future[Any]] = [*self._flights, *self._workers]  # superseded too
        if self._priming is not None:
            tasks.append(self._priming)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def due(self, key: str) -> datetime | None:
        """When the association's next refresh (or retry) is due, on the injected clock (now,
        for one waiting for a worker or for a batch's step: not its predecessor's time)."""
        if key in self._reconciling:
            return self._clock.now()
        due = self._timetable.due(key)
        return self._clock.now() if due is None and key in self._queued else due

    async def wake(self) -> list[asyncio.Task[None]]:
        """The APScheduler job (and tests' one way in after moving the fake clock): start (or
        join) every refresh due on the injected clock, set the job at the next due time, and
        return the refreshes started without waiting for them. It must not wait: APScheduler
        skips a job's run while its previous one is running, and a skipped wake-up would leave
        every later refresh unscheduled. The keys go to at most `concurrency` workers (the
        tasks returned, which end when no key is left); APScheduler drops them, a test awaits
        them."""
        self._enqueue(self._timetable.pop_due())
        return self._hire()

    def _enqueue(self, keys: Iterable[str]) -> None:
        for key in keys:
            if key not in self._queued:
                self._queued.add(key)
                self._due.append(key)

    def _hire(self) -> list[asyncio.Task[None]]:
        """Workers for the keys waiting, up to `concurrency` in all; every worker running."""
        self._hiring = False
        if self._closed:
            return []
        # A worker that found the deque empty is done at once, but leaves the set only when
        # its callback runs: it must not count as one still taking keys.
        running = sum(1 for worker in self._workers if not worker.done())
        for _ in range(min(len(self._due), self._policy.concurrency - running)):
            worker = asyncio.create_task(self._work(self._taking()), name="rotation")
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)
        return list(self._workers)

    async def _work(self, keys: Iterator[str]) -> None:
        """One of at most `concurrency` workers, each refreshing the next key in turn: 1,000
        refreshes due at once (an etcd batch, a reload) are never 1,000 tasks started in one
        turn of the guest loop, and the semaphore admits no more than this anyway."""
        for key in keys:
            try:
                await self._run(key)
            except Exception as exc:  # a bug past the backend's own handling: the next key
                log.error("rotation bug", instance=key, error=exc.__class__.__name__, exc_info=exc)
            # The embedded issuer never waits: without a turn here one worker would take
            # every key in one turn of the guest loop.
            await asyncio.sleep(0)

    async def _run(self, key: str) -> None:
        """A worker's refresh of one key, run in the worker itself (one joins the refresh in
        flight, if there is one): no task per key, which cost priming 10,000 sessions a task, a
        shield and two extra turns of the loop each. The flight is looked up and registered in
        the turn the key was taken, so a settle() cannot start a second one in between."""
        flight = self._flight(key)
        if flight is not None:
            await asyncio.shield(flight)
            return
        association = self._inventory.association(key)
        await self._fly(key, association, self._begin(key, association))

    def _flight(self, key: str) -> asyncio.Future[None] | None:
        """The current association's refresh in flight, if any. A finished one lingers until
        it is forgotten: it must not absorb a new refresh."""
        flight = self._inflight.get(key)
        if flight is not None and flight[0] is self._inventory.association(key):
            return None if flight[1].done() else flight[1]
        return None

    def _begin(self, key: str, association: Association | None) -> asyncio.Future[None]:
        """A new refresh's future, registered at once for others to join (single-flight)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if association is not None:
            self._inflight[key] = (association, done)
        return done

    async def _fly(self, key: str, association: Association | None,
                   done: asyncio.Future[None]) -> None:  # fmt: skip
        """The refresh begun as `done`, which it settles for whoever joined it."""
        try:
            await self._refresh(key, association)
        except Exception as exc:  # a bug past _refresh's own handling: joiners get it too
            done.set_exception(exc)
            done.exception()  # retrieved: the caller logs or raises it
            raise
        except BaseException:
            done.cancel()  # cancelled (aclose): so are those who joined
            raise
        else:
            done.set_result(None)
        finally:
            self._settled(key, done)

    def _taking(self) -> Iterator[str]:
        """The waiting keys, each taken off as a worker takes it; one that got its refresh
        meanwhile is passed over."""
        while self._due:
            key = self._due.popleft()
            if key in self._queued:
                self._queued.discard(key)
                if key in self._reconciling:
                    continue  # its step reconciles it soon, and queues it again
                yield key

    def reconcile_all(self, keys: Iterable[str]) -> None:
        """reconcile() for every key of a change. Up to RECONCILE_STEP keys at once; a larger
        batch (an etcd transaction, a reload) at once only for what a guest could see, the
        previous association's failure, and the rest RECONCILE_STEP keys a turn behind this
        call. Meanwhile no guest gets another role's session (answers check the role), and
        settle() waits for its key."""
        keys = list(keys)
        if len(keys) <= RECONCILE_STEP:  # an admin verb's change: in full on return
            for key in keys:
                self._reconciling.pop(key, None)  # this covers a batch's pending one too
                self.reconcile(key)
            return
        for key in keys:
            self._sessions.clear_failure(key)
            self._reconciling[key] = None
        if not self._stepping:
            self._stepping = True
            asyncio.get_running_loop().call_soon(self._reconcile_step)

    def _reconcile_step(self) -> None:
        try:
            for _ in range(min(RECONCILE_STEP, len(self._reconciling))):
                key, _ = self._reconciling.popitem()  # the order does not matter: O(1)
                try:
                    self.reconcile(key)
                except Exception as exc:  # a bug: the other keys are still reconciled
                    log.error("rotation bug", instance=key, error=exc.__class__.__name__,
                              exc_info=exc)  # fmt: skip
        finally:
            stepped, self._stepped = self._stepped, asyncio.Event()
            stepped.set()  # settle() and refresh() look again
            self._stepping = bool(self._reconciling) and not self._closed
            if self._stepping:
                asyncio.get_running_loop().call_soon(self._reconcile_step)

    async def _until_reconciled(self, key: str) -> None:
        """Until a batch's step has reconciled this key (at once when it is in none)."""
        while key in self._reconciling:
            await self._stepped.wait()

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
        if association is None:
            self._queued.discard(key)
        elif self._started:
            # Due now: straight to the workers (behind this call), not through the timetable
            # and its job: a batch of 1,000 changes costs the loop ~1 us a key here.
            self._enqueue((key,))
            if not self._hiring:
                self._hiring = True
                asyncio.get_running_loop().call_soon(self._hire)

    async def settle(self, key: str) -> None:
        """Wait until the association's current refresh (started now if due) has finished:
        issued or failed. For the admin verbs that promise a session on return."""
        await self._until_reconciled(key)  # a batch's: reconciled in steps, behind its change
        association = self._inventory.association(key)
        if association is None:
            return
        flight = self._flight(key)
        if flight is not None:
            await asyncio.shield(flight)
        elif self._sessions.failure(key) is None and not self._served_for(key, association):
            await self.refresh(key)

    async def refresh(self, key: str) -> None:
        """Replace the association's session; concurrent callers share one issuer call. A key
        a batch's step has still to reconcile waits for it (which drops its schedule)."""
        await self._until_reconciled(key)
        await asyncio.shield(self._launch(key))

    def _launch(self, key: str) -> asyncio.Future[None]:
        """The current association's refresh in flight, started (as a task) if there is none."""
        flight = self._flight(key)
        if flight is not None:
            return flight
        association = self._inventory.association(key)
        done = self._begin(key, association)
        task = asyncio.create_task(self._fly(key, association, done), name=f"refresh {key}")
        self._flights.add(task)
        task.add_done_callback(self._flights.discard)
        return task

    def _settled(self, key: str, done: asyncio.Future[None]) -> None:
        """Forget a finished refresh, but only if it is still the one on record: a successor
        started after it finished must stay single-flight."""
        flight = self._inflight.get(key)
        if flight is not None and flight[1] is done:
            del self._inflight[key]

    def _served_for(self, key: str, association: Association) -> bool:
        served = self._sessions.current(key, self._clock.now())
        return served is not None and served.role_arn == association.profile.role.arn

    async def _refresh(self, key: str, association: Association | None) -> None:
        if association is None:
            return self._forget(key)
        try:
            async with self._limit:
                if self._rate is not None:
                    await self._rate.acquire()
                if self._inventory.association(key) is not association:
                    return None  # replaced or removed while queued: no upstream call for it
                session = await self._backend.issue(association.profile, session_name=key)
        except BackendError as exc:
            if exc.throttling and self._rate is not None:
                self._rate.throttled()
            return self._failed(key, association, exc)
        except Exception as exc:  # any other backend fault: keep serving, retry later
            log.error("issuer bug", instance=key, error=exc.__class__.__name__)
            internal = BackendError("InternalError", "The credential issuer failed; retrying.")
            return self._failed(key, association, internal)
        if session.expiration <= max(session.issued_at, self._clock.now()):
            # Already expired (or granted nothing): serving it is impossible and re-issuing
            # at once would loop at max_rate. A failed attempt, with backoff.
            return self._failed(key, association, expired_answer(session))
        self._stored(key, association, session)

    def _stored(self, key: str, association: Association, session: Session) -> None:
        if self._inventory.association(key) is not association:
            return  # replaced or removed while the issuer worked: reconcile() saw to its successor
        self._queued.discard(key)  # this association has its refresh
        self._sessions.store(key, session, association.profile.role)
        self._attempts.pop(key, None)
        share = self._shares.pop(key, None)
        if share is not None and not self._shares:
            self._shares = {}  # a dict never shrinks: the wave's table goes with the wave
        if share is None:
            due = refresh_at(session, self._policy, self._rng.random())
        else:
            due = first_refresh_at(session, self._policy, share)
        self._timetable.set(key, due)
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
        self._queued.discard(key)  # retried on the timetable's backoff, not at once again
        attempt = self._attempts.get(key, 0)
        self._attempts[key] = attempt + 1
        now = self._clock.now()
        self._sessions.fail(key, exc.code, str(exc), now)
        u = self._rng.random()
        delay = retry_after(attempt, self._policy, u) if exc.retryable else self._policy.retry_max
        self._timetable.set(key, now + delay)
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
        self._timetable.drop(key)
        self._attempts.pop(key, None)
        self._shares.pop(key, None)
