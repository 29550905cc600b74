"""structlog setup: JSON lines when stdout is not a terminal, console otherwise.

The only process-global setup in imdsd. A processor replaces the value of any key that names a
secret, and exception output is plain text: structlog's dict tracebacks and rich's tracebacks
can show local variables, and locals hold keys.
"""

from __future__ import annotations

import logging
import sys
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


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Route structlog (and the stdlib loggers of our libraries) to `stream` (stdout)."""
    out = stream or sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # APScheduler and aiohttp log through the standard library: warnings and worse only.
    logging.basicConfig(
        stream=out, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
