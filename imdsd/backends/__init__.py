"""Backend openers by kind: name -> async context manager that yields a Backend.

Each kind's module is imported only when that kind is opened: the local backend (and every
admin verb) never loads botocore or the aiohttp client, which only `sts` and `rolesanywhere` need.
Whether a kind calls an upstream is said here too: `rotation.max_rate` guards upstreams (their
quotas are shared with other hosts and tools), and the embedded issuer has none.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import cast

from imdsd.backends.base import Backend
from imdsd.clock import Clock
from imdsd.config.backend import BackendConfig, BackendKind

Opener = Callable[[BackendConfig, Clock], AbstractAsyncContextManager[Backend]]

OPENERS: dict[BackendKind, str] = {  # kind -> the module whose open_backend() opens it
    "local": "imdsd.backends.local",
    "sts": "imdsd.backends.sts",
    "rolesanywhere": "imdsd.backends.rolesanywhere",
}

# Kinds whose issue() calls an upstream endpoint: the rate cap applies to these. The local
# issuer mints in-process in microseconds; capping it kept a 10,000-VM host waiting minutes.
UPSTREAM: frozenset[BackendKind] = frozenset({"sts", "rolesanywhere"})


def has_upstream(kind: BackendKind) -> bool:
    """Whether a kind's issuer calls an upstream (and so is held to rotation.max_rate)."""
    return kind in UPSTREAM


def opener(kind: BackendKind) -> Opener:
    """The open_backend() of a kind, its module imported now."""
    return cast(Opener, importlib.import_module(OPENERS[kind]).open_backend)
