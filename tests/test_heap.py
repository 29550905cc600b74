"""The collector's pauses around bulk work (imdsd/heap.py): no cyclic collection while
start-up or a reload builds its objects, frozen after, and never left off by accident."""

from __future__ import annotations

import ctypes
import gc
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator

import pytest

from imdsd import heap


@pytest.fixture(autouse=True)
def collector() -> Iterator[None]:
    """Each test starts with collections on and leaves them as they were, nothing frozen."""
    thresholds = gc.get_threshold()
    gc.enable()
    yield
    gc.unfreeze()
    gc.enable()
    gc.set_threshold(*thresholds)


def paused_fully() -> bool:
    return gc.get_threshold()[2] == heap.NEVER


def test_a_bulk_pauses_full_collections_then_freezes_what_it_built() -> None:
    """Inside: no full collection (young ones go on); after: the thresholds as they were, and
    the objects built inside are out of the collector's sight (frozen), so its next full pass
    does not walk them."""
    gc.unfreeze()
    before = gc.get_threshold()
    with heap.bulk():
        assert paused_fully() and gc.isenabled()
        built = [[n] for n in range(1000)]
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() >= len(built)


class Cyclic:
    """An object in a reference cycle with itself (a guest request's garbage, say)."""

    def __init__(self) -> None:
        self.me = self


def test_garbage_made_during_a_pause_is_freed_not_frozen() -> None:
    """Cycles that died while the pause lasted (the guests' requests go on during priming
    or a reload) are collected when it ends, not frozen for good: a reload costs no memory
    for ever."""
    with heap.bulk():
        dead = [weakref.ref(Cyclic()) for _ in range(100)]
        kept = Cyclic()
    assert all(ref() is None for ref in dead)
    assert kept.me is kept


def test_overlapping_pauses_resume_once_the_last_ends() -> None:
    """A reload's thread and the loop may pause together: full collections resume only when
    both have ended, in whatever order, and a resume called twice counts once."""
    first = heap.paused()
    second: list[heap.Resume] = []
    thread = threading.Thread(target=lambda: second.append(heap.paused()))
    thread.start()
    thread.join()
    first()
    first()  # a second call of the same resume changes nothing
    assert paused_fully()
    second[0]()
    assert not paused_fully()


def test_collections_left_off_by_the_host_stay_off() -> None:
    """A process that turned collections off itself (an embedding host) keeps them off."""
    gc.disable()
    with heap.bulk():
        pass
    assert not gc.isenabled()


def test_an_exception_inside_still_resumes() -> None:
    """A start-up that fails (a bad backend, a stop) never leaves full collections paused."""
    with pytest.raises(RuntimeError), heap.bulk():
        raise RuntimeError("start-up failed")
    assert not paused_fully()


ARENAS = r"""
import ctypes, os, sys, tempfile, threading
from imdsd import heap
if sys.argv[1] == "one":
    heap.one_malloc_arena()
ready = threading.Barrier(5)
def work():
    kept = [bytearray(4096) for _ in range(64)]  # malloc, not Python's small-object pools
    ready.wait()
    ready.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
for thread in threads:
    thread.start()
ready.wait()  # every thread holds its allocations now
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
path = os.path.join(tempfile.mkdtemp(), "malloc.xml")
out = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(out))
libc.fclose(ctypes.c_void_p(out))
ready.wait()
print(open(path).read().count("<heap nr="))
"""


def test_threads_share_one_malloc_arena() -> None:
    """glibc gives each allocating thread an arena of its own, whose pages stay resident (the
    notary, the vault's writer, worker threads: ~11 MB at 10,000 instances); after
    one_malloc_arena() four threads allocating at once use the one arena."""
    if not hasattr(ctypes.CDLL(None), "malloc_info"):
        pytest.skip("not glibc: no malloc arenas to count")
    counts = {}
    for mode in ("default", "one"):
        run = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True,
                             text=True, check=True, timeout=60)  # fmt: skip
        counts[mode] = int(run.stdout)
    assert counts["one"] == 1 < counts["default"]
