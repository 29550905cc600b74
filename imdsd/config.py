"""TOML configuration -> frozen dataclasses. Validation happens here, once, at the edge.

Every problem is collected (not just the first) and names its key path, the value found and
what is allowed. Past `load()`, no code handles a raw dict. Secret values (the issuer key) are
never echoed back in a message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from imdsd.errors import ConfigError, Problem
from imdsd.model import (
    IAM_NAME,
    IAM_PATH,
    INSTANCE_ID,
    PROFILE_ID,
    HttpEndpoint,
    HttpTokens,
    Instance,
    InstanceProfile,
    MetadataOptions,
    Role,
    RotationPolicy,
)

T = TypeVar("T")
BackendKind = Literal["local"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
PRODUCTION_LISTENER = "169.254.169.254:80"
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d+")
_MAC = re.compile(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}")
_ACCOUNT = re.compile(r"\d{12}")
_AMI = re.compile(r"ami-[0-9a-f]{8,17}")
_INSTANCE_TYPE = re.compile(r"[a-z0-9-]+\.[a-z0-9]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class Listener:
    """One address the metadata API listens on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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
class BackendConfig:
    """Which backend mints sessions, and its own section."""

    kind: BackendKind = "local"
    local: LocalBackendConfig = field(default_factory=LocalBackendConfig)

    @property
    def lifetime(self) -> timedelta:
        """The lifetime of the sessions this backend issues."""
        return self.local.lifetime


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
    instances: tuple[Instance, ...]
    profiles: tuple[InstanceProfile, ...]
    associations: tuple[tuple[str, str], ...]  # (instance id, profile name)


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
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(source, f"invalid TOML ({exc})", "a TOML document")]) from None
    reader = _Reader()
    config = _config(reader, data)
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


def show(value: object) -> str:
    """A config value as messages print it: TOML-ish, strings quoted."""
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def parse_duration(value: object) -> timedelta:
    """`90` (seconds), `"90s"`, `"30m"`, `"6h"`, `"1h30m"` -> timedelta; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return timedelta(seconds=value)
    if isinstance(value, str) and value and (m := _DURATION.fullmatch(value)):
        h, mi, s = (int(g or 0) for g in m.groups())
        return timedelta(hours=h, minutes=mi, seconds=s)
    raise ValueError(value)


def format_duration(value: timedelta) -> str:
    """timedelta -> the `1h30m` form that config accepts."""
    total = int(value.total_seconds())
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    text = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s else "")
    return text or "0s"


DURATION = 'a duration: seconds as an integer, or a string like "90s", "30m", "6h", "1h30m"'


class _Reader:
    """Collects the problems found while walking the document."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def problem(self, path: str, value: str, allowed: str) -> None:
        self.problems.append(Problem(path, value, allowed))

    def root(self, data: dict[str, Any], known: tuple[str, ...]) -> _Section:
        section = _Section(self, data, "")
        section.reject_unknown(known)
        return section


