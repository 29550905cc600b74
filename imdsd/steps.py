"""Work done in steps: a generator that yields between bounded pieces of work and returns its
result, run either at once (start-up, tests) or with a turn of the event loop between steps
(a reload, an etcd load), so the guests are served in between (invariant 9)."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import TypeVar

T = TypeVar("T")
Steps = Generator[None, None, T]


def at_once(steps: Steps[T]) -> T:
    """Every step now; the result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


async def between_turns(steps: Steps[T]) -> T:
    """One step per turn of the loop; the result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        await asyncio.sleep(0)
