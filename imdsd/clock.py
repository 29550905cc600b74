"""The one source of time. Everything that decides by time takes a Clock, so tests move it.

Never imports aiohttp or asyncio: domain logic stays testable without an event loop.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Tells the current instant as an aware UTC datetime."""

    def now(self) -> datetime: ...


class SystemClock:
    """The wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)
