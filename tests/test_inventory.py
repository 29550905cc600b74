"""The inventory: who is at which address, and EC2's association rules."""

from __future__ import annotations

from dataclasses import replace

import pytest

from imdsd.errors import InventoryError
from imdsd.inventory import Inventory
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


def test_association_rules(inventory: Inventory) -> None:
    """One association per instance; replace needs one; profiles and instances must exist."""
    with pytest.raises(InventoryError, match="already has an association"):
        inventory.associate(VM_A, "profile-b")
    with pytest.raises(InventoryError, match="no association to replace"):
        inventory.replace_association(VM_D, "profile-a")
    with pytest.raises(InventoryError, match="does not exist"):
        inventory.associate(VM_D, "nope")
    with pytest.raises(InventoryError, match="does not exist"):
        inventory.associate("i-99999999", "profile-a")
    association = inventory.associate(VM_D, "profile-a")
    assert inventory.association(VM_D) is association and association.associated_at == START
    inventory.disassociate(VM_D)
    assert inventory.association(VM_D) is None
    with pytest.raises(InventoryError, match="has no association"):
        inventory.disassociate(VM_D)


def test_add_instance_refuses_duplicates(inventory: Inventory) -> None:
    """An id or an address already known is refused, and nothing is half-added."""
    a = inventory.instance(VM_A)
    assert a is not None
    with pytest.raises(InventoryError, match="already exists"):
        inventory.add_instance(a)
    with pytest.raises(InventoryError, match="already belongs to"):
        inventory.add_instance(replace(a, id="i-12345678", addresses=("127.0.0.50", "127.0.0.3")))
    assert inventory.instance("i-12345678") is None and inventory.instance_at("127.0.0.50") is None
    assert {i.id for i in inventory.instances()} == {VM_A, VM_B, "i-0cccccccccccccccc", VM_D}
    assert inventory.profile("profile-a") is not None and inventory.profile("x") is None
