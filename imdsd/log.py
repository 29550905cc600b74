"""structlog setup: JSON lines when stdout is not a terminal, console otherwise.

The only process-global setup in imdsd. Every line the process writes goes through the same
processors, the standard library's loggers (aiohttp, asyncio, APScheduler) included, so each
is one JSON object. A processor replaces the value of any key that names a secret, and
exception output is plain text: structlog's dict tracebacks and rich's tracebacks can show
local variables, and locals hold keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

SECRET_KEYS = frozenset(
    {
        "secret_access_key",
        "secretaccesskey",
        "aws_secret_access_key",
        "token",
        "session_token",
        "sessiontoken",
        "key",
        "mac_key",
        "signing_key",
        "password",
    }
)
HIDDEN = "<hidden>"


def drop_secrets(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """Replace the value of every key that names a secret."""
    for key in event_dict:
        if key.lower() in SECRET_KEYS:
            event_dict[key] = HIDDEN
    return event_dict


# structlog's JSONRenderer makes a new encoder for every line (json.dumps with a `default`);
# one made once is the same JSON, ~1.5 us a line sooner: a cold start logs 10,000 rotations.
_encode = json.JSONEncoder(default=repr).encode


def render_json(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> str:
    """The event as one JSON object (what structlog's JSONRenderer writes)."""
    return _encode(event_dict)


class Stamp:
    """structlog's TimeStamper(fmt="iso", utc=True) ("2026-11-30T22:30:48.267461Z"), with the
    date and time of day formatted once a second rather than for every line (~1.2 us). The
    fraction always has six digits (structlog's drops it at .000000, one line in a million)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._second: tuple[int, str] = (-1, "")  # one tuple: threads log too

    def __call__(self, _logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        now = self._clock()
        second = int(now)
        micro = round((now - second) * 1e6)  # as datetime.fromtimestamp() rounds it
        if micro == 1_000_000:
            second, micro = second + 1, 0
        cached = self._second
        if cached[0] != second:
            cached = self._second = (
                second,
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
            )
        event_dict["timestamp"] = f"{cached[1]}.{micro:06d}Z"
        return event_dict


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Route structlog (and the stdlib loggers of our libraries) to `stream` (stdout)."""
    out = stream or sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        render_json
        if as_json
        else structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    )
    stamp = Stamp()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(file=out),  # PrintLogger's speed-up
        cache_logger_on_first_use=False,
    )
    # APScheduler, aiohttp and asyncio log through the standard library: warnings and worse,
    # rendered like every other line.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                stamp,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                drop_secrets,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)


class LoopErrors:
    """asyncio's report of an error nothing awaited (the loop's exception handler), as one
    log line per kind of message and interval: `socket.accept() out of system resource`
    repeats every second for as long as descriptors run out, and must not fill the journal.
    A traceback only where one helps: an OSError is the system's condition, not a bug."""

    MAX_KINDS = 128

    def __init__(self, every: float = 60.0, monotonic: Callable[[], float] = time.monotonic):
        self._every, self._monotonic = every, monotonic
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message") or "unhandled error in the event loop")
        now = self._monotonic()
        if now - self._last.get(message, -math.inf) < self._every:
            self._suppressed[message] = self._suppressed.get(message, 0) + 1
            return
        if len(self._last) >= self.MAX_KINDS:
            self._last.clear()
        self._last[message] = now
        exc = context.get("exception")
        structlog.get_logger("asyncio").error(
            message,
            error=exc.__class__.__name__ if exc is not None else None,
            repeated=self._suppressed.pop(message, 0),
            exc_info=None if exc is None or isinstance(exc, OSError) else exc,
        )
