"""The admin verbs of the command line, mirroring EC2's API, talking to the admin socket.

Tables for people by default, `--json` for scripts. Exit status: 0 done, 1 refused by the
daemon (unknown id, a conflict, invalid values), 4 no daemon on the socket.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from imdsd.cli.client import call
from imdsd.cli.tables import instances_table, profiles_table, record, sessions_table
from imdsd.config import load
from imdsd.config.instances import OPTION_KEYS, PLACEMENT_KEYS
from imdsd.errors import ConfigError, DaemonUnavailable, Refused
from imdsd.model import USER_DATA_MAX_BYTES, HttpEndpoint, HttpTokens

EXIT_REFUSED, EXIT_UNAVAILABLE = 1, 4
DEFAULT_SOCKET = Path("/run/imdsd/admin.sock")
VERBS = ("instances", "associate", "replace-association", "disassociate",
         "modify-instance-metadata-options", "profiles", "sessions", "rotate",
         "status")  # fmt: skip


def add_commands(commands: Any) -> None:
    """Register every admin verb on the CLI's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    where = "admin socket (default: $IMDSD_ADMIN_SOCKET, the [admin] socket of --config, or "
    common.add_argument("--socket", type=Path, help=where + str(DEFAULT_SOCKET) + ")")
    common.add_argument("--config", type=Path, help="read the admin socket path from this config")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    instances = commands.add_parser("instances", help="list, show, add or remove instances")
    verbs = instances.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", parents=[common], help="every instance, its profile and options")
    for name, text in (("show", "one instance in full"), ("remove", "forget an instance")):
        verbs.add_parser(name, parents=[common], help=text).add_argument(
            "instance_id", help='"i-" + 8 or 17 hex digits'
        )
    instance_flags(verbs.add_parser("add", parents=[common], help="register an instance (a VM)"))
    for name, text in (
        ("associate", "attach an instance profile (EC2's AssociateIamInstanceProfile)"),
        ("replace-association", "swap the profile (EC2's ReplaceIamInstanceProfileAssociation)"),
    ):
        verb = commands.add_parser(name, parents=[common], help=text)
        verb.add_argument("--instance", required=True, help="the instance id")
        verb.add_argument("--profile", required=True, help="an instance profile of the config")
    for name, text in (
        ("disassociate", "remove an instance's association"),
        ("rotate", "issue a new session for an instance now"),
    ):
        commands.add_parser(name, parents=[common], help=text).add_argument(
            "--instance", required=True, help="the instance id"
        )
    modify = commands.add_parser(
        "modify-instance-metadata-options", parents=[common], help="EC2's metadata options"
    )
    modify.add_argument("--instance", required=True, help="the instance id")
    _option_flags(modify)
    for name, text in (
        ("profiles", "instance profiles"),
        ("sessions", "sessions, keys by their last 4 characters"),
    ):
        listing = commands.add_parser(name, help=f"list {text}")
        listing.add_subparsers(dest="verb", required=True).add_parser(
            "list", parents=[common], help=f"list {text}"
        )
    commands.add_parser("status", parents=[common], help="what the daemon serves, and from where")


PLACEMENT_HELP = {
    "host-interface": "the host device its traffic arrives on (tap, bridge, VRF)",
    "host-netns": "the named network namespace its traffic arrives in (/run/netns)",
    "region": 'default "us-east-1"',
    "availability-zone": "default: the region + a",
    "instance-type": 'default "t3.micro"',
    "ami-id": "default: derived from the instance id",
    "hostname": "default: ip-A-B-C-D.<region>.compute.internal",
    "mac": "default: derived from the instance id",
    "account-id": "the identity document's accountId; default: the role's account",
}


def instance_flags(add: argparse.ArgumentParser) -> None:
    """The flags of `instances add`: an [[instances]] table on the command line."""
    add.add_argument("--id", required=True, help='the instance id: "i-" + 8 or 17 hex digits')
    add.add_argument("--address", action="append", default=[],
                     help="an address the VM sends from; repeat for each (may be left out"
                          " with --host-interface: the VM is its whole device)")  # fmt: skip
    for option, text in PLACEMENT_HELP.items():
        add.add_argument(f"--{option}", help=text)
    add.add_argument("--user-data-file", type=Path,
                     help="served as /latest/user-data (at most 16 KB, EC2's limit)")  # fmt: skip
    add.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                     help="an instance tag (repeat); see --instance-metadata-tags")  # fmt: skip
    add.add_argument("--public-key", action="append", default=[], metavar="KEY",
                     help='an OpenSSH public key, or @FILE to read it (repeat)')  # fmt: skip
    add.add_argument("--network-interface", action="append", default=[], metavar="SPEC",
                     help="mac=..,address=..[,address=..][,subnet=CIDR][,ipv6=..]"
                          "[,device_number=N] (repeat; default: --mac, --address)")  # fmt: skip
    add.add_argument("--block-device", action="append", default=[], metavar="NAME=DEVICE",
                     help="e.g. ephemeral0=/dev/vdb (repeat; ami and root: /dev/vda)")  # fmt: skip
    _option_flags(add)


