"""TOML configuration -> frozen dataclasses. Validation happens here, once, at the edge.

Every problem is collected (not just the first) and names its key path, the value found and
what is allowed. Past `load()`, no code handles a raw dict. Secret values (the issuer key) are
never echoed back in a message.
"""

from __future__ import annotations

import base64
import hashlib
import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, get_args

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
    RotationPolicy,
)
from imdsd.validation import (
    DURATION,
    Listener,
    Reader,
    Section,
    address_list,
    aes_key,
    choice,
    choices_list,
    duration_in,
    file_path,
    format_duration,
    fraction,
    http_url,
    int_in,
    listed,
    listener_list,
    matching,
    nonempty,
    one_of,
    optional_listener,
    parse_duration,
    positive_duration,
    role_arn,
    show,
    zone_of,
)

BackendKind = Literal["local", "sts"]
SessionScope = Literal["instance", "profile"]
SessionTag = Literal["instance_id", "host"]
STS_DURATION_MIN = timedelta(seconds=900)  # AssumeRole's DurationSeconds limits
STS_DURATION_MAX = timedelta(seconds=43200)
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
PRODUCTION_LISTENER = "169.254.169.254:80"
DEFAULT_METRICS = "127.0.0.1:9169"
REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d+")
EXTERNAL_ID = re.compile(r"[\w+=,.@:/-]{2,1224}", re.ASCII)
STS_NAME = re.compile(r"[\w+=,.@{}-]{2,64}", re.ASCII)  # RoleSessionName/SourceIdentity, + {host}
_MAC = re.compile(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}")
_ACCOUNT = re.compile(r"\d{12}")
_AMI = re.compile(r"ami-[0-9a-f]{8,17}")
_INSTANCE_TYPE = re.compile(r"[a-z0-9-]+\.[a-z0-9]+")


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
    profiles = _profiles(
        doc.tables("instance_profiles", ("name", "path", "id", "role_arn", "external_id"))
    )
    instances = _instances(doc.tables("instances", _INSTANCE_KEYS))
    return Config(
        imds=_imds(doc.table("imds", ("listeners",))),
        rotation=rotation,
        backend=backend,
        log=_log(doc.table("log", ("level", "format"))),
        host=_host(doc),
        instances=instances,
        profiles=profiles,
        associations=_associations(
            doc.tables("associations", ("instance", "profile")), instances, profiles
        ),
    )


def _imds(t: Section) -> ImdsConfig:
    allowed = 'a non-empty list of "host:port" strings, IPv6 hosts in brackets ("[::1]:80")'
    default = listener_list([PRODUCTION_LISTENER])
    return ImdsConfig(listeners=t.take("listeners", listener_list, default, allowed))


