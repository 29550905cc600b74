"""Trees at scale: a host keeps the trees of the guests reading lately, each sharing what
instances have in common, so 10,000 guests that booted do not cost 10,000 trees."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime

from imdsd.imds.tree import Documents, Signed, TreeCache
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
