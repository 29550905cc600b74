"""JSON views of the inventory and the sessions for the admin API. Pure functions; secrets never
appear (access keys by their last four characters)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

from imdsd.inventory import Inventory
from imdsd.model import Instance, InstanceProfile, key_display
from imdsd.sessions import SessionCache


def instance_view(inventory: Inventory, instance: Instance) -> dict[str, Any]:
    association = inventory.association(instance.id)
    return {
        "id": instance.id,
        "addresses": list(instance.addresses),
        "host_interface": instance.host_interface,
        "host_netns": instance.host_netns,
        "region": instance.region,
        "availability_zone": instance.availability_zone,
        "instance_type": instance.instance_type,
        "ami_id": instance.image_id,
        "hostname": instance.private_dns_name,
        "mac": instance.mac_address,
        "metadata_options": asdict(instance.options),
        "profile": association.profile.name if association else None,
        "source": inventory.origin(instance.id),
    }


def profile_view(profile: InstanceProfile) -> dict[str, Any]:
    return {
        "name": profile.name,
        "arn": profile.arn,
        "id": profile.id,
        "role_arn": profile.role.arn,
    }


def session_view(inventory: Inventory, sessions: SessionCache, instance_id: str, now: datetime,
                 due: datetime | None) -> dict[str, Any]:  # fmt: skip
    association = inventory.association(instance_id)
    served, failure = sessions.get(instance_id), sessions.failure(instance_id)
    state = sessions.state(instance_id, now)
    if served is not None and (
        association is None or served.role_arn != association.profile.role.arn
    ):
        served, state = None, "pending"  # another role's, until a batch's step drops it
    return {
        "instance": instance_id,
        "profile": association.profile.name if association else None,
        "role_arn": association.profile.role.arn if association else None,
        "access_key": key_display(served.session.access_key_id) if served else None,
        "expires": _iso(served.expiration) if served else None,
        "next_refresh": _iso(due),
        "state": state,
        "last_error": {"code": failure.code, "at": _iso(failure.at)} if failure else None,
        "source": inventory.association_origin(instance_id),
    }


def _iso(when: datetime | None) -> str | None:
    return when.isoformat().replace("+00:00", "Z") if when else None
