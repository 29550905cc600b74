"""The cyclic garbage collector around the daemon's bulk work: start-up and a reload build
tens of thousands of long-lived objects (10,000 instances, their sessions and documents), and
each full collection while they are built walks all of them, stopping the guest loop for
10-30 ms, also when it runs in a reload's worker thread (it holds the GIL). So collections are
paused while the bulk is built, and what was built is then moved out of the collector's sight
(gc.freeze): later collections walk only what came after. Frozen objects are still freed by
their reference counts when replaced (instances, sessions and documents hold no cycles)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0  # pauses under way (a reload's thread and the loop may overlap)
_enabled = True  # whether collections were on before the first pause began


Resume = Callable[[], None]


def paused() -> Resume:
    """No cyclic collection until the returned `resume` is called (once counts: later calls do
    nothing); when the last pause resumes, everything alive is frozen and collections resume."""
    global _depth, _enabled
    with _lock:
        _depth += 1
        if _depth == 1:
            _enabled = gc.isenabled()
            gc.disable()
    done = threading.Event()

    def resume() -> None:
        global _depth
        with _lock:
            if done.is_set():
                return
            done.set()
            _depth -= 1
            if _depth == 0:
                gc.freeze()
                if _enabled:
                    gc.enable()

    return resume


@contextmanager
def bulk() -> Iterator[None]:
    """paused() for the block."""
    resume = paused()
    try:
        yield
    finally:
        resume()
