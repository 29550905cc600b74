"""`imdsd fleet`: the fleet's records, written straight to etcd from any machine (no daemon).

The same verbs, flags and output as the admin CLI, with EC2's names: profiles add/remove/list,
instances add/remove/show/list (`--host` says which hypervisor runs the VM), associate,
replace-association, disassociate. Every record is validated as the config file's tables are
before it is written, and every write is one etcd transaction conditioned on what it expects
(an association only where there is none, ...), so two operators cannot interleave.
Exit status: 0 done, 1 refused (invalid, unknown, conflict), 3 bad config, 4 etcd unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from imdsd.admin.views import profile_view
from imdsd.cli.admin import instance_body, instance_flags
from imdsd.cli.tables import instances_table, profiles_table, record
from imdsd.config import load
from imdsd.config.instances import instance_table
from imdsd.config.inventory import EtcdConfig, endpoint, read_client_files
from imdsd.errors import (
    ConfigError,
    ConflictError,
    ImdsdError,
    InventoryError,
    NotFoundError,
    RecordError,
)
from imdsd.fleet.records import Layout, parse
from imdsd.model import Instance, InstanceProfile

EXIT_REFUSED, EXIT_CONFIG, EXIT_UNAVAILABLE = 1, 3, 4
DEFAULT_CONFIG = Path("/etc/imdsd/imdsd.toml")


def add_commands(commands: Any) -> None:
    """Register `fleet` and its verbs on the CLI's subparsers."""
    fleet = commands.add_parser("fleet", help="the fleet's records in etcd (no daemon needed)")
    where = f"read [inventory.etcd] from this file (default {DEFAULT_CONFIG})"
    fleet.add_argument("--config", type=Path, help=where)
    fleet.add_argument("--endpoint", action="append", type=endpoint, metavar="URL",
                       help="an etcd URL (repeat); overrides the config's endpoints")  # fmt: skip
    fleet.add_argument("--prefix", help="the fleet's key prefix (default /imdsd)")
    fleet.add_argument("--json", action="store_true", help="print JSON instead of a table")
    verbs = fleet.add_subparsers(dest="fleet_verb", required=True)
    profiles = verbs.add_parser("profiles", help="instance profiles, fleet-wide")
    p = profiles.add_subparsers(dest="verb", required=True)
    p.add_parser("list", help="every instance profile")
    add = p.add_parser("add", help="create an instance profile (one role)")
    add.add_argument("--name", required=True, help="the profile's name")
    add.add_argument("--role-arn", required=True, help="arn:aws:iam::ACCOUNT:role/NAME")
    add.add_argument("--path", help='an IAM path (default "/")')
    add.add_argument("--id", help="AIPA + 17 (default: derived from the account and name)")
    add.add_argument("--external-id", help="AssumeRole's ExternalId for this role")
    p.add_parser("remove", help="delete a profile no association uses").add_argument(
        "name", help="the profile's name"
    )
    instances = verbs.add_parser("instances", help="instances (VMs), per host")
    i = instances.add_subparsers(dest="verb", required=True)
    i.add_parser("list", help="every instance, its host and profile").add_argument(
        "--host", help="only this host's"
    )
    add = i.add_parser("add", help="register an instance on a host")
    add.add_argument("--host", required=True, help="the hypervisor that runs the VM")
    instance_flags(add)
    for name, text in (("show", "one instance in full"), ("remove", "forget an instance")):
        i.add_parser(name, help=text).add_argument("instance_id", help='"i-" + 17 hex digits')
    for name, text in (
        ("associate", "attach an instance profile (EC2's AssociateIamInstanceProfile)"),
        ("replace-association", "swap the profile (EC2's ReplaceIamInstanceProfileAssociation)"),
    ):
        verb = verbs.add_parser(name, help=text)
        verb.add_argument("--instance", required=True, help="the instance id")
        verb.add_argument("--profile", required=True, help="an instance profile of the fleet")
    verbs.add_parser("disassociate", help="remove an instance's association").add_argument(
        "--instance", required=True, help="the instance id"
    )


