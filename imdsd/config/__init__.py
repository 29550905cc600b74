"""TOML configuration -> frozen dataclasses. Validation happens here, once, at the edge.

Every problem is collected (not just the first) and names its key path, the value found and
what is allowed. Past `load()`, no code handles a raw dict. Secret values (the issuer key) are
never echoed back in a message.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, get_args

import tomli

from imdsd.budgets import BudgetPolicy
from imdsd.config import instances as tables
from imdsd.config.budgets import BUDGET_KEYS, parse_budgets
from imdsd.config.instances import REGION
from imdsd.config.inventory import INVENTORY_KEYS, InventoryConfig, parse_inventory
from imdsd.config.reader import (
    DURATION,
    Listener,
    Reader,
    Section,
    aes_key,
    boolean,
    choice,
    choices_list,
    duration_in,
    file_path,
    format_duration,
    fraction,
    http_url,
    int_in,
    listener_list,
    matching,
    nonempty,
    one_of,
    optional_listener,
    show,
)
from imdsd.config.signing import IDENTITY_KEYS, IdentityConfig, parse_identity
from imdsd.errors import ConfigError, Problem
from imdsd.model import Instance, InstanceProfile, RotationPolicy

BackendKind = Literal["local", "sts"]
SessionScope = Literal["instance", "profile"]
SessionTag = Literal["instance_id", "host"]
H = timedelta(hours=1)
STS_DURATION_MIN = timedelta(seconds=900)  # AssumeRole's DurationSeconds limits
STS_DURATION_MAX = timedelta(seconds=43200)
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
PRODUCTION_LISTENER = "169.254.169.254:80"
DEFAULT_METRICS = "127.0.0.1:9169"
STS_NAME = re.compile(r"[\w+=,.@{}-]{2,64}", re.ASCII)  # RoleSessionName/SourceIdentity, + {host}


@dataclass(frozen=True, slots=True, kw_only=True)
class ImdsConfig:
    """The guest-facing listener(s)."""

    listeners: tuple[Listener, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalBackendConfig:
    """The embedded issuer: session lifetime and the AES-GCM key that seals its tokens."""

    lifetime: timedelta = timedelta(hours=6)
    key: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class StsBackendConfig:
    """AssumeRole on an upstream STS: where, as whom, for how long, and what to send along."""

    region: str = "us-east-1"
    endpoint_url: str = ""  # "" = the regional endpoint of `region`
    profile: str | None = None  # the host's own credentials: a shared-config profile, or the chain
    duration: timedelta = timedelta(hours=6)
    session_scope: SessionScope = "instance"
    session_tags: tuple[SessionTag, ...] = ()
    source_identity: str | None = None
    timeout: timedelta = timedelta(seconds=10)

    @property
    def endpoint(self) -> str:
        """The configured endpoint, or the region's own STS endpoint."""
        if self.endpoint_url:
            return self.endpoint_url
        suffix = "amazonaws.com.cn" if self.region.startswith("cn-") else "amazonaws.com"
        return f"https://sts.{self.region}.{suffix}"


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig:
    """Which backend mints sessions, and its own section."""

    kind: BackendKind = "local"
    local: LocalBackendConfig = field(default_factory=LocalBackendConfig)
    sts: StsBackendConfig = field(default_factory=StsBackendConfig)

    @property
    def lifetime(self) -> timedelta:
        """The lifetime of the sessions this backend asks for."""
        return self.sts.duration if self.kind == "sts" else self.local.lifetime

    @property
    def lifetime_key(self) -> str:
        """The key path of that lifetime, for messages."""
        return "backend.sts.duration" if self.kind == "sts" else "backend.local.lifetime"


