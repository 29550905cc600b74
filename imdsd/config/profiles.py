"""[[instance_profiles]] and [[associations]]: the roles this host may attach, and who has
which (the same tables come from etcd records on a fleet)."""

from __future__ import annotations

import base64
import hashlib
import re

from imdsd.config.converters import (
    listed,
    matching,
    role_arn,
)
from imdsd.config.reader import Section, show
from imdsd.model import (
    IAM_NAME,
    IAM_PATH,
    PROFILE_ID,
    Instance,
    InstanceProfile,
)

EXTERNAL_ID = re.compile(r"[\w+=,.@:/-]{2,1224}", re.ASCII)


def profiles(entries: list[Section]) -> tuple[InstanceProfile, ...]:
    out: dict[str, InstanceProfile] = {}
    for t in entries:
        name = t.require("name", matching(IAM_NAME), "an IAM name: 1-128 of A-Z a-z 0-9 +=,.@_-")
        role = t.require("role_arn", role_arn, "a role ARN: arn:aws:iam::123456789012:role/NAME")
        iam_path = t.take("path", matching(IAM_PATH), "/", 'an IAM path: "/" or "/a/b/"')
        given_id = t.take("id", matching(PROFILE_ID), None, '"AIPA" followed by 17 of A-Z 0-9')
        external_id = t.take(
            "external_id", matching(EXTERNAL_ID), None, "2-1224 of A-Z a-z 0-9 +=,.@:/-"
        )
        if name is None or role is None:
            continue
        if name in out:
            t.problem("name", show(name), "a name no other instance profile has")
            continue
        profile_id = given_id or _derived_profile_id(role.account_id, name)
        out[name] = InstanceProfile(
            name=name, path=iam_path, role=role, id=profile_id, external_id=external_id
        )
    return tuple(out.values())


def associations(
    entries: list[Section], instances: tuple[Instance, ...], profiles: tuple[InstanceProfile, ...]
) -> tuple[tuple[str, str], ...]:
    # the records' own strings, so an association keeps no second copy of either
    known_instances = {i.id: i.id for i in instances}
    known_profiles = {p.name: p.name for p in profiles}
    out: dict[str, str] = {}
    for t in entries:
        iid = t.require("instance", str, "the id of an instance in [[instances]]")
        name = t.require("profile", str, "the name of a profile in [[instance_profiles]]")
        if iid is not None and iid not in known_instances:
            t.problem("instance", show(iid), listed(known_instances, "instance ids"))
        elif iid in out:
            t.problem(
                "instance", show(iid), f"an instance without an association (it has {out[iid]!r})"
            )
        if name is not None and name not in known_profiles:
            t.problem("profile", show(name), listed(known_profiles, "instance profile names"))
        elif iid in known_instances and iid not in out and name is not None:
            out[known_instances[iid]] = known_profiles[name]
    return tuple(out.items())


def _derived_profile_id(account: str, name: str) -> str:
    """A stable AIPA id for a profile configured without one (IAM ids are opaque)."""
    digest = base64.b32encode(hashlib.sha256(f"{account}/{name}".encode()).digest()).decode()
    return "AIPA" + digest[:17]
