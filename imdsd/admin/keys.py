"""This app's typed keys. What the admin API may ask of the rotation engine arrives as plain
callables from the composition root: admin.* never imports the scheduler or the backends."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from imdsd.budgets import Ledger
from imdsd.clock import Clock
from imdsd.inventory import Inventory
from imdsd.sessions import SessionCache

Apply = Callable[[set[str]], None]  # follow a change that took effect (never waits)
Settled = Callable[[set[str]], Awaitable[None]]  # wait until these sessions are issued or failed
Rotate = Callable[[str], Awaitable[None]]  # issue a new session for this instance, now
Due = Callable[[str], datetime | None]  # when this instance's next refresh is due
Source = Callable[[], dict[str, Any]]  # where the inventory comes from, and how fresh it is
Listening = Callable[[], list[dict[str, Any]]]  # the scoped guest listeners (device, namespace)

INVENTORY = web.AppKey("inventory", Inventory)
SESSIONS = web.AppKey("sessions", SessionCache)
CLOCK = web.AppKey("clock", Clock)
APPLY: web.AppKey[Apply] = web.AppKey("apply")
SETTLED: web.AppKey[Settled] = web.AppKey("settled")
ROTATE: web.AppKey[Rotate] = web.AppKey("rotate")
DUE: web.AppKey[Due] = web.AppKey("due")
LEDGER = web.AppKey("ledger", Ledger)  # guests' budgets: who was throttled recently
SOURCE: web.AppKey[Source] = web.AppKey("source")
LISTENING: web.AppKey[Listening] = web.AppKey("listening")
INFO: web.AppKey[dict[str, Any]] = web.AppKey("info")  # version, listeners, backend, paths, start
