"""A reload as the running daemon applies it (Inventory.rebase): planned in bounded steps while
the current view serves, installed in one step, serialised with admin commits (invariant 9)."""

from __future__ import annotations

import asyncio
from collections import Counter

from imdsd.config.instances import instance_from
from imdsd.inventory import STEP, Inventory
from imdsd.model import Instance, InstanceProfile, Role
from tests.fakes import FakeClock

COUNT = 3 * STEP
PROFILES = tuple(
    InstanceProfile(name=name, path="/", id=f"AIPA{name.upper():A<17}",
                    role=Role.from_arn(f"arn:aws:iam::123456789012:role/{name}"))
    for name in ("a", "b")
)  # fmt: skip


def instances(count: int = COUNT) -> list[Instance]:
    return [instance_from({"id": f"i-{n:017x}", "addresses": [f"127.3.{n // 250}.{n % 250 + 1}"]})
            for n in range(count)]  # fmt: skip


async def _turns(counter: Counter[str], stop: asyncio.Event) -> None:
    """A stand-in for the guests: counts the turns of the loop it gets."""
    while not stop.is_set():
        counter["turns"] += 1
        await asyncio.sleep(0)


async def test_a_rebase_is_planned_in_steps_and_installed_at_once() -> None:
    """Invariant 9: the guest loop turns between the steps of a 3,000-instance reload, and
    until the one step that installs it every reader sees the whole old view; then the whole
    new one, and only the instance whose association changed is reported."""
    listed = instances()
    first = listed[0].id
    inventory = Inventory(listed, PROFILES, [(i.id, "a") for i in listed], FakeClock())
    old = inventory.association(first)
    seen: list[str] = []
    counter: Counter[str] = Counter()
    stop = asyncio.Event()

    async def reader() -> None:
        while not stop.is_set():
            association = inventory.association(first)
            seen.append(association.profile.name if association else "-")
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(_turns(counter, stop)), asyncio.create_task(reader())]
    wanted = [(i.id, "b" if i.id == first else "a") for i in listed]
    changed = await inventory.rebase(listed, PROFILES, wanted)
    stop.set()
    await asyncio.gather(*tasks)
    assert changed == {first}
    assert counter["turns"] >= COUNT // STEP  # at least a turn per step
    assert seen == sorted(seen)  # "a" (old) until the install, never back
    assert seen[0] == "a" and old is not None
    after = inventory.association(first)
    assert after is not None and after.profile.name == "b"
    assert inventory.association(listed[1].id) is not None


async def test_a_commit_racing_a_rebase_loses_neither() -> None:
    """An admin change made while a reload is being planned waits for it (one lock), then
    applies on top of the new baseline: both take effect."""
    listed = instances()
    inventory = Inventory(listed, PROFILES, [], FakeClock())
    last = listed[-1].id
    rebase = asyncio.create_task(inventory.rebase(listed, PROFILES, [(listed[0].id, "a")]))
    await asyncio.sleep(0)  # the rebase holds the lock and is between steps
    commit = asyncio.create_task(inventory.commit(lambda: inventory.associate(last, "b")))
    assert await rebase == {listed[0].id}
    assert await commit == {last}
    first, second = inventory.association(listed[0].id), inventory.association(last)
    assert first is not None and first.profile.name == "a"
    assert second is not None and second.profile.name == "b"


async def test_unchanged_values_keep_their_identity_across_a_rebase() -> None:
    """A reload of the same records changes nothing: every instance and association object is
    the one already served (caches keyed on identity stay warm), nothing is reported."""
    listed = instances(STEP + 1)
    wanted = [(i.id, "a") for i in listed]
    inventory = Inventory(listed, PROFILES, wanted, FakeClock())
    before = {i.id: (inventory.instance(i.id), inventory.association(i.id)) for i in listed}
    again = [instance_from({"id": i.id, "addresses": list(i.addresses)}) for i in listed]
    assert await inventory.rebase(again, PROFILES, wanted) == set()
    assert all(inventory.instance(k) is a and inventory.association(k) is b
               for k, (a, b) in before.items())  # fmt: skip
