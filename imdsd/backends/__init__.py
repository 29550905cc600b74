"""Backend openers by kind: name -> async context manager that yields a Backend."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from imdsd.backends import local, sts
from imdsd.backends.base import Backend
from imdsd.clock import Clock
from imdsd.config import BackendConfig, BackendKind

Opener = Callable[[BackendConfig, Clock], AbstractAsyncContextManager[Backend]]

OPENERS: dict[BackendKind, Opener] = {
    "local": local.open_backend,
    "sts": sts.open_backend,
}
