"""An etcd batch applied as a patch (its own records only) leaves the inventory exactly as a
whole rebuild from every record would: the same instances, addresses, profiles and
associations, the same ids reported changed; and a batch of one touches O(1) of it."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from imdsd.fleet.records import Layout, Mirror
from imdsd.inventory import Inventory
from tests.fakes import FakeClock

LAYOUT = Layout("/imdsd", "h1")
IDS = [f"i-{n:017x}" for n in range(1, 7)]
ADDRESSES = ["127.5.0.1", "127.5.0.2", "127.5.0.3", "127.5.0.4"]
PROFILES = ["a", "b", "c"]
ROLE = "arn:aws:iam::123456789012:role/{}"

instance_value = st.fixed_dictionaries(
    {"addresses": st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=2, unique=True)},
    optional={"instance_type": st.sampled_from(["t3.micro", "m5.large"])},
).map(json.dumps)
operation = st.one_of(
    st.tuples(st.just("instance"), st.sampled_from(IDS), st.none() | instance_value),
    st.tuples(st.just("association"), st.sampled_from(IDS),
              st.none() | st.sampled_from(PROFILES).map(lambda p: json.dumps({"profile": p}))),
    st.tuples(st.just("profile"), st.sampled_from(PROFILES),
              st.none() | st.sampled_from(["r1", "r2"]).map(
                  lambda r: json.dumps({"role_arn": ROLE.format(r)}))),
    st.just(("bad", IDS[0], "{not json")),
)  # fmt: skip
batches = st.lists(st.lists(operation, min_size=1, max_size=6), min_size=1, max_size=8)


def write(mirrors: tuple[Mirror, ...], created: dict[str, int], revision: int,
          op: tuple[str, str, str | None]) -> None:  # fmt: skip
    """As etcd writes: a key keeps its create revision until it is deleted."""
    what, name, value = op
    keys: dict[str, Callable[[str], str]] = {
        "instance": LAYOUT.instance, "association": LAYOUT.association,
        "profile": LAYOUT.profile, "bad": LAYOUT.instance,
    }  # fmt: skip
    key = keys[what](name)
    for mirror in mirrors:
        if value is None:
            mirror.delete(key)
        else:
            mirror.put(key, value.encode(), created.setdefault(key, revision))
    if value is None:
        created.pop(key, None)


def view(inventory: Inventory) -> object:
    """Everything a guest or the rotator reads, by value (datetimes aside)."""
    return (
        sorted((i.id, i.addresses, i.instance_type) for i in inventory.instances()),
        sorted((p.name, p.role.arn) for p in inventory.profiles()),
        sorted(
            (a.instance_id, a.profile.name, a.profile.role.arn) for a in inventory.associations()
        ),
        {a: (found.id if (found := inventory.instance_at(a)) else None) for a in ADDRESSES},
    )


@settings(max_examples=300, deadline=None)
@given(batches)
def test_a_patched_inventory_is_the_rebuilt_one(
    batches: list[list[tuple[str, str, str | None]]],
) -> None:
    """Whatever the batches (records coming, changing, going, bad ones, addresses claimed
    twice, associations to unknown profiles), each patch gives the view and the changed ids
    a whole rebuild gives; where only a rebuild can tell (a claim contested), patch() says so."""
    clock = FakeClock()
    patched, whole = Mirror(LAYOUT), Mirror(LAYOUT)
    left = Inventory(*patched.baseline(), clock, managed_by="etcd")
    right = Inventory(*whole.baseline(), clock, managed_by="etcd")
    revision, created = 1, dict[str, int]()
    for batch in batches:
        for op in batch:
            revision += 1
            write((patched, whole), created, revision, op)
        patch = patched.patch()
        before = {a.instance_id: a for a in left.associations()}
        if patch is None:
            changed_left = left.reload(*patched.baseline())
        else:
            changed_left = left.patch(patch)
        changed_right = right.reload(*whole.baseline())
        assert view(left) == view(right)
        assert changed_left == changed_right
        for association in left.associations():  # unchanged ones keep their identity
            if association.instance_id not in changed_left:
                assert before.get(association.instance_id) is association
        for instance in left.instances():
            assert isinstance(left.launched_at(instance.id), datetime)
            assert left.token_subject(instance.id)


def test_a_batch_of_one_is_a_patch_of_one() -> None:
    """With 1,000 instances loaded, one changed association is a patch naming that instance
    alone (no whole rebuild), applied as that one change."""
    mirror = Mirror(LAYOUT)
    mirror.put(LAYOUT.profile("a"), json.dumps({"role_arn": ROLE.format("r1")}).encode(), 1)
    mirror.put(LAYOUT.profile("b"), json.dumps({"role_arn": ROLE.format("r2")}).encode(), 2)
    ids = [f"i-{n:017x}" for n in range(1000)]
    for n, iid in enumerate(ids):
        table = {"addresses": [f"127.6.{n // 250}.{n % 250 + 1}"]}
        mirror.put(LAYOUT.instance(iid), json.dumps(table).encode(), 3 + 2 * n)
        mirror.put(LAYOUT.association(iid), b'{"profile": "a"}', 4 + 2 * n)
    inventory = Inventory(*mirror.baseline(), FakeClock(), managed_by="etcd")
    mirror.put(LAYOUT.association(ids[7]), b'{"profile": "b"}', 5000)
    patch = mirror.patch()
    assert patch is not None
    assert (patch.instances, patch.associations) == ({}, {ids[7]: "b"})
    assert inventory.patch(patch) == {ids[7]}
    association = inventory.association(ids[7])
    assert association is not None and association.profile.name == "b"
