"""Writing the fleet's records: reads and conditional etcd transactions, so two operators
cannot interleave (an association only where there is none, an address one host's instance
has at most ...). Every record is validated as the daemons will read it before it is written.
Used by `imdsd fleet`; the daemons only read (follower.py)."""

from __future__ import annotations

import json
from typing import Any

from imdsd.errors import ConflictError, ImdsdError, InventoryError, NotFoundError, RecordError
from imdsd.fleet.records import Layout, parse
from imdsd.model import Instance, InstanceProfile


class Writer:
    """The fleet's records as etcd reads and conditional transactions: every change is one
    transaction that holds only if etcd still has what the change expects."""

    def __init__(self, client: Any, layout: Layout) -> None:
        self.client, self.layout = client, layout
        self.t = client.transactions

    # -- reading -----------------------------------------------------------------------------

    async def profiles(self) -> list[InstanceProfile]:
        found = await self.client.get_prefix(self.layout.profiles.encode())
        return [
            r for kv in found if isinstance(r := self._parsed(kv.key, kv.value), InstanceProfile)
        ]

    async def records(self, host: str | None = None) -> dict[str, dict[str, Any]]:
        """Instances of one host (or all), each with its host and association."""
        prefix = self.layout.mine(host) if host else self.layout.hosts()
        out: dict[str, dict[str, Any]] = {}
        associations: dict[str, str] = {}
        for kv in await self.client.get_prefix(prefix.encode()):
            key = kv.key.decode(errors="replace")
            owner, _, rest = key.removeprefix(self.layout.hosts()).partition("/")
            table, _, iid = rest.partition("/")
            here = Layout(self.layout.prefix, owner)
            record = self._parsed(kv.key, kv.value, here)
            if table == "instances" and isinstance(record, Instance):
                out[iid] = {"instance": record, "host": owner}
            elif table == "associations" and isinstance(record, str):
                associations[iid] = record
        for iid, row in out.items():
            row["profile"] = associations.get(iid)
        return out

    def _parsed(self, key: bytes, value: bytes, layout: Layout | None = None) -> Any:
        try:
            return parse(layout or self.layout, key.decode(errors="replace"), value)
        except RecordError:
            return None  # the daemons warn about bad records; listings skip them

    async def locate(self, iid: str) -> dict[str, Any]:
        found = (await self.records()).get(iid)
        if found is None:
            raise NotFoundError(f"instance {iid} is on no host of the fleet")
        return found

    # -- changing ----------------------------------------------------------------------------

    async def put_if(
        self, compare: list[Any], puts: dict[str, bytes], deletes: tuple[str, ...] = (),
        *, refusal: InventoryError,
    ) -> None:  # fmt: skip
        ops = [self.t.put(k.encode(), v) for k, v in puts.items()]
        ops += [self.t.delete(k.encode()) for k in deletes]
        succeeded, _ = await self.client.transaction(compare=compare, success=ops, failure=[])
        if not succeeded:
            raise refusal

    async def add_profile(self, name: str, table: dict[str, Any]) -> InstanceProfile:
        key = self.layout.profile(name)
        profile: InstanceProfile = _validated(self.layout, key, table)
        refusal = ConflictError(f"instance profile {name!r} already exists")
        await self.put_if([self.t.version(key.encode()) == 0], {key: _json(table)}, refusal=refusal)
        return profile

    async def remove_profile(self, name: str) -> None:
        users = [i for i, row in (await self.records()).items() if row["profile"] == name]
        if users:
            raise ConflictError(f"instance profile {name!r} is associated with "
                               f"{', '.join(sorted(users))}")  # fmt: skip
        key = self.layout.profile(name)
        refusal = NotFoundError(f"instance profile {name!r} does not exist")
        await self.put_if([self.t.version(key.encode()) > 0], {}, (key,), refusal=refusal)

    async def add_instance(self, iid: str, host: str, table: dict[str, Any]) -> Instance:
        key = self.layout.instance(iid, host)
        instance: Instance = _validated(Layout(self.layout.prefix, host), key, table)
        fleet = await self.records()
        if iid in fleet:
            raise ConflictError(f"instance {iid} already exists (on host "
                               f"{fleet[iid]['host']}; remove it there first)")  # fmt: skip
        for iid, row in fleet.items():
            taken = set(row["instance"].addresses) & set(instance.addresses)
            if row["host"] == host and taken:
                raise ConflictError(f"address {taken.pop()} already belongs to {iid}")
        await self.put_if([self.t.version(key.encode()) == 0], {key: _json(table)},
                          refusal=ConflictError(f"instance {iid} already exists"))  # fmt: skip
        return instance

    async def remove_instance(self, iid: str) -> None:
        host = (await self.locate(iid))["host"]
        key = self.layout.instance(iid, host)
        await self.put_if([self.t.version(key.encode()) > 0], {},
                          (key, self.layout.association(iid, host)),
                          refusal=NotFoundError(f"instance {iid} does not exist"))  # fmt: skip

    async def associate(self, iid: str, profile: str, new: bool) -> dict[str, Any]:
        """Associate (new) or replace; what was written, with the role and the host."""
        row = await self.locate(iid)
        found = {p.name: p for p in await self.profiles()}.get(profile)
        if found is None:
            raise NotFoundError(f"instance profile {profile!r} does not exist")
        host = row["host"]
        key, instance = self.layout.association(iid, host), self.layout.instance(iid, host)
        has = self.t.version(key.encode()) == 0 if new else self.t.version(key.encode()) > 0
        refusal = ConflictError(
            f"instance {iid} already has an association ({row['profile']})"
            if new
            else f"instance {iid} has no association to replace"
        )
        await self.put_if([self.t.version(instance.encode()) > 0, has],
                          {key: _json({"profile": profile})}, refusal=refusal)  # fmt: skip
        return {"instance": iid, "profile": profile, "role_arn": found.role.arn, "host": host}

    async def disassociate(self, iid: str) -> None:
        host = (await self.locate(iid))["host"]
        key = self.layout.association(iid, host)
        await self.put_if([self.t.version(key.encode()) > 0], {}, (key,),
                          refusal=ConflictError(f"instance {iid} has no association"))  # fmt: skip


def _validated(layout: Layout, key: str, table: dict[str, Any]) -> Any:
    """The record as the daemons will read it; refused with each problem (its key path)."""
    try:
        return parse(layout, key, _json(table))
    except RecordError as exc:
        raise ImdsdError("\n".join(exc.problems)) from None


def _json(table: dict[str, Any]) -> bytes:
    return json.dumps(table, separators=(",", ":")).encode()
