"""The inventory: who is at which address, and EC2's association rules."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

import pytest

from imdsd.config.instances import instance_from, instance_table
from imdsd.errors import (  # the base of NotFoundError and ConflictError
    ConfigError,
    InventoryError,
    StateError,
)
from imdsd.inventory import Inventory
from imdsd.model import MetadataOptions
from imdsd.state import StateFile
from tests.fakes import START, FakeClock
from tests.helpers import VM_A, VM_B, VM_D, make_config


@pytest.fixture
def inventory() -> Inventory:
    config = make_config()
    return Inventory(config.instances, config.profiles, config.associations, FakeClock())


def test_lookup_by_address(inventory: Inventory) -> None:
    """Every configured address finds its instance; IPv4-mapped IPv6 peers are unwrapped."""
    assert inventory.instance_at("127.0.0.2").id == VM_A  # type: ignore[union-attr]
    assert inventory.instance_at("::1").id == VM_B  # type: ignore[union-attr]
    assert inventory.instance_at("::ffff:127.0.0.2").id == VM_A  # type: ignore[union-attr]
    assert inventory.instance_at("::ffff:127.0.0.99") is None
    assert inventory.instance_at("127.0.0.99") is None
    assert inventory.launched_at(VM_A) == START


async def test_association_rules(inventory: Inventory) -> None:
    """One association per instance; replace needs one; profiles and instances must exist."""
    with pytest.raises(InventoryError, match="already has an association"):
        await inventory.commit(lambda: inventory.associate(VM_A, "profile-b"))
    with pytest.raises(InventoryError, match="no association to replace"):
        await inventory.commit(lambda: inventory.replace_association(VM_D, "profile-a"))
    with pytest.raises(InventoryError, match="does not exist"):
        await inventory.commit(lambda: inventory.associate(VM_D, "nope"))
    with pytest.raises(InventoryError, match="does not exist"):
        await inventory.commit(lambda: inventory.associate("i-99999999", "profile-a"))
    assert await inventory.commit(lambda: inventory.associate(VM_D, "profile-a")) == {VM_D}
    association = inventory.association(VM_D)
    assert association is not None and association.associated_at == START
    assert await inventory.commit(lambda: inventory.disassociate(VM_D)) == {VM_D}
    assert inventory.association(VM_D) is None
    with pytest.raises(InventoryError, match="has no association"):
        await inventory.commit(lambda: inventory.disassociate(VM_D))


async def test_add_instance_refuses_duplicates(inventory: Inventory) -> None:
    """An id or an address already known is refused, and nothing is half-added."""
    a = inventory.instance(VM_A)
    assert a is not None
    with pytest.raises(InventoryError, match="already exists"):
        await inventory.commit(lambda: inventory.add_instance(a))
    clash = replace(a, id="i-12345678", addresses=("127.0.0.50", "127.0.0.3"))
    with pytest.raises(InventoryError, match="already belongs to"):
        await inventory.commit(lambda: inventory.add_instance(clash))
    assert inventory.instance("i-12345678") is None and inventory.instance_at("127.0.0.50") is None
    assert {i.id for i in inventory.instances()} == {VM_A, VM_B, "i-0cccccccccccccccc", VM_D}
    assert inventory.profile("profile-a") is not None and inventory.profile("x") is None


def state_inventory(
    tmp_path: Path, clock: FakeClock | None = None, config_extra: str = ""
) -> Inventory:
    config = make_config(config_extra)
    return Inventory(config.instances, config.profiles, config.associations, clock or FakeClock(),
                     StateFile(tmp_path))  # fmt: skip


async def test_runtime_changes_survive_a_restart(tmp_path: Path) -> None:
    """Invariant 6: what the admin API changed is there again after a restart, and each
    record says where it comes from."""
    first = state_inventory(tmp_path)
    a = first.instance(VM_A)
    assert a is not None
    added = replace(a, id="i-12345678", addresses=("127.0.0.60",))
    options = MetadataOptions(http_tokens="required", hop_limit=2)
    await first.commit(lambda: first.add_instance(added))
    await first.commit(lambda: first.associate("i-12345678", "profile-b"))
    await first.commit(lambda: first.remove_instance("i-0cccccccccccccccc"))
    await first.commit(lambda: first.set_options(VM_A, options))
    await first.commit(lambda: first.disassociate(VM_B))
    again = state_inventory(tmp_path)
    assert again.instance_at("127.0.0.60").id == "i-12345678"  # type: ignore[union-attr]
    assert again.association("i-12345678").profile.name == "profile-b"  # type: ignore[union-attr]
    assert again.instance("i-0cccccccccccccccc") is None and again.association(VM_B) is None
    assert again.instance(VM_A).options.hop_limit == 2  # type: ignore[union-attr]
    assert (again.origin("i-12345678"), again.origin(VM_A), again.origin(VM_D)) == (
        "runtime",
        "modified",
        "config",
    )
    assert (again.association_origin(VM_B), again.association_origin(VM_A)) == ("runtime", "config")


async def test_failed_write_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that dies before the rename (a crash, a full disk) leaves the old file intact
    and the live view unchanged: nothing is acknowledged that was not stored."""
    inventory = state_inventory(tmp_path)
    await inventory.commit(lambda: inventory.associate(VM_D, "profile-a"))
    before = (tmp_path / "state.json").read_text()

    def crash(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StateError, match="No space left"):
        await inventory.commit(lambda: inventory.disassociate(VM_D))
    assert (tmp_path / "state.json").read_text() == before
    assert inventory.association(VM_D) is not None


