"""Instances, instance profiles and associations: who is who on this host.

Owns the address -> instance map that identifies callers. Values are immutable; a change
replaces them, so readers (the request path) never see a half-made change. Never imports
aiohttp. Persistence of runtime changes (the state file) arrives with the admin API.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from datetime import datetime

from imdsd.clock import Clock
from imdsd.errors import InventoryError
from imdsd.model import Association, Instance, InstanceProfile


class Inventory:
    """The instances this host serves, the profiles it may attach, and who has which."""

    def __init__(
        self,
        instances: Iterable[Instance],
        profiles: Iterable[InstanceProfile],
        associations: Iterable[tuple[str, str]],
        clock: Clock,
    ) -> None:
        self._clock = clock
        self._instances: dict[str, Instance] = {}
        self._by_address: dict[str, Instance] = {}
        self._launched: dict[str, datetime] = {}
        self._profiles = {p.name: p for p in profiles}
        self._associations: dict[str, Association] = {}
        for instance in instances:
            self.add_instance(instance)
        for instance_id, profile_name in associations:
            self.associate(instance_id, profile_name)

    def instance_at(self, address: str) -> Instance | None:
        """The instance that owns a socket peer address (IPv4-mapped IPv6 is unwrapped)."""
        found = self._by_address.get(address)
        if found is None and address.startswith("::ffff:"):
            mapped = ipaddress.ip_address(address.partition("%")[0]).ipv4_mapped  # type: ignore[union-attr]
            if mapped is not None:
                found = self._by_address.get(str(mapped))
        return found

    def instance(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def instances(self) -> list[Instance]:
        return list(self._instances.values())

    def launched_at(self, instance_id: str) -> datetime:
        """When this host started serving the instance (EC2's pendingTime)."""
        return self._launched[instance_id]

    def profile(self, name: str) -> InstanceProfile | None:
        return self._profiles.get(name)

    def association(self, instance_id: str) -> Association | None:
        return self._associations.get(instance_id)

    def associations(self) -> list[Association]:
        return list(self._associations.values())

    def add_instance(self, instance: Instance) -> None:
        """Register an instance; its id and every address must be new."""
        if instance.id in self._instances:
            raise InventoryError(f"instance {instance.id} already exists")
        for address in instance.addresses:
            if address in self._by_address:
                owner = self._by_address[address].id
                raise InventoryError(f"address {address} already belongs to {owner}")
        self._instances[instance.id] = instance
        self._launched[instance.id] = self._clock.now()
        self._by_address.update(dict.fromkeys(instance.addresses, instance))

    def associate(self, instance_id: str, profile_name: str) -> Association:
        """EC2's AssociateIamInstanceProfile: the instance must have no association yet."""
        if instance_id in self._associations:
            current = self._associations[instance_id].profile.name
            raise InventoryError(f"instance {instance_id} already has an association ({current})")
        return self._set(instance_id, profile_name)

    def replace_association(self, instance_id: str, profile_name: str) -> Association:
        """EC2's ReplaceIamInstanceProfileAssociation: swap an associated instance's profile."""
        if instance_id not in self._associations:
            raise InventoryError(f"instance {instance_id} has no association to replace")
        return self._set(instance_id, profile_name)

    def disassociate(self, instance_id: str) -> None:
        """EC2's DisassociateIamInstanceProfile."""
        if self._associations.pop(instance_id, None) is None:
            raise InventoryError(f"instance {instance_id} has no association")

    def _set(self, instance_id: str, profile_name: str) -> Association:
        self._require_instance(instance_id)
        profile = self._profiles.get(profile_name)
        if profile is None:
            raise InventoryError(f"instance profile {profile_name!r} does not exist")
        association = Association(
            instance_id=instance_id, profile=profile, associated_at=self._clock.now()
        )
        self._associations[instance_id] = association
        return association

    def _require_instance(self, instance_id: str) -> Instance:
        instance = self._instances.get(instance_id)
        if instance is None:
            raise InventoryError(f"instance {instance_id} does not exist")
        return instance