def run(args: argparse.Namespace) -> int:
    """Execute one fleet verb against etcd; print the result; map failures to exit codes."""
    try:
        config = _etcd_config(args)
        read_client_files(config)  # an unreadable TLS or password file is bad config, not etcd's
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"imdsd: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        result, show = asyncio.run(_execute(config, args))
    except (NotFoundError, ConflictError) as exc:  # the same codes as the admin API's
        print(f"imdsd: {exc.code}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except ImdsdError as exc:  # includes a ConfigError of the record (each line its key)
        for line in str(exc).splitlines():
            print(f"imdsd: InvalidParameterValue: {line}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as exc:
        where = ", ".join(str(e) for e in config.endpoints)
        print(f"imdsd: etcd unreachable at {where} ({exc.__class__.__name__})", file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(json.dumps(result, indent=2) if args.json else show(result))
    return 0


def _etcd_config(args: argparse.Namespace) -> EtcdConfig:
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    config = load(path).inventory.etcd if path else EtcdConfig()
    if args.endpoint:
        config = replace(config, endpoints=tuple(args.endpoint))
    if args.prefix:
        config = replace(config, prefix=args.prefix.rstrip("/"))
    return config


async def _execute(config: EtcdConfig, args: argparse.Namespace) -> tuple[Any, Any]:
    from imdsd.fleet.client import open_client

    client = open_client(config)
    await client.connect()
    try:
        fleet = Fleet(client, Layout(config.prefix, ""))
        verb = (args.fleet_verb, getattr(args, "verb", None))
        return await fleet.do(verb, args)
    finally:
        await client.close()


class Fleet:
    """The verbs, as etcd reads and conditional transactions."""

    def __init__(self, client: Any, layout: Layout) -> None:
        self.client, self.layout = client, layout
        self.t = client.transactions

    async def do(self, verb: tuple[str, str | None], args: argparse.Namespace) -> tuple[Any, Any]:
        iid = getattr(args, "instance", None) or getattr(args, "instance_id", None) or ""
        match verb:
            case ("profiles", "list"):
                return [profile_view(p) for p in await self.profiles()], profiles_table
            case ("profiles", "add"):
                return await self.add_profile(args), record
            case ("profiles", "remove"):
                await self.remove_profile(args.name)
                return None, _said("removed", args.name)
            case ("instances", "list"):
                return await self.instances(args.host), _instances_table
            case ("instances", "add"):
                return await self.add_instance(args), record
            case ("instances", "show"):
                return await self.show(iid), record
            case ("instances", "remove"):
                await self.remove_instance(iid)
                return None, _said("removed", iid)
            case ("associate", _) | ("replace-association", _):
                return await self.associate(iid, args.profile, verb[0] == "associate"), record
            case _:
                await self.disassociate(iid)
                return None, _said("disassociated", iid)

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

    async def add_profile(self, args: argparse.Namespace) -> dict[str, Any]:
        table = {"name": args.name, "role_arn": args.role_arn, "path": args.path, "id": args.id,
                 "external_id": args.external_id}  # fmt: skip
        table = {k: v for k, v in table.items() if v is not None}
        key = self.layout.profile(args.name)
        profile = _validated(self.layout, key, table)
        refusal = ConflictError(f"instance profile {args.name!r} already exists")
        await self.put_if([self.t.version(key.encode()) == 0], {key: _json(table)}, refusal=refusal)
        return profile_view(profile)

    async def remove_profile(self, name: str) -> None:
        users = [i for i, row in (await self.records()).items() if row["profile"] == name]
        if users:
            raise ConflictError(f"instance profile {name!r} is associated with "
                               f"{', '.join(sorted(users))}")  # fmt: skip
        key = self.layout.profile(name)
        refusal = NotFoundError(f"instance profile {name!r} does not exist")
        await self.put_if([self.t.version(key.encode()) > 0], {}, (key,), refusal=refusal)

    async def add_instance(self, args: argparse.Namespace) -> dict[str, Any]:
        table = instance_body(args) or {}
        key = self.layout.instance(args.id, args.host)
        instance = _validated(Layout(self.layout.prefix, args.host), key, table)
        fleet = await self.records()
        if args.id in fleet:
            raise ConflictError(f"instance {args.id} already exists (on host "
                               f"{fleet[args.id]['host']}; remove it there first)")  # fmt: skip
        for iid, row in fleet.items():
            taken = set(row["instance"].addresses) & set(instance.addresses)
            if row["host"] == args.host and taken:
                raise ConflictError(f"address {taken.pop()} already belongs to {iid}")
        await self.put_if([self.t.version(key.encode()) == 0], {key: _json(table)},
                          refusal=ConflictError(f"instance {args.id} already exists"))  # fmt: skip
        return _instance_view(instance, args.host, None)

    async def show(self, iid: str) -> dict[str, Any]:
        row = await self.locate(iid)
        return _instance_view(row["instance"], row["host"], row["profile"])

    async def remove_instance(self, iid: str) -> None:
        host = (await self.locate(iid))["host"]
        key = self.layout.instance(iid, host)
        await self.put_if([self.t.version(key.encode()) > 0], {},
                          (key, self.layout.association(iid, host)),
                          refusal=NotFoundError(f"instance {iid} does not exist"))  # fmt: skip

    async def associate(self, iid: str, profile: str, new: bool) -> dict[str, Any]:
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

    async def instances(self, host: str | None) -> list[dict[str, Any]]:
        rows = await self.records(host)
        return [_instance_view(r["instance"], r["host"], r["profile"]) for r in rows.values()]


def _validated(layout: Layout, key: str, table: dict[str, Any]) -> Any:
    """The record as the daemons will read it; refused with each problem (its key path)."""
    try:
        return parse(layout, key, _json(table))
    except RecordError as exc:
        raise ImdsdError("\n".join(exc.problems)) from None


def _json(table: dict[str, Any]) -> bytes:
    return json.dumps(table, separators=(",", ":")).encode()


def _said(what: str, name: str) -> Any:
    return lambda _: f"{what} {name}"


def _instance_view(instance: Instance, host: str, profile: str | None) -> dict[str, Any]:
    return {**instance_table(instance), "host": host, "profile": profile}


def _instances_table(rows: list[dict[str, Any]]) -> str:
    return instances_table(rows, last="host")