async def test_a_change_takes_effect_only_through_commit(tmp_path: Path) -> None:
    """A change alone only plans: validated, it changes neither the live view nor the state
    file until commit() persists and applies it, one at a time."""
    inventory = state_inventory(tmp_path)
    inventory.associate(VM_D, "profile-a")
    assert inventory.association(VM_D) is None and not (tmp_path / "state.json").exists()
    assert await inventory.commit(lambda: inventory.associate(VM_D, "profile-a")) == {VM_D}
    assert inventory.association(VM_D) is not None and (tmp_path / "state.json").exists()


def test_unreadable_state_is_a_clear_error(tmp_path: Path) -> None:
    """A corrupt state file stops start-up with its path, like a bad config (exit 3), rather
    than silently losing state; a file that cannot be read at all is a StateError."""
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"state\.json: got text that is not JSON"):
        state_inventory(tmp_path)
    (tmp_path / "state.json").write_bytes(b"\xff\xfe")
    with pytest.raises(StateError, match=r"state\.json"):
        state_inventory(tmp_path)


async def test_reload_keeps_unchanged_associations(tmp_path: Path) -> None:
    """A new baseline keeps the association objects (and LastUpdated) that did not change,
    reports the ones that did, and still applies the runtime overrides."""
    clock = FakeClock()
    inventory = state_inventory(tmp_path, clock)
    await inventory.commit(lambda: inventory.associate(VM_D, "profile-b"))
    kept = inventory.association(VM_A)
    clock.advance(timedelta(hours=1))
    base = make_config()
    changed = inventory.reload(base.instances, base.profiles, base.associations[:1])
    assert changed == {VM_B}
    assert inventory.association(VM_A) is kept and inventory.association(VM_B) is None
    assert inventory.association(VM_D).profile.name == "profile-b"  # type: ignore[union-attr]


async def test_removed_config_instance_stays_removed(tmp_path: Path) -> None:
    """Removing an instance that the config defines is remembered across restarts."""
    removed = state_inventory(tmp_path)
    await removed.commit(lambda: removed.remove_instance(VM_A))
    again = state_inventory(tmp_path)
    assert again.instance(VM_A) is None and again.instance_at("127.0.0.2") is None
    with pytest.raises(InventoryError, match="does not exist"):
        await again.commit(lambda: again.remove_instance(VM_A))


