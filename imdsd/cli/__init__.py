"""The command line: parse arguments, map errors to exit codes. No logic of its own.

Exit codes: 0 ok, 1 runtime failure (e.g. a listener address cannot be bound) or an admin
call the daemon refused, 2 usage, 3 bad configuration (systemd's RestartPreventExitStatus:
restarting will not fix it), 4 no daemon on the admin socket.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import get_args

from imdsd import __version__, heap, log
from imdsd.cli import admin, fleet
from imdsd.clock import SystemClock
from imdsd.config import Config, load
from imdsd.config.host import LogFormat, LogLevel
from imdsd.config.inventory import read_client_files
from imdsd.errors import ConfigError, ImdsdError, StateError
from imdsd.state import StateFile

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 3
DEFAULT_CONFIG = Path("/etc/imdsd/imdsd.toml")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in admin.VERBS:
        return admin.run(args)
    if args.command == "fleet":
        return fleet.run(args)
    try:
        with heap.bulk():  # the file's 10,000 instances live on: no collection walks them
            config = load(args.config)
            StateFile(config.host.state_directory).load()  # checked like the config
    except ConfigError as exc:
        return _bad_config(exc)
    except StateError as exc:
        print(f"imdsd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.command == "check-config":
        return _check_config(config, args.config)
    if args.command == "identity":
        return _print_certificates(config)
    config = _with_overrides(config, args=args)
    log.configure(config.log.level, config.log.format)
    try:
        from imdsd.daemon.serve import serve  # here: only `run` pays for the daemon's imports

        def reread() -> Config:  # SIGHUP: the file again, the flags still winning
            return _with_overrides(load(args.config, beside_a_loop=True), args=args)

        asyncio.run(serve(config, SystemClock(), reread))
    except ConfigError as exc:  # the state file changed between the check above and the start
        return _bad_config(exc)
    except OSError as exc:
        print(f"imdsd: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except ImdsdError as exc:  # e.g. the sts backend found no host credentials
        print(f"imdsd: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _check_config(config: Config, path: Path) -> int:
    """check-config: the file (already loaded), and the [identity] key files, the etcd
    client's TLS and password files and the Roles Anywhere certificate, chain, key and CA
    bundle it names (each must be readable; a key must match its certificate)."""
    from imdsd.signatures import check_files  # cryptography only when it is needed

    try:
        check_files(config.signing)
        if config.backend.signs_with_certificate:
            from imdsd.backends.certificate import check_files as check_host_certificate

            check_host_certificate(config.backend.rolesanywhere)
        if config.inventory.source == "etcd":
            read_client_files(config.inventory.etcd)
    except ConfigError as exc:
        return _bad_config(exc)
    print(f"{path}: ok ({_summary(config)})")
    return EXIT_OK


def _print_certificates(config: Config) -> int:
    """identity certificate: the PEM certificate(s) to publish; never makes a key (run as root,
    it would leave one the imdsd user cannot read)."""
    from imdsd.signatures import open_signer  # cryptography only when it is needed

    try:
        signer = open_signer(config.signing, config.host.state_directory, generate=False)
    except ConfigError as exc:
        return _bad_config(exc)
    except FileNotFoundError:
        print(f"imdsd: no identity certificate yet in {config.host.state_directory}: start the"
              " daemon once (it makes one), or set [identity] key_file and certificate_file",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILURE
    for region, pem in signer.certificates().items():
        print(f"# region {region}" if region else "# every other region")
        print(pem.decode(), end="")
    return EXIT_OK


def _bad_config(exc: ConfigError) -> int:
    for problem in exc.problems:
        print(f"imdsd: {problem}", file=sys.stderr)
    return EXIT_CONFIG


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imdsd", description="EC2-compatible instance metadata daemon"
    )
    parser.add_argument("--version", action="version", version=f"imdsd {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True)
    run = subcommands.add_parser("run", help="serve the metadata API")
    check = subcommands.add_parser(
        "check-config", help="validate a config file and exit (3 if invalid)"
    )
    identity = subcommands.add_parser("identity", help="the identity document's signing keys")
    certificate = identity.add_subparsers(dest="verb", required=True).add_parser(
        "certificate", help="print the PEM certificate(s) that verify this host's signatures"
    )
    for command in (run, check, certificate):
        command.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="TOML config file")
    run.add_argument("--log-format", choices=get_args(LogFormat), help="overrides [log] format")
    run.add_argument("--log-level", choices=get_args(LogLevel), help="overrides [log] level")
    admin.add_commands(subcommands)
    fleet.add_commands(subcommands)
    return parser


def _with_overrides(config: Config, *, args: argparse.Namespace) -> Config:
    """--log-level and --log-format win over the file's [log] section."""
    return replace(
        config,
        log=replace(
            config.log,
            level=args.log_level or config.log.level,
            format=args.log_format or config.log.format,
        ),
    )


def _summary(config: Config) -> str:
    if config.inventory.source == "etcd":
        e = config.inventory.etcd
        where = ", ".join(str(x) for x in e.endpoints)
        backend = config.backend.kind
        return f"inventory from etcd {e.prefix}/hosts/{e.host}/ at {where}, backend {backend}"
    return (
        f"{len(config.instances)} instances, {len(config.profiles)} instance profiles, "
        f"{len(config.associations)} associations, backend {config.backend.kind}"
    )