class _Section:
    """One table of the document and its key path; converts values, reporting bad ones."""

    def __init__(self, reader: _Reader, data: dict[str, Any], path: str) -> None:
        self.reader, self.data, self.path = reader, data, path

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def problem(self, key: str, value: str, allowed: str) -> None:
        self.reader.problem(self.where(key), value, allowed)

    def reject_unknown(self, known: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in known:
                self.problem(key, "an unknown key", ", ".join(known))

    def table(self, key: str, known: tuple[str, ...]) -> _Section:
        """A sub-table (missing -> empty), with unknown keys reported."""
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            self.problem(key, show(value), "a table")
            value = {}
        section = _Section(self.reader, value, self.where(key))
        section.reject_unknown(known)
        return section

    def tables(self, key: str, known: tuple[str, ...]) -> list[_Section]:
        """An array of tables ([[key]]), each with unknown keys reported."""
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.problem(key, show(value), f"an array of tables ([[{key}]])")
            return []
        sections = [
            _Section(self.reader, v, f"{self.where(key)}[{i}]") for i, v in enumerate(value)
        ]
        for section in sections:
            section.reject_unknown(known)
        return sections

    def take(
        self,
        key: str,
        convert: Callable[[Any], T],
        default: T,
        allowed: str,
        *,
        secret: bool = False,
    ) -> T:
        """data[key] converted, or default when absent; a bad value is recorded as a problem."""
        if key not in self.data:
            return default
        try:
            return convert(self.data[key])
        except (ValueError, TypeError):
            self.problem(key, "(redacted)" if secret else show(self.data[key]), allowed)
            return default

    def require(self, key: str, convert: Callable[[Any], T], allowed: str) -> T | None:
        """Like take() for a key that must be present."""
        if key not in self.data:
            self.problem(key, "nothing (the key is missing)", allowed)
            return None
        return self.take(key, convert, None, allowed)


def _config(reader: _Reader, data: dict[str, Any]) -> Config:
    doc = reader.root(
        data,
        ("imds", "rotation", "backend", "log", "instances", "instance_profiles", "associations"),
    )
    rotation = _rotation(doc.table("rotation", _ROTATION_KEYS))
    backend = _backend(doc.table("backend", ("kind", "local")))
    _check_lifetime(reader, rotation, backend)
    profiles = _profiles(doc.tables("instance_profiles", ("name", "path", "id", "role_arn")))
    instances = _instances(doc.tables("instances", _INSTANCE_KEYS))
    return Config(
        imds=_imds(doc.table("imds", ("listeners",))),
        rotation=rotation,
        backend=backend,
        log=_log(doc.table("log", ("level", "format"))),
        instances=instances,
        profiles=profiles,
        associations=_associations(
            doc.tables("associations", ("instance", "profile")), instances, profiles
        ),
    )


def _imds(t: _Section) -> ImdsConfig:
    allowed = 'a non-empty list of "host:port" strings, IPv6 hosts in brackets ("[::1]:80")'
    default = _listeners([PRODUCTION_LISTENER])
    return ImdsConfig(listeners=t.take("listeners", _listeners, default, allowed))


def _rotation(t: _Section) -> RotationPolicy:
    d = RotationPolicy()
    positive = "a duration greater than 0s"
    p = RotationPolicy(
        refresh_fraction=t.take(
            "refresh_fraction",
            _fraction,
            d.refresh_fraction,
            "a number greater than 0 and less than 1",
        ),
        refresh_before=t.take("refresh_before", parse_duration, d.refresh_before, DURATION),
        min_remaining=t.take("min_remaining", parse_duration, d.min_remaining, DURATION),
        jitter=t.take("jitter", parse_duration, d.jitter, DURATION),
        retry_initial=t.take("retry_initial", _positive_duration, d.retry_initial, positive),
        retry_max=t.take("retry_max", _positive_duration, d.retry_max, positive),
        concurrency=t.take(
            "concurrency", _int_in(1, 1024), d.concurrency, "an integer from 1 to 1024"
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


def _backend(t: _Section) -> BackendConfig:
    kinds = get_args(BackendKind)
    kind: BackendKind = t.take("kind", _choice(kinds), "local", _one_of(kinds))
    lt = t.table("local", ("lifetime", "key"))
    d = LocalBackendConfig()
    local = LocalBackendConfig(
        lifetime=lt.take("lifetime", _positive_duration, d.lifetime, "a duration greater than 0s"),
        key=lt.take("key", _aes_key, None, "base64 of a 16-, 24- or 32-byte AES key", secret=True),
    )
    return BackendConfig(kind=kind, local=local)


def _check_lifetime(reader: _Reader, p: RotationPolicy, backend: BackendConfig) -> None:
    """A session must outlive refresh_before + jitter, or it would be refreshed on arrival."""
    floor = p.refresh_before + p.jitter
    if backend.lifetime <= floor:
        reader.problem(
            f"backend.{backend.kind}.lifetime",
            format_duration(backend.lifetime),
            f"more than rotation.refresh_before + rotation.jitter ({format_duration(floor)}),"
            " or the session would be refreshed as soon as it is issued",
        )


def _log(t: _Section) -> LogConfig:
    levels, formats = get_args(LogLevel), get_args(LogFormat)
    return LogConfig(
        level=t.take("level", _choice(levels), "info", _one_of(levels)),
        format=t.take("format", _choice(formats), "auto", _one_of(formats)),
    )


def _profiles(entries: list[_Section]) -> tuple[InstanceProfile, ...]:
    out: dict[str, InstanceProfile] = {}
    for t in entries:
        name = t.require("name", _matching(IAM_NAME), "an IAM name: 1-128 of A-Z a-z 0-9 +=,.@_-")
        role = t.require("role_arn", _role, "a role ARN: arn:aws:iam::123456789012:role/NAME")
        iam_path = t.take("path", _matching(IAM_PATH), "/", 'an IAM path: "/" or "/a/b/"')
        given_id = t.take("id", _matching(PROFILE_ID), None, '"AIPA" followed by 17 of A-Z 0-9')
        if name is None or role is None:
            continue
        if name in out:
            t.problem("name", show(name), "a name no other instance profile has")
            continue
        profile_id = given_id or _derived_profile_id(role.account_id, name)
        out[name] = InstanceProfile(name=name, path=iam_path, role=role, id=profile_id)
    return tuple(out.values())


def _instances(entries: list[_Section]) -> tuple[Instance, ...]:
    out: dict[str, Instance] = {}
    owner: dict[str, str] = {}
    for t in entries:
        instance = _instance(t)
        if instance is None:
            continue
        if instance.id in out:
            t.problem("id", show(instance.id), "an id no other instance has")
            continue
        for address in instance.addresses:
            if address in owner:
                t.problem(
                    "addresses",
                    show(address),
                    f"addresses no other instance claims ({owner[address]} has this one)",
                )
            owner.setdefault(address, instance.id)
        out[instance.id] = instance
    return tuple(out.values())


def _instance(t: _Section) -> Instance | None:
    iid = t.require("id", _matching(INSTANCE_ID), '"i-" followed by 8 or 17 lowercase hex digits')
    addresses = t.require(
        "addresses", _addresses, "a non-empty list of IPv4 or IPv6 addresses, each at most once"
    )
    region = t.take("region", _matching(_REGION), "us-east-1", 'a region name like "eu-west-1"')
    fields = {
        "availability_zone": t.take(
            "availability_zone",
            _zone_of(region),
            f"{region}a",
            f'a zone of the region, like "{region}a"',
        ),
        "instance_type": t.take(
            "instance_type",
            _matching(_INSTANCE_TYPE),
            "t3.micro",
            'an instance type like "m5.large"',
        ),
        "ami_id": t.take("ami_id", _matching(_AMI), None, '"ami-" followed by 8 or 17 hex digits'),
        "hostname": t.take("hostname", _nonempty, None, "a non-empty string"),
        "mac": t.take("mac", _matching(_MAC), None, 'a lowercase MAC like "02:00:00:00:00:01"'),
        "account_id": t.take("account_id", _matching(_ACCOUNT), None, "12 digits"),
    }
    options = _options(t.table("metadata_options", ("http_tokens", "hop_limit", "http_endpoint")))
    if iid is None or addresses is None:
        return None
    return _filled_instance(iid, addresses, region, options, fields)


def _options(t: _Section) -> MetadataOptions:
    tokens, endpoint = get_args(HttpTokens), get_args(HttpEndpoint)
    d = MetadataOptions()
    return MetadataOptions(
        http_tokens=t.take("http_tokens", _choice(tokens), d.http_tokens, _one_of(tokens)),
        hop_limit=t.take("hop_limit", _int_in(1, 64), d.hop_limit, "an integer from 1 to 64"),
        http_endpoint=t.take(
            "http_endpoint", _choice(endpoint), d.http_endpoint, _one_of(endpoint)
        ),
    )


def _associations(
    entries: list[_Section], instances: tuple[Instance, ...], profiles: tuple[InstanceProfile, ...]
) -> tuple[tuple[str, str], ...]:
    known_instances = {i.id for i in instances}
    known_profiles = {p.name for p in profiles}
    out: dict[str, str] = {}
    for t in entries:
        iid = t.require("instance", str, "the id of an instance in [[instances]]")
        name = t.require("profile", str, "the name of a profile in [[instance_profiles]]")
        if iid is not None and iid not in known_instances:
            t.problem("instance", show(iid), _listed(known_instances, "instance ids"))
        elif iid in out:
            t.problem(
                "instance", show(iid), f"an instance without an association (it has {out[iid]!r})"
            )
        if name is not None and name not in known_profiles:
            t.problem("profile", show(name), _listed(known_profiles, "instance profile names"))
        elif iid in known_instances and iid not in out and name is not None:
            out[iid] = name
    return tuple(out.items())


_ROTATION_KEYS = (
    "refresh_fraction",
    "refresh_before",
    "min_remaining",
    "jitter",
    "retry_initial",
    "retry_max",
    "concurrency",
)
_INSTANCE_KEYS = (
    "id",
    "addresses",
    "region",
    "availability_zone",
    "instance_type",
    "ami_id",
    "hostname",
    "mac",
    "account_id",
    "metadata_options",
)


def _one_of(choices: tuple[str, ...]) -> str:
    return " or ".join(f'"{c}"' for c in choices)


def _listed(names: set[str], what: str) -> str:
    return f"one of the configured {what}: " + (", ".join(sorted(names)) or "(none configured)")


def _choice(choices: tuple[str, ...]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if value not in choices:
            raise ValueError(value)
        return value

    return convert


def _matching(pattern: re.Pattern[str]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise ValueError(value)
        return value

    return convert


def _int_in(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(value)
        return value

    return convert


def _nonempty(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(value)
    return value


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(value)
    return float(value)


def _positive_duration(value: Any) -> timedelta:
    result = parse_duration(value)
    if not result:
        raise ValueError(value)
    return result


def _aes_key(value: Any) -> bytes:
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError) as exc:
        raise ValueError("not base64") from exc
    if len(key) not in (16, 24, 32):
        raise ValueError("wrong length")
    return key


def _role(value: Any) -> Role:
    if not isinstance(value, str):
        raise TypeError(value)
    return Role.from_arn(value)


def _listener(value: Any) -> Listener:
    if not isinstance(value, str):
        raise TypeError(value)
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(value)
    bracketed = host.startswith("[") and host.endswith("]")
    address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    if (address.version == 6) != bracketed:
        raise ValueError(value)
    return Listener(host=str(address), port=int(port))


def _listeners(value: Any) -> tuple[Listener, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(value)
    return tuple(_listener(v) for v in value)


def _addresses(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(value)
    out = tuple(str(ipaddress.ip_address(v)) for v in value)
    if len(set(out)) != len(out):
        raise ValueError(value)
    return out


def _zone_of(region: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(re.escape(region) + r"[a-z]", value):
            raise ValueError(value)
        return value

    return convert


def _derived_profile_id(account: str, name: str) -> str:
    """A stable AIPA id for a profile configured without one (IAM ids are opaque)."""
    digest = base64.b32encode(hashlib.sha256(f"{account}/{name}".encode()).digest()).decode()
    return "AIPA" + digest[:17]


def _filled_instance(
    iid: str,
    addresses: tuple[str, ...],
    region: str,
    options: MetadataOptions,
    fields: dict[str, Any],
) -> Instance:
    """Fill EC2-like defaults for the optional fields from the instance's id and address."""
    digest = hashlib.sha256(iid.encode()).hexdigest()
    ipv4 = next((a for a in addresses if "." in a), addresses[0])
    domain = "ec2.internal" if region == "us-east-1" else f"{region}.compute.internal"
    hostname = fields["hostname"] or f"ip-{ipv4.replace('.', '-').replace(':', '-')}.{domain}"
    mac = fields["mac"] or "02:" + ":".join(digest[i : i + 2] for i in range(0, 10, 2))
    return Instance(
        id=iid,
        addresses=addresses,
        region=region,
        availability_zone=fields["availability_zone"],
        instance_type=fields["instance_type"],
        ami_id=fields["ami_id"] or "ami-" + digest[:17],
        hostname=hostname,
        local_ipv4=ipv4,
        mac=mac,
        account_id=fields["account_id"],
        options=options,
    )
