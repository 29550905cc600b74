"""The timetable's one APScheduler job, run by a real AsyncIOScheduler: no due time is ever
left without a wake-up."""

from __future__ import annotations

import asyncio

from imdsd.timetable import Timetable
from tests.fakes import FakeClock


async def test_a_time_already_due_when_the_job_is_re_armed_still_wakes_it() -> None:
    """The job re-arms itself (pop_due) and the keys it issues get their next times while it
    runs; one already due (a retry in a few ms, a refresh the loop was late for) makes
    APScheduler run the job again before it has counted the last run as ended. That run must
    happen: at APScheduler's default of one instance it was skipped and the job dropped, so
    nothing was ever refreshed again (a sts start-up test waited 180 s for retries that never
    came). Five runs in a row, each arming the next for a time already due."""
    clock = FakeClock()
    runs: list[list[str]] = []
    timetable: Timetable

    async def job() -> None:
        runs.append(timetable.pop_due())
        if len(runs) < 5:
            timetable.set(f"key-{len(runs)}", clock.now())

    timetable = Timetable(clock, job)
    timetable.start()
    try:
        timetable.set("key-0", clock.now())
        for _ in range(500):
            if len(runs) == 5:
                break
            await asyncio.sleep(0.01)
    finally:
        timetable.shutdown()
    assert runs == [[f"key-{n}"] for n in range(5)]
