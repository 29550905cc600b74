"""Invariant 7 in the log: every line the process writes is one JSON object, the standard
library's loggers included, and asyncio's repeated error reports cost one line per minute."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from datetime import UTC, datetime

import structlog
from hypothesis import given
from hypothesis import strategies as st

from imdsd import log


class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stdlib_loggers_write_json_lines() -> None:
    """aiohttp's, asyncio's and APScheduler's log records come out as JSON objects with the
    logger's name and level, tracebacks included as text inside the object; below warning,
    nothing."""
    buffer = io.StringIO()
    log.configure("info", "json", stream=buffer)
    logging.getLogger("aiohttp.server").info("not shown")
    logging.getLogger("apscheduler.scheduler").warning("job %s missed", "x")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Unhandled exception")
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [(e["logger"], e["level"], e["event"]) for e in lines] == [
        ("apscheduler.scheduler", "warning", "job x missed"),
        ("aiohttp.server", "error", "Unhandled exception"),
    ]
    assert "ValueError: boom" in lines[1]["exception"]


def test_loop_errors_once_per_message_and_interval() -> None:
    """asyncio's `socket.accept() out of system resource` repeats while descriptors run out:
    one line per message per interval, with the count of repeats it stood for; no traceback
    for an OSError (the system's condition), one for anything else (a bug)."""
    buffer = io.StringIO()
    log.configure("info", "json", stream=buffer)
    ticks = Ticks()
    handler = log.LoopErrors(every=60.0, monotonic=ticks)
    loop = asyncio.new_event_loop()
    try:
        accept = {
            "message": "socket.accept() out of system resource",
            "exception": OSError(24, "Too many open files"),
        }
        for _ in range(1000):
            handler(loop, accept)
            ticks.now += 0.01
        ticks.now += 60
        handler(loop, accept)
        handler(
            loop,
            {"message": "Task exception was never retrieved", "exception": RuntimeError("bug")},
        )
    finally:
        loop.close()
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [(e["event"], e["repeated"]) for e in lines] == [
        ("socket.accept() out of system resource", 0),
        ("socket.accept() out of system resource", 999),
        ("Task exception was never retrieved", 0),
    ]
    assert "exception" not in lines[0] and "RuntimeError: bug" in lines[2]["exception"]


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_stamp_is_structlogs_iso_utc_stamp(now: float) -> None:
    """The cached-second stamp writes what structlog's TimeStamper(fmt="iso", utc=True) writes
    for the same instant, across second boundaries (the cache must never serve the wrong
    second)."""
    stamp = log.Stamp(clock=lambda: now)
    expected = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert stamp(None, "info", {})["timestamp"] == expected
    later = now + 1.0
    stamp._clock = lambda: later
    expected = datetime.fromtimestamp(later, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert stamp(None, "info", {})["timestamp"] == expected


def test_json_lines_are_structlogs() -> None:
    """The prepared encoder renders an event as structlog's JSONRenderer does, objects it
    cannot encode included (their repr)."""
    event = {"event": "x", "n": 1, "when": datetime(2026, 1, 1, tzinfo=UTC), "s": "é\n"}
    assert log.render_json(None, "info", dict(event)) == structlog.processors.JSONRenderer()(
        None, "info", dict(event)
    )