def _rotation(t: Section) -> RotationPolicy:
    d = RotationPolicy()
    positive = "a duration greater than 0s"
    p = RotationPolicy(
        refresh_fraction=t.take(
            "refresh_fraction",
            fraction,
            d.refresh_fraction,
            "a number greater than 0 and less than 1",
        ),
        refresh_before=t.take("refresh_before", parse_duration, d.refresh_before, DURATION),
        min_remaining=t.take("min_remaining", parse_duration, d.min_remaining, DURATION),
        jitter=t.take("jitter", parse_duration, d.jitter, DURATION),
        retry_initial=t.take("retry_initial", positive_duration, d.retry_initial, positive),
        retry_max=t.take("retry_max", positive_duration, d.retry_max, positive),
        concurrency=t.take(
            "concurrency", int_in(1, 1024), d.concurrency, "an integer from 1 to 1024"
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
    kinds = get_args(BackendKind)
    kind: BackendKind = t.take("kind", choice(kinds), "local", one_of(kinds))
    lt = t.table("local", ("lifetime", "key"))
    d = LocalBackendConfig()
    local = LocalBackendConfig(
        lifetime=lt.take("lifetime", positive_duration, d.lifetime, "a duration greater than 0s"),
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
    scopes, tags = get_args(SessionScope), get_args(SessionTag)
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


def _host(doc: Section) -> HostConfig:
    d = HostConfig()
    path = "an absolute path, or one relative to the directory imdsd runs in"
    metrics = doc.table("metrics", ("listen",)).take(
        "listen",
        optional_listener,
        optional_listener(DEFAULT_METRICS),
        '"host:port" (loopback advised), or "" for none',
    )
    return HostConfig(
        state_directory=doc.table("state", ("directory",)).take(
            "directory", file_path, d.state_directory, path
        ),
        admin_socket=doc.table("admin", ("socket",)).take(
            "socket", file_path, d.admin_socket, path
        ),
        metrics=metrics,
    )


def _log(t: Section) -> LogConfig:
    levels, formats = get_args(LogLevel), get_args(LogFormat)
    return LogConfig(
        level=t.take("level", choice(levels), "info", one_of(levels)),
        format=t.take("format", choice(formats), "auto", one_of(formats)),
    )


def _profiles(entries: list[Section]) -> tuple[InstanceProfile, ...]:
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


def instance_from(data: dict[str, Any], *, current: Instance | None = None) -> Instance:
    """One instance from a table shaped like an [[instances]] entry (the admin API's `add`).
    With `current`, the table holds only metadata options to change on that instance."""
    reader = Reader()
    if current is not None:
        options = {**asdict(current.options), **data}
        section = Section(reader, options, "metadata_options")
        section.reject_unknown(_OPTION_KEYS)
        result: Instance | None = replace(current, options=_options(section))
    else:
        section = Section(reader, data, "instance")
        section.reject_unknown(_INSTANCE_KEYS)
        result = _instance(section)
    if reader.problems or result is None:
        raise ConfigError(reader.problems)
    return result


def _instances(entries: list[Section]) -> tuple[Instance, ...]:
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


def _instance(t: Section) -> Instance | None:
    iid = t.require("id", matching(INSTANCE_ID), '"i-" followed by 8 or 17 lowercase hex digits')
    addresses = t.require(
        "addresses", address_list, "a non-empty list of IPv4 or IPv6 addresses, each at most once"
    )
    region = t.take("region", matching(REGION), "us-east-1", 'a region name like "eu-west-1"')
    fields = {
        "availability_zone": t.take(
            "availability_zone",
            zone_of(region),
            f"{region}a",
            f'a zone of the region, like "{region}a"',
        ),
        "instance_type": t.take(
            "instance_type",
            matching(_INSTANCE_TYPE),
            "t3.micro",
            'an instance type like "m5.large"',
        ),
        "ami_id": t.take("ami_id", matching(_AMI), None, '"ami-" followed by 8 or 17 hex digits'),
        "hostname": t.take("hostname", nonempty, None, "a non-empty string"),
        "mac": t.take("mac", matching(_MAC), None, 'a lowercase MAC like "02:00:00:00:00:01"'),
        "account_id": t.take("account_id", matching(_ACCOUNT), None, "12 digits"),
    }
    options = _options(t.table("metadata_options", _OPTION_KEYS))
    if iid is None or addresses is None:
        return None
    return _filled_instance(iid, addresses, region, options, fields)


def _options(t: Section) -> MetadataOptions:
    tokens, endpoint = get_args(HttpTokens), get_args(HttpEndpoint)
    d = MetadataOptions()
    return MetadataOptions(
        http_tokens=t.take("http_tokens", choice(tokens), d.http_tokens, one_of(tokens)),
        hop_limit=t.take("hop_limit", int_in(1, 64), d.hop_limit, "an integer from 1 to 64"),
        http_endpoint=t.take("http_endpoint", choice(endpoint), d.http_endpoint, one_of(endpoint)),
    )


def _associations(
    entries: list[Section], instances: tuple[Instance, ...], profiles: tuple[InstanceProfile, ...]
) -> tuple[tuple[str, str], ...]:
    known_instances = {i.id for i in instances}
    known_profiles = {p.name for p in profiles}
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
_SECTIONS = ("imds", "state", "admin", "metrics", "rotation", "backend", "log", "instances",
             "instance_profiles", "associations")  # fmt: skip
_OPTION_KEYS = ("http_tokens", "hop_limit", "http_endpoint")
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
