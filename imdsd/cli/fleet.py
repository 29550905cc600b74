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
    NotFoundError,
)
from imdsd.fleet.records import Layout
from imdsd.fleet.writer import Writer
from imdsd.model import Instance

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
        fleet = Writer(client, Layout(config.prefix, ""))
        return await _do(fleet, (args.fleet_verb, getattr(args, "verb", None)), args)
    finally:
        await client.close()


async def _do(
    fleet: Writer, verb: tuple[str, str | None], args: argparse.Namespace
) -> tuple[Any, Any]:
    """One verb: its etcd change or read, and how its answer prints."""
    iid = getattr(args, "instance", None) or getattr(args, "instance_id", None) or ""
    match verb:
        case ("profiles", "list"):
            return [profile_view(p) for p in await fleet.profiles()], profiles_table
        case ("profiles", "add"):
            return profile_view(await fleet.add_profile(args.name, _profile_table(args))), record
        case ("profiles", "remove"):
            await fleet.remove_profile(args.name)
            return None, _said("removed", args.name)
        case ("instances", "list"):
            rows = (await fleet.records(args.host)).values()
            return [_view(r["instance"], r["host"], r["profile"]) for r in rows], _instances_table
        case ("instances", "add"):
            added = await fleet.add_instance(args.id, args.host, instance_body(args) or {})
            return _view(added, args.host, None), record
        case ("instances", "show"):
            row = await fleet.locate(iid)
            return _view(row["instance"], row["host"], row["profile"]), record
        case ("instances", "remove"):
            await fleet.remove_instance(iid)
            return None, _said("removed", iid)
        case ("associate", _) | ("replace-association", _):
            return await fleet.associate(iid, args.profile, verb[0] == "associate"), record
        case _:
            await fleet.disassociate(iid)
            return None, _said("disassociated", iid)


def _profile_table(args: argparse.Namespace) -> dict[str, Any]:
    table = {"name": args.name, "role_arn": args.role_arn, "path": args.path, "id": args.id,
             "external_id": args.external_id}  # fmt: skip
    return {k: v for k, v in table.items() if v is not None}


def _said(what: str, name: str) -> Any:
    return lambda _: f"{what} {name}"


def _view(instance: Instance, host: str, profile: str | None) -> dict[str, Any]:
    return {**instance_table(instance), "host": host, "profile": profile}


def _instances_table(rows: list[dict[str, Any]]) -> str:
    return instances_table(rows, last="host")
