"""An etcd batch costs what it changes: one record parsed per event, no re-sort of the mirror,
and the daemon's loop turning between the steps of the baseline (invariant 9)."""

from __future__ import annotations

import json

import pytest

from imdsd.fleet import records
from imdsd.fleet.records import STEP, Layout, Mirror

LAYOUT = Layout("/imdsd", "h1")
COUNT = 2 * STEP


def loaded() -> Mirror:
    """COUNT instances and their associations, loaded at revisions 2.. (the profile at 1)."""
    mirror = Mirror(LAYOUT)
    rows = {LAYOUT.profile("p"): (1, b'{"role_arn": "arn:aws:iam::123456789012:role/r"}')}
    for n in range(COUNT):
        iid = f"i-{n:017x}"
        table = {"addresses": [f"127.4.{n // 250}.{n % 250 + 1}"]}
        rows[LAYOUT.instance(iid)] = (2 + 2 * n, json.dumps(table).encode())
        rows[LAYOUT.association(iid)] = (3 + 2 * n, b'{"profile": "p"}')
    mirror.reset(dict(sorted(rows.items())), 2 * COUNT + 2)  # etcd answers in key order
    return mirror


def test_a_batch_of_one_parses_one_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """A changed record is parsed, and only it; making the baseline parses nothing and, with
    the records already in creation order, sorts nothing."""
    mirror = loaded()
    mirror.baseline()  # the load's one sort
    parsed: list[str] = []
    parse = records.parse

    def counted(layout: Layout, key: str, value: bytes) -> records.Record:
        parsed.append(key)
        return parse(layout, key, value)

    monkeypatch.setattr(records, "parse", counted)
    monkeypatch.setattr(records, "sorted", lambda *a, **k: pytest.fail("re-sorted"), raising=False)
    key = LAYOUT.association("i-00000000000000005")
    mirror.put(key, b'{"profile": "p"}', 13)  # the same value: nothing to do
    mirror.put(key, b'{"profile": "q"}', 13)
    instances, _, associations = mirror.baseline()
    assert parsed == [key]
    assert len(instances) == COUNT and len(associations) == COUNT - 1  # "q" is unknown


def test_a_new_record_keeps_the_older_claim_without_a_sort() -> None:
    """A new instance claiming a taken address waits behind the older record (creation order
    kept as records come), and a record created earlier but learned later (a cache) is put
    in its place by one sort."""
    mirror = loaded()
    taken = json.dumps({"addresses": ["127.4.0.1"]}).encode()
    mirror.put(LAYOUT.instance("i-0ffffffffffffffff"), taken, 10 * COUNT)
    instances, _, _ = mirror.baseline()
    assert "i-0ffffffffffffffff" not in {i.id for i in instances}
    mirror.delete(LAYOUT.instance("i-00000000000000000"))
    mirror.put(LAYOUT.instance("i-00000000000000000"), taken, 1)  # older than everything
    instances, _, _ = mirror.baseline()
    assert "i-00000000000000000" in {i.id for i in instances}
    assert "i-0ffffffffffffffff" not in {i.id for i in instances}


def test_the_baseline_is_made_in_steps() -> None:
    """The daemon turns its loop between steps of STEP records (FleetSource drives them)."""
    steps = sum(1 for _ in loaded().baseline_in_steps())
    assert steps >= (2 * COUNT) // STEP