@dataclass(frozen=True, slots=True, kw_only=True)
class HostConfig:
    """Where this host keeps its state, its admin socket and its metrics listener."""

    state_directory: Path = Path("/var/lib/imdsd")
    admin_socket: Path = Path("/run/imdsd/admin.sock")
    metrics: Listener | None = None  # None: no metrics listener
    warm_restart: bool = True  # keep sessions, token key and incarnations sealed across restarts
    keep_tokens: bool = True  # with warm_restart: guests' IMDSv2 tokens survive a restart
    vault_key: Path | None = None  # None: vault.key in the state directory


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    """Log level and format (auto: JSON unless stdout is a terminal)."""

    level: LogLevel = "info"
    format: LogFormat = "auto"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated configuration."""

    imds: ImdsConfig
    rotation: RotationPolicy
    backend: BackendConfig
    log: LogConfig
    host: HostConfig
    budgets: BudgetPolicy
    identity: IdentityConfig
    instances: tuple[Instance, ...]
    profiles: tuple[InstanceProfile, ...]
    associations: tuple[tuple[str, str], ...]  # (instance id, profile name)
    inventory: InventoryConfig = field(default_factory=InventoryConfig)


def load(path: Path) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problem = Problem(
            str(path),
            f"an unreadable file ({exc.__class__.__name__})",
            "a readable UTF-8 TOML file",
        )
        raise ConfigError([problem]) from None
    return parse(text, source=str(path))


def parse(text: str, *, source: str = "<config>") -> Config:
    """Validate TOML text; raise ConfigError listing every problem."""
    try:
        data = tomli.loads(text)  # tomllib's upstream, compiled: 2.5x faster on big files
    except tomli.TOMLDecodeError as exc:
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
    rotation = _rotation(doc.table("rotation", _ROTATION_KEYS))
    backend = _backend(doc.table("backend", ("kind", "local", "sts")))
    _check_lifetime(reader, rotation, backend)
    imds, host = _imds(doc.table("imds", ("listeners",))), _host(doc)
    _check_listeners(reader, imds, host)
    profiles = tables.profiles(
        doc.tables("instance_profiles", ("name", "path", "id", "role_arn", "external_id"))
    )
    instances = tables.instances(doc.tables("instances", tables.INSTANCE_KEYS))
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
        log=_log(doc.table("log", ("level", "format"))),
        host=host,
        budgets=parse_budgets(doc.table("budgets", BUDGET_KEYS)),
        identity=parse_identity(doc.table("identity", IDENTITY_KEYS)),
        instances=instances,
        profiles=profiles,
        associations=tables.associations(
            doc.tables("associations", ("instance", "profile")), instances, profiles
        ),
        inventory=inventory,
    )


def _imds(t: Section) -> ImdsConfig:
    allowed = 'a non-empty list of "host:port" strings, IPv6 hosts in brackets ("[::1]:80")'
    default = listener_list([PRODUCTION_LISTENER])
    return ImdsConfig(listeners=t.take("listeners", listener_list, default, allowed))


def _rotation(t: Section) -> RotationPolicy:
    d = RotationPolicy()
    up_to_12h, up_to_6h = duration_in(timedelta(0), 12 * H), duration_in(timedelta(0), 6 * H)
    retry = duration_in(timedelta(seconds=1), H)
    p = RotationPolicy(
        refresh_fraction=t.take(
            "refresh_fraction",
            fraction,
            d.refresh_fraction,
            "a number greater than 0 and less than 1",
        ),
        refresh_before=t.take("refresh_before", up_to_12h, d.refresh_before, f"{DURATION}; to 12h"),
        min_remaining=t.take("min_remaining", up_to_12h, d.min_remaining, f"{DURATION}; to 12h"),
        jitter=t.take("jitter", up_to_6h, d.jitter, f"{DURATION}; to 6h"),
        retry_initial=t.take("retry_initial", retry, d.retry_initial, "a duration from 1s to 1h"),
        retry_max=t.take("retry_max", retry, d.retry_max, "a duration from 1s to 1h"),
        concurrency=t.take(
            "concurrency", int_in(1, 1024), d.concurrency, "an integer from 1 to 1024"
        ),
        max_rate=t.take("max_rate", int_in(1, 10000), d.max_rate, "an integer from 1 to 10000"),
        startup_deadline=t.take(
            "startup_deadline",
            duration_in(timedelta(seconds=1), timedelta(seconds=60)),
            d.startup_deadline,
            "a duration from 1s to 1m (systemd's TimeoutStartSec=90s covers it)",
        ),
    )
    if p.refresh_before < p.min_remaining:
        t.problem(
            "refresh_before",
            format_duration(p.refresh_before),
            f"at least rotation.min_remaining ({format_duration(p.min_remaining)})",
        )
    if p.retry_max < p.retry_initial:
        t.problem(
            "retry_max",
            format_duration(p.retry_max),
            f"at least rotation.retry_initial ({format_duration(p.retry_initial)})",
        )
    return p


def _backend(t: Section) -> BackendConfig:
    kinds: tuple[BackendKind, ...] = get_args(BackendKind)  # typed: choice() then checks
    kind: BackendKind = t.take("kind", choice(kinds), "local", one_of(kinds))
    lt = t.table("local", ("lifetime", "key"))
    d = LocalBackendConfig()
    local = LocalBackendConfig(
        lifetime=lt.take(
            "lifetime",
            duration_in(timedelta(seconds=1), 12 * H),
            d.lifetime,
            "a duration from 1s to 12h",
        ),
        key=lt.take("key", aes_key, None, "base64 of a 16-, 24- or 32-byte AES key", secret=True),
    )
    sts = _sts(t.table("sts", _STS_KEYS), required=kind == "sts")
    if sts.session_scope == "profile" and "instance_id" in sts.session_tags:
        t.problem(
            "sts.session_tags",
            show(list(sts.session_tags)),
            'tags without "instance_id" when session_scope = "profile" (one session serves many)',
        )
    return BackendConfig(kind=kind, local=local, sts=sts)


_STS_KEYS = ("region", "endpoint_url", "profile", "duration", "session_scope", "session_tags",
             "source_identity", "timeout")  # fmt: skip


def _sts(t: Section, *, required: bool) -> StsBackendConfig:
    d = StsBackendConfig()
    allowed = 'a region name like "eu-west-1"'
    region = (
        t.require("region", matching(REGION), allowed)  # no silent default for real STS
        if required
        else t.take("region", matching(REGION), d.region, allowed)
    )
    scopes: tuple[SessionScope, ...] = get_args(SessionScope)
    tags: tuple[SessionTag, ...] = get_args(SessionTag)
    return StsBackendConfig(
        region=region or d.region,
        endpoint_url=t.take("endpoint_url", http_url, "", "an http:// or https:// URL"),
        profile=t.take("profile", nonempty, None, "the name of a profile in the AWS config files"),
        duration=t.take(
            "duration",
            duration_in(STS_DURATION_MIN, STS_DURATION_MAX),
            d.duration,
            "a duration from 15m to 12h (AssumeRole's 900 to 43200 seconds)",
        ),
        session_scope=t.take("session_scope", choice(scopes), d.session_scope, one_of(scopes)),
        session_tags=t.take(
            "session_tags",
            choices_list(tags),
            d.session_tags,
            "a list of " + one_of(tags).replace(" or ", ", "),
        ),
        source_identity=t.take(
            "source_identity",
            matching(STS_NAME),
            None,
            "2-64 of A-Z a-z 0-9 +=,.@- ({host} is replaced by the host name)",
        ),
        timeout=t.take(
            "timeout",
            duration_in(timedelta(seconds=1), timedelta(minutes=5)),
            d.timeout,
            "a duration from 1s to 5m",
        ),
    )


def _check_lifetime(reader: Reader, p: RotationPolicy, backend: BackendConfig) -> None:
    """A session must outlive refresh_before + jitter, or it would be refreshed on arrival."""
    floor = p.refresh_before + p.jitter
    if backend.lifetime <= floor:
        reader.problem(
            backend.lifetime_key,
            format_duration(backend.lifetime),
            f"more than rotation.refresh_before + rotation.jitter ({format_duration(floor)}),"
            " or the session would be refreshed as soon as it is issued",
        )


def _check_listeners(reader: Reader, imds: ImdsConfig, host: HostConfig) -> None:
    """No two listeners may want the same socket (the second bind would fail at start), and the
    metrics listener is never a guest listener (guests would read the host's metrics)."""
    seen: list[Listener] = []
    for listener in imds.listeners:
        other = next((s for s in seen if _overlap(s, listener)), None)
        if other is not None:
            reader.problem("imds.listeners", show(str(listener)),
                           f"listeners that do not overlap ({other} is listed too)")  # fmt: skip
        seen.append(listener)
    if host.metrics is not None:
        other = next((s for s in seen if _overlap(s, host.metrics)), None)
        if other is not None:
            allowed = f"an address no guest listener uses (imds.listeners has {other})"
            reader.problem("metrics.listen", show(str(host.metrics)), allowed)


def _overlap(a: Listener, b: Listener) -> bool:
    """Same port (not 0) and the same address, or a wildcard of the same family."""
    if a.port != b.port or a.port == 0:
        return False
    x, y = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    return x.version == y.version and (x == y or x.is_unspecified or y.is_unspecified)


def _host(doc: Section) -> HostConfig:
    d = HostConfig()
    path = "an absolute path, or one relative to the directory imdsd runs in"
    metrics = doc.table("metrics", ("listen",)).take(
        "listen",
        optional_listener,
        optional_listener(DEFAULT_METRICS),
        '"host:port" (loopback advised), or "" for none',
    )
    state = doc.table("state", ("directory", "warm_restart", "keep_tokens", "key_file"))
    return HostConfig(
        state_directory=state.take("directory", file_path, d.state_directory, path),
        warm_restart=state.take("warm_restart", boolean, d.warm_restart, "true or false"),
        keep_tokens=state.take("keep_tokens", boolean, d.keep_tokens, "true or false"),
        vault_key=state.take("key_file", file_path, None, path),
        admin_socket=doc.table("admin", ("socket",)).take(
            "socket", file_path, d.admin_socket, path
        ),
        metrics=metrics,
    )


def _log(t: Section) -> LogConfig:
    levels: tuple[LogLevel, ...] = get_args(LogLevel)
    formats: tuple[LogFormat, ...] = get_args(LogFormat)
    return LogConfig(
        level=t.take("level", choice(levels), "info", one_of(levels)),
        format=t.take("format", choice(formats), "auto", one_of(formats)),
    )


_ROTATION_KEYS = (
    "refresh_fraction",
    "refresh_before",
    "min_remaining",
    "jitter",
    "retry_initial",
    "retry_max",
    "concurrency",
    "max_rate",
    "startup_deadline",
)
_SECTIONS = ("imds", "state", "admin", "metrics", "rotation", "backend", "log", "budgets",
             "identity", "inventory", "instances", "instance_profiles", "associations")  # fmt: skip
