"""Trees at scale: a host keeps the trees of the guests reading lately, each sharing what
instances have in common, so 10,000 guests that booted do not cost 10,000 trees."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime

from imdsd.clock import SystemClock
from imdsd.imds.tree import PREPARE_STEP, Documents, Signed, TreeCache
from imdsd.inventory import Inventory
from imdsd.model import Instance
from tests.helpers import VM_A, make_config

PENDING = datetime(2026, 1, 1, tzinfo=UTC)


class Unsigned:
    """A notary that is never asked for signatures here (the trees' memory is the point)."""

    async def signatures(self, instance_id: str, document: bytes, region: str) -> Signed:
        raise AssertionError("not read here")

    def prepare(self, instance_ids: Iterable[str], documents: Documents) -> None: ...
    def hurry(self, instance_id: str, document: bytes, region: str) -> None: ...
    def forget(self, instance_ids: Iterable[str]) -> None: ...
    def start(self, *, held: bool = False) -> None: ...
    def resume(self) -> None: ...
    def close(self) -> None: ...


def instances(count: int) -> list[Instance]:
    """`count` instances like VM A, each its own id, address, MAC and network ids."""
    template = next(i for i in make_config().instances if i.id == VM_A)
    return [
        replace(template, id=f"i-{n:017x}", addresses=(a,), local_ipv4=a)
        for n, a in ((n, f"127.1.{n // 250}.{n % 250 + 1}") for n in range(count))
    ]


def allocated(trees: TreeCache, guests: list[Instance]) -> int:
    """Bytes still allocated after building (and keeping) the trees of `guests` (tracemalloc
    runs for the whole test: what it frees was traced too)."""
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    for guest in guests:
        trees.get(guest, None, PENDING)
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - before


def test_trees_share_listings_and_common_leaves() -> None:
    """Two instances' trees hold one object for each listing and common value they share;
    their own values stay their own."""
    one, two = instances(2)
    trees = TreeCache(Unsigned())
    a, b = trees.get(one, None, PENDING), trees.get(two, None, PENDING)
    for path in ("", "meta-data", "dynamic/instance-identity", "meta-data/placement/region",
                 "meta-data/instance-type", "meta-data/block-device-mapping/root"):  # fmt: skip
        assert a.nodes[path] is b.nodes[path], path
    assert a.nodes["meta-data/instance-id"] != b.nodes["meta-data/instance-id"]


def test_a_host_keeps_only_the_trees_of_guests_reading_lately() -> None:
    """Shared parts save over a kilobyte a tree (measured: ~6.0 KB a tree against ~7.1 KB
    unshared, tracemalloc's view); past the trees kept, an extra guest costs no tree (~90 bytes
    measured): the oldest built goes, and is rebuilt if it reads again."""
    kept = 200
    guests = instances(3 * kept)
    tracemalloc.start()
    try:
        trees = measured(guests, kept)
    finally:
        tracemalloc.stop()
    assert len(trees) == kept
    oldest = guests[kept * 2]
    assert trees.get(oldest, None, PENDING) is trees.get(oldest, None, PENDING)


def measured(guests: list[Instance], kept: int) -> TreeCache:
    trees = TreeCache(Unsigned(), kept)
    trees.get(guests[0], None, PENDING)  # the shared table's first entries
    per_tree = allocated(trees, guests[1:kept]) / (kept - 1)
    unshared = TreeCache(Unsigned(), kept)
    unshared._shared = _Forgetful()
    per_unshared = allocated(unshared, guests[1:kept]) / (kept - 1)
    assert per_tree < per_unshared - 1_000, (per_tree, per_unshared)
    per_extra = allocated(trees, guests[kept:]) / (2 * kept)
    assert per_extra < 200, per_extra  # its MAC's listing in the shared table, until it is full
    return trees


class _Forgetful(dict[bytes, bytes]):
    """A shared table that shares nothing: what trees cost without it."""

    def setdefault(self, key: bytes, default: bytes | None = None) -> bytes:
        return key


class Recording(Unsigned):
    """A notary that records what it is handed, per call."""

    def __init__(self) -> None:
        self.handed: list[list[tuple[str, bytes, str]]] = []

    def prepare(self, instance_ids: Iterable[str], documents: Documents) -> None:
        self.handed.append(list(documents()))


async def test_a_large_change_reaches_the_notary_in_steps() -> None:
    """Behind a change of many instances (an etcd load, a reload), their documents reach the
    notary PREPARE_STEP instances a turn of the loop, never in the turn of the change, and
    every instance that is still there is handed over, as its records are when handed."""
    count = 2 * PREPARE_STEP + 3
    config = make_config()
    guests = instances(count)
    inventory = Inventory(guests, config.profiles, (), SystemClock())
    notary = Recording()
    TreeCache(notary).prepare_soon(inventory, [g.id for g in guests])
    assert notary.handed == []
    sizes = []
    for _ in range(3):
        await asyncio.sleep(0)
        sizes.append(sum(len(h) for h in notary.handed))
    assert sizes == [PREPARE_STEP, 2 * PREPARE_STEP, count]
    handed = [entry for h in notary.handed for entry in h]
    assert [i for i, _, _ in handed] == [g.id for g in guests]
    assert all(f'"{i}"'.encode() in document for i, document, _ in handed)
