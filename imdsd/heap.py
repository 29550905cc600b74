"""How the daemon's memory is managed: glibc's malloc arenas, and the cyclic garbage
collector around the daemon's bulk work.

The collector: start-up and a reload build tens of thousands of long-lived objects (10,000
instances, their sessions and documents), and each full collection while they are built walks
all of them, stopping the guest loop for 10-30 ms, also when it runs in a reload's worker
thread (it holds the GIL). So full collections are paused while the bulk is built (young
ones go on: short-lived garbage still dies young), and what was built is then moved out of
the collector's sight (gc.freeze): later collections walk only what came after. Frozen
objects are still freed by their reference counts when replaced (instances, sessions and
documents hold no cycles)."""

from __future__ import annotations

import ctypes
import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

M_ARENA_MAX = -8  # glibc's mallopt() parameter
NEVER = 1 << 30  # a generation-2 threshold no count reaches
_lock = threading.Lock()
_depth = 0  # pauses under way (a reload's thread and the loop may overlap)
_thresholds = gc.get_threshold()  # as they were before the first pause began

Resume = Callable[[], None]


def paused() -> Resume:
    """No full collection until the returned `resume` is called (once counts: later calls do
    nothing). The young generations are still collected, so the garbage guests' requests make
    meanwhile dies young as always; when the last pause resumes, the young garbage left is
    collected, everything alive is frozen, and full collections resume."""
    global _depth, _thresholds
    with _lock:
        _depth += 1
        if _depth == 1:
            _thresholds = gc.get_threshold()
            gc.set_threshold(_thresholds[0], _thresholds[1], NEVER)
    done = threading.Event()

    def resume() -> None:
        global _depth
        with _lock:
            if done.is_set():
                return
            done.set()
            _depth -= 1
            if _depth == 0:
                gc.collect(1)  # young garbage is freed, not frozen for good
                gc.freeze()
                gc.set_threshold(*_thresholds)

    return resume


@contextmanager
def bulk() -> Iterator[None]:
    """paused() for the block."""
    resume = paused()
    try:
        yield
    finally:
        resume()


def one_malloc_arena() -> None:
    """Have every thread allocate from one malloc arena. glibc gives each thread that
    allocates its own arena, whose pages stay resident after use: the notary, the vault's
    writer and the worker threads cost ~11 MB of RSS at 10,000 instances (measured: 108 MB
    after a boot storm's crawl, 97 MB with one arena). They are few and mostly idle, so the
    shared arena's lock costs nothing. Call before any thread starts; no-op without glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_ARENA_MAX, 1)