def _option_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--http-tokens", choices=get_args(HttpTokens),
                        help="required: IMDSv2 only; optional: also token-less IMDSv1")  # fmt: skip
    parser.add_argument("--hop-limit", type=int,
                        help="IP TTL of the token reply, 1..64 (1: the VM alone)")  # fmt: skip
    parser.add_argument("--http-endpoint", choices=get_args(HttpEndpoint),
                        help="disabled: every request is refused (403)")  # fmt: skip
    parser.add_argument("--instance-metadata-tags", choices=get_args(HttpEndpoint),
                        help="enabled: tags are served under meta-data/tags/instance/")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Execute one admin verb; print the result; map refusals to exit codes."""
    socket = _socket(args)
    try:
        method, path, body, show = _route(args)
    except OSError as exc:  # --user-data-file: the caller's own file
        print(f"imdsd: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        result = call(socket, method, path, body)
    except DaemonUnavailable as exc:
        print(f"imdsd: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except Refused as exc:
        for line in exc.problems or [str(exc)]:  # each problem already names its key path
            print(f"imdsd: {exc.code}: {line}", file=sys.stderr)
        return EXIT_REFUSED
    print(json.dumps(result, indent=2) if args.json else show(result))
    return 0


Route = tuple[str, str, dict[str, Any] | None, Callable[[Any], str]]


def _route(args: argparse.Namespace) -> Route:
    """(method, path, body, how to print the answer) for the verb on the command line."""
    verb = (args.command, getattr(args, "verb", None))
    iid = getattr(args, "instance", None) or getattr(args, "instance_id", None)
    profile = {"profile": getattr(args, "profile", None)}
    routes: dict[tuple[str, str | None], Route] = {
        ("instances", "list"): ("GET", "/v1/instances", None, instances_table),
        ("instances", "show"): ("GET", f"/v1/instances/{iid}", None, record),
        ("instances", "add"): ("POST", "/v1/instances", instance_body(args), record),
        ("instances", "remove"): ("DELETE", f"/v1/instances/{iid}", None, _said("removed", iid)),
        ("associate", None): ("POST", "/v1/associations", {"instance": iid, **profile}, record),
        ("replace-association", None): ("PUT", f"/v1/associations/{iid}", profile, record),
        ("disassociate", None): (
            "DELETE",
            f"/v1/associations/{iid}",
            None,
            _said("disassociated", iid),
        ),
        ("modify-instance-metadata-options", None): (
            "PATCH",
            f"/v1/instances/{iid}/metadata-options",
            _options(args),
            record,
        ),
        ("profiles", "list"): ("GET", "/v1/profiles", None, profiles_table),
        ("sessions", "list"): ("GET", "/v1/sessions", None, sessions_table),
        ("rotate", None): ("POST", f"/v1/sessions/{iid}/rotate", None, record),
        ("status", None): ("GET", "/v1/status", None, record),
    }
    return routes[verb]


def _said(what: str, iid: str | None) -> Callable[[Any], str]:
    return lambda _: f"{what} {iid}"


def instance_body(args: argparse.Namespace) -> dict[str, Any] | None:
    """The [[instances]] table that `instances add`'s flags describe."""
    if getattr(args, "verb", None) != "add":
        return None
    body: dict[str, Any] = {"id": args.id}
    if args.address:
        body["addresses"] = args.address
    for key in PLACEMENT_KEYS:
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    options = _options(args)
    if options:
        body["metadata_options"] = options
    if args.user_data_file is not None:  # read here: the daemon reads no file for an API call
        body["user_data_base64"] = base64.b64encode(_user_data(args.user_data_file)).decode()
    if args.tag:
        body["tags"] = dict(tag.partition("=")[::2] for tag in args.tag)
    if args.public_key:  # @FILE is read here, on the caller's side, as --user-data-file is
        body["public_keys"] = [_public_key(key) for key in args.public_key]
    if args.network_interface:
        body["network_interfaces"] = [_interface(spec) for spec in args.network_interface]
    if args.block_device:
        body["block_device_mapping"] = dict(d.partition("=")[::2] for d in args.block_device)
    return body


def _public_key(value: str) -> str:
    if not value.startswith("@"):
        return value
    with Path(value[1:]).open("rb") as file:
        return file.read(16385).decode(errors="replace").strip()


_LISTS = {"address": "addresses", "ipv6": "ipv6", "security_group": "security_groups"}


def _interface(spec: str) -> dict[str, Any]:
    """mac=..,address=..,address=..,subnet=.. -> a network_interfaces table (the daemon checks
    every value and names the key of a bad one)."""
    table: dict[str, Any] = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key in _LISTS:
            table.setdefault(_LISTS[key], []).append(value.strip())
        elif key == "device_number" and value.strip().isdigit():
            table[key] = int(value)
        else:
            table[key] = value.strip()
    return table


def _user_data(path: Path) -> bytes:
    """At most one byte over EC2's limit (the daemon names the limit when it refuses): a
    pipe (`<(make-user-data)`) is read to its end, /dev/zero is not read forever."""
    with path.open("rb") as file:
        return file.read(USER_DATA_MAX_BYTES + 1)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in OPTION_KEYS if getattr(args, k, None) is not None}


def _socket(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    if os.environ.get("IMDSD_ADMIN_SOCKET"):
        return Path(os.environ["IMDSD_ADMIN_SOCKET"])
    if args.config:
        try:
            return load(args.config).host.admin_socket
        except ConfigError:
            pass  # an unreadable config still leaves the default to try
    return DEFAULT_SOCKET