def test_state_records_are_validated_like_the_config(tmp_path: Path) -> None:
    """A hand-edited state file is checked by the config's own parsers: every bad record is
    one problem naming the file and its key path (never handed to setsockopt)."""
    (tmp_path / "state.json").write_text(json.dumps({
        "version": 2,
        "added": {
            "i-0eeeeeeeeeeeeeeee": {"id": "i-0eeeeeeeeeeeeeeee", "addresses": ["127.0.0.66"],
                                    "metadata_options": {"hop_limit": 0}},
            "i-0fffffffffffffff0": {"id": "i-0fffffffffffffff0", "addresses": ["127.0.0.67"], "colour": "red"},
        },
        "removed": ["not-an-id"],
        "options": {"bogus": {"http_tokens": "required"}},
        "associations": {VM_D: "no spaces allowed"},
    }))  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        state_inventory(tmp_path)
    where = str(tmp_path / "state.json")
    assert [str(p) for p in caught.value.problems] == [
        f"{where}: added.i-0eeeeeeeeeeeeeeee.metadata_options.hop_limit: got 0; allowed: an integer from 1 to 64",
        f"{where}: added.i-0fffffffffffffff0.colour: got an unknown key; allowed: id, addresses, host_interface, host_netns, region, availability_zone, instance_type, ami_id, hostname, mac, account_id, metadata_options, tags, network_interfaces, public_keys, block_device_mapping, user_data, user_data_base64, user_data_file",
        f'{where}: removed: got ["not-an-id"]; allowed: a list of instance ids',
        f'{where}: options.bogus: got a name that is no instance id; allowed: "i-" + 8 or 17 hex digits',
        f'{where}: associations.{VM_D}: got "no spaces allowed"; allowed: a profile name, or null',
    ]


NEWER_THAN_V1 = ("network_interfaces", "public_keys", "block_devices")


async def test_state_round_trip_and_version_1(tmp_path: Path) -> None:
    """What save() writes, load() reads back as the same overrides; a version-1 file (instances
    as dataclass dicts) is read too."""
    inventory = state_inventory(tmp_path)
    template = inventory.instance(VM_D)
    assert template is not None
    added = instance_from(instance_table(template) | {
        "id": "i-0eeeeeeeeeeeeeeee", "addresses": ["127.0.0.66", "fd00::66"],
        "metadata_options": {"http_tokens": "optional", "hop_limit": 3}})  # fmt: skip
    await inventory.commit(lambda: inventory.add_instance(added))
    await inventory.commit(lambda: inventory.remove_instance(VM_A))
    await inventory.commit(lambda: inventory.associate(added.id, "profile-b"))
    again = state_inventory(tmp_path)
    assert again.instance(added.id) == added and again.instance(VM_A) is None
    v1 = {k: v for k, v in asdict(added).items() if k not in NEWER_THAN_V1}  # as v1 wrote it
    old = {"version": 1, "added": {added.id: {**v1, "addresses": list(added.addresses)}},
           "removed": [], "options": {}, "associations": {}}  # fmt: skip
    (tmp_path / "state.json").write_text(json.dumps(old))
    assert state_inventory(tmp_path).instance(added.id) == added


@pytest.mark.parametrize("umask", [0o000, 0o077])
async def test_state_modes_do_not_depend_on_the_umask(tmp_path: Path, umask: int) -> None:
    """The state folder is 0750 and the file 0640, whatever the process umask."""
    previous = os.umask(umask)
    try:
        inventory = state_inventory(tmp_path / "state")
        await inventory.commit(lambda: inventory.associate(VM_D, "profile-b"))
    finally:
        os.umask(previous)
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "state" / "state.json").stat().st_mode & 0o777 == 0o640


async def test_remove_then_add_applies_the_added_record(tmp_path: Path) -> None:
    """The libvirt hook's stop/start: `instances remove` of a config instance, then `add` of
    the same id with a new address. The added record is what is served (new address yes,
    old address no), also after a restart."""
    inventory = state_inventory(tmp_path)
    config_record = inventory.instance(VM_D)
    assert config_record is not None
    await inventory.commit(lambda: inventory.remove_instance(VM_D))
    moved = instance_from(instance_table(config_record) | {"addresses": ["127.0.0.77"]})
    await inventory.commit(lambda: inventory.add_instance(moved))
    for view in (inventory, state_inventory(tmp_path)):
        assert view.instance(VM_D) == moved and view.origin(VM_D) == "runtime"
        assert view.instance_at("127.0.0.77") == moved and view.instance_at("127.0.0.5") is None
