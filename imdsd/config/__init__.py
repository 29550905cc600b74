"""TOML configuration -> frozen dataclasses. Validation happens here, once, at the edge: this
module reads the file and assembles the sections, each parsed by its own module beside it.

Every problem is collected (not just the first) and names its key path, the value found and
what is allowed. Past `load()`, no code handles a raw dict. Secret values (the issuer key) are
never echoed back in a message.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli

from imdsd.budgets import BudgetPolicy
from imdsd.config import instances as tables
from imdsd.config import profiles as profile_tables
from imdsd.config.backend import BackendConfig, parse_backend
from imdsd.config.budgets import BUDGET_KEYS, parse_budgets
from imdsd.config.host import (
    HostConfig,
    ImdsConfig,
    LogConfig,
    check_listeners,
    check_scopes,
    parse_host,
    parse_imds,
    parse_log,
)
from imdsd.config.inventory import INVENTORY_KEYS, InventoryConfig, parse_inventory
from imdsd.config.reader import Reader, keys_of
from imdsd.config.rotation import check_lifetime, parse_rotation
from imdsd.config.signing import SIGNING_KEYS, SigningConfig, parse_signing
from imdsd.errors import ConfigError, Problem
from imdsd.model import Instance, InstanceProfile, RotationPolicy


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated configuration."""

    imds: ImdsConfig
    rotation: RotationPolicy
    backend: BackendConfig
    log: LogConfig
    host: HostConfig
    budgets: BudgetPolicy
    signing: SigningConfig  # [identity]: the key that signs identity documents
    instances: tuple[Instance, ...]
    profiles: tuple[InstanceProfile, ...]
    associations: tuple[tuple[str, str], ...]  # (instance id, profile name)
    inventory: InventoryConfig = field(default_factory=InventoryConfig)


def load(path: Path, *, beside_a_loop: bool = False) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem.
    `beside_a_loop`: the parse runs in a worker thread of a serving daemon (SIGHUP), so it
    uses the standard library's tomllib, pure Python, which lets the guest loop run between
    its steps; tomli (its compiled upstream, 2.5x faster) holds the GIL for the whole file,
    ~150 ms at 10,000 instances, and would stop every guest for that long."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem = Problem(
            str(path),
            f"an unreadable file ({exc.__class__.__name__})",
            "a readable UTF-8 TOML file",
        )
        raise ConfigError([problem]) from None
    return parse(text, source=str(path), toml=tomllib if beside_a_loop else tomli)


def parse(text: str, *, source: str = "<config>", toml: Any = tomli) -> Config:
    """Validate TOML text; raise ConfigError listing every problem."""
    try:
        data = toml.loads(text)  # tomli by default: tomllib's upstream, compiled, 2.5x faster
    except (tomli.TOMLDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([Problem(source, f"invalid TOML ({exc})", "a TOML document")]) from None
    return validate(data)


def validate(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    reader = Reader()
    config = _config(reader, data)
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


def _config(reader: Reader, data: dict[str, Any]) -> Config:
    doc = reader.root(data, _SECTIONS)
    rotation = parse_rotation(doc.table("rotation", keys_of(RotationPolicy)))
    backend = parse_backend(doc.table("backend", keys_of(BackendConfig)))
    check_lifetime(reader, rotation, backend)
    imds, host = parse_imds(doc.table("imds", keys_of(ImdsConfig))), parse_host(doc)
    check_listeners(reader, imds, host)
    profiles = profile_tables.profiles(
        doc.tables("instance_profiles", ("name", "path", "id", "role_arn", "external_id"))
    )
    instances = tables.instances(doc.tables("instances", tables.INSTANCE_KEYS))
    check_scopes(reader, imds, instances)
    inventory = parse_inventory(doc.table("inventory", INVENTORY_KEYS))
    if inventory.source == "etcd":
        for key in ("instances", "instance_profiles", "associations"):
            if doc.data.get(key):
                allowed = 'none with [inventory] source = "etcd" (the records are in etcd)'
                doc.problem(key, f"[[{key}]] tables", allowed)
    return Config(
        imds=imds,
        rotation=rotation,
        backend=backend,
        log=parse_log(doc.table("log", keys_of(LogConfig))),
        host=host,
        budgets=parse_budgets(doc.table("budgets", BUDGET_KEYS)),
        signing=parse_signing(doc.table("identity", SIGNING_KEYS)),
        instances=instances,
        profiles=profiles,
        associations=profile_tables.associations(
            doc.tables("associations", ("instance", "profile")), instances, profiles
        ),
        inventory=inventory,
    )


_SECTIONS = ("imds", "state", "admin", "metrics", "rotation", "backend", "log", "budgets",
             "identity", "inventory", "instances", "instance_profiles", "associations")  # fmt: skip
