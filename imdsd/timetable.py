"""The timetable of refreshes: every association's next refresh on the injected clock, in one
heap, and the single APScheduler job that wakes the Rotator at the earliest of them.

APScheduler's role is that one thing: to call the job on time. One job per association would
cost ~1 KB and ~0.1 ms to add each, a tenth of a 10,000-instance host's memory budget and most
of its start-up. APScheduler runs on the wall clock; the times are decided on the injected
one, so the job is set at wall-now plus the injected distance to the due time (in tests, the
job's own function is called after moving the clock, the path production's job takes).
"""

from __future__ import annotations

import heapq
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger

from imdsd.clock import Clock

Job = Callable[[], Awaitable[Any]]
RUNS_AT_ONCE = 1_000  # APScheduler's max_instances for the job (see _arm)


class Timetable:
    """Keys and their due times; wakes `job` at the earliest once started."""

    def __init__(self, clock: Clock, job: Job) -> None:
        self._clock, self._job = clock, job
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        # key -> its next refresh; the heap holds (due, key) entries, and an entry counts only
        # while it is the key's current one (`is`): rescheduling pushes, stale entries fall out.
        self._due: dict[str, datetime] = {}
        self._queue: list[tuple[datetime, str]] = []
        self._wake_at: datetime | None = None  # when the APScheduler job is set to run

    def start(self) -> None:
        """Start APScheduler (needs a running loop) with its job set at the earliest due time."""
        self._scheduler.start()
        self._arm_head()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def due(self, key: str) -> datetime | None:
        return self._due.get(key)

    def set(self, key: str, due: datetime) -> None:
        """The key's next refresh is `due` (earlier or later than before)."""
        self._due[key] = due
        heapq.heappush(self._queue, (due, key))
        if len(self._queue) > 2 * len(self._due) + 64:  # mostly stale (forced refreshes): rebuild
            self._queue = [(d, k) for k, d in self._due.items()]
            heapq.heapify(self._queue)
        self._arm(due)

    def drop(self, key: str) -> None:
        """The key has no next refresh (its heap entry is stale now and falls out when reached)."""
        self._due.pop(key, None)

    def pop_due(self) -> list[str]:
        """The keys due on the injected clock, taken off; the job is set at the next one."""
        now, keys = self._clock.now(), []
        while self._queue and self._queue[0][0] <= now:
            due, key = heapq.heappop(self._queue)
            if self._due.get(key) is due:
                keys.append(key)
        self._wake_at = None  # the job that was set is spent (or replaced by this earlier wake)
        self._arm_head()
        return keys

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
            self._job,
            DateTrigger(run_date=wall),
            id="rotation",
            name="rotation: run the refreshes that are due",
            replace_existing=True,
            misfire_grace_time=None,
            coalesce=True,
            # APScheduler counts a run until its done-callback, a turn after the job returned;
            # re-armed for a time already due, the next run comes first, and at the default
            # (1) it was skipped and the job removed: no refresh ever again. The job never
            # waits, so runs cannot pile up; the bound only has to be out of reach.
            max_instances=RUNS_AT_ONCE,
        )
