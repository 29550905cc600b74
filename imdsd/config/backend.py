"""[backend]: which backend mints sessions, and each backend's own section."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, get_args

from imdsd.config.converters import (
    aes_key,
    choice,
    choices_list,
    duration_in,
    file_path,
    http_url,
    matching,
    nonempty,
    one_of,
)
from imdsd.config.instances import REGION
from imdsd.config.reader import Section, keys_of, show

BackendKind = Literal["local", "sts", "rolesanywhere"]
HostCredentials = Literal["chain", "rolesanywhere"]
SessionScope = Literal["instance", "profile"]
SessionTag = Literal["instance_id", "host"]
STS_DURATION_MIN = timedelta(seconds=900)  # AssumeRole's DurationSeconds limits
STS_DURATION_MAX = timedelta(seconds=43200)
STS_NAME = re.compile(r"[\w+=,.@{}-]{2,64}", re.ASCII)  # RoleSessionName/SourceIdentity, + {host}
H = timedelta(hours=1)
ROLESANYWHERE_ARN = re.compile(  # arn:PARTITION:rolesanywhere:REGION:ACCOUNT:trust-anchor/ID
    r"arn:aws[a-z-]*:rolesanywhere:[a-z]{2}(?:-[a-z]+)+-\d+:\d{12}:(trust-anchor|profile)/[\w-]+",
    re.ASCII,
)
ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+", re.ASCII)


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
    host_credentials: HostCredentials = "chain"  # or IAM Roles Anywhere ([backend.rolesanywhere])

    @property
    def endpoint(self) -> str:
        """The configured endpoint, or the region's own STS endpoint."""
        if self.endpoint_url:
            return self.endpoint_url
        suffix = "amazonaws.com.cn" if self.region.startswith("cn-") else "amazonaws.com"
        return f"https://sts.{self.region}.{suffix}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RolesAnywhereConfig:
    """IAM Roles Anywhere CreateSession, signed with the host's X.509 key: where, with which
    trust anchor and profile, which files, for how long. `role_arn` is the host's own role
    (the sts backend's host credentials); kind = "rolesanywhere" asks for each profile's role."""

    region: str = "us-east-1"
    trust_anchor_arn: str = ""
    profile_arn: str = ""
    role_arn: str | None = None
    certificate_file: Path = Path("/etc/imdsd/host.pem")
    private_key_file: Path = Path("/etc/imdsd/host-key.pem")
    certificate_chain_file: Path | None = None
    duration: timedelta = timedelta(hours=6)
    endpoint: str = ""  # "" = https://rolesanywhere.REGION.amazonaws.com
    ca_bundle: Path | None = None
    role_session_name: str | None = None  # "{instance_id}": the profile must accept one
    timeout: timedelta = timedelta(seconds=10)

    @property
    def sessions_url(self) -> str:
        """CreateSession's URL: the endpoint's base URL (or the region's own) + sessions."""
        if self.endpoint:
            return self.endpoint + "sessions"  # http_url() ends it with "/"
        suffix = "amazonaws.com.cn" if self.region.startswith("cn-") else "amazonaws.com"
        return f"https://rolesanywhere.{self.region}.{suffix}/sessions"


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig:
    """Which backend mints sessions, and its own section."""

    kind: BackendKind = "local"
    local: LocalBackendConfig = field(default_factory=LocalBackendConfig)
    sts: StsBackendConfig = field(default_factory=StsBackendConfig)
    rolesanywhere: RolesAnywhereConfig = field(default_factory=RolesAnywhereConfig)

    @property
    def lifetime(self) -> timedelta:
        """The lifetime of the sessions this backend asks for."""
        section = self.section
        return section.lifetime if isinstance(section, LocalBackendConfig) else section.duration

    @property
    def lifetime_key(self) -> str:
        """The key path of that lifetime, for messages."""
        return f"backend.{self.kind}." + ("lifetime" if self.kind == "local" else "duration")

    @property
    def signs_with_certificate(self) -> bool:
        """Whether [backend.rolesanywhere] is in use (directly, or for sts host credentials)."""
        chained = self.kind == "sts" and self.sts.host_credentials == "rolesanywhere"
        return self.kind == "rolesanywhere" or chained

    @property
    def section(self) -> LocalBackendConfig | StsBackendConfig | RolesAnywhereConfig:
        """The configured kind's own section."""
        if self.kind == "local":
            return self.local
        return self.sts if self.kind == "sts" else self.rolesanywhere


def parse_backend(t: Section) -> BackendConfig:
    kinds: tuple[BackendKind, ...] = get_args(BackendKind)  # typed: choice() then checks
    kind: BackendKind = t.take("kind", choice(kinds), "local", one_of(kinds))
    lt = t.table("local", keys_of(LocalBackendConfig))
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
    sts = _sts(t.table("sts", keys_of(StsBackendConfig)), required=kind == "sts")
    chained = kind == "sts" and sts.host_credentials == "rolesanywhere"
    ra = t.table("rolesanywhere", keys_of(RolesAnywhereConfig))
    rolesanywhere = _rolesanywhere(ra, required=kind == "rolesanywhere" or chained)
    if chained and rolesanywhere.role_arn is None:
        allowed = 'the host\'s own role ARN when backend.sts.host_credentials = "rolesanywhere"'
        ra.problem("role_arn", "nothing (the key is missing)", allowed)
    if sts.session_scope == "profile" and "instance_id" in sts.session_tags:
        t.problem(
            "sts.session_tags",
            show(list(sts.session_tags)),
            'tags without "instance_id" when session_scope = "profile" (one session serves many)',
        )
    return BackendConfig(kind=kind, local=local, sts=sts, rolesanywhere=rolesanywhere)


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
    sources: tuple[HostCredentials, ...] = get_args(HostCredentials)
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
        host_credentials=t.take(
            "host_credentials", choice(sources), d.host_credentials, one_of(sources)
        ),
    )


def _rolesanywhere(t: Section, *, required: bool) -> RolesAnywhereConfig:
    d = RolesAnywhereConfig()

    def needed(key: str, convert: Any, default: Any, allowed: str) -> Any:
        if required:
            found = t.require(key, convert, allowed)
            return default if found is None else found
        return t.take(key, convert, default, allowed)

    return RolesAnywhereConfig(
        region=needed("region", matching(REGION), d.region, 'a region name like "eu-west-1"'),
        trust_anchor_arn=needed("trust_anchor_arn", arn_of("trust-anchor"), "",
                                "arn:aws:rolesanywhere:REGION:ACCOUNT:trust-anchor/ID"),
        profile_arn=needed("profile_arn", arn_of("profile"), "",
                           "arn:aws:rolesanywhere:REGION:ACCOUNT:profile/ID"),
        role_arn=t.take("role_arn", matching(ROLE_ARN), None, "arn:aws:iam::ACCOUNT:role/NAME"),
        certificate_file=needed("certificate_file", file_path, d.certificate_file,
                                "the path of the host's PEM certificate"),
        private_key_file=needed("private_key_file", file_path, d.private_key_file,
                                "the path of the certificate's PEM private key (RSA or EC)"),
        certificate_chain_file=t.take("certificate_chain_file", file_path, None,
                                      "the path of the PEM intermediate certificates"),
        duration=t.take("duration", duration_in(STS_DURATION_MIN, STS_DURATION_MAX), d.duration,
                        "a duration from 15m to 12h (CreateSession's 900 to 43200 seconds)"),
        endpoint=t.take("endpoint", http_url, "", "an http:// or https:// base URL"),
        ca_bundle=t.take("ca_bundle", file_path, None, "the path of a PEM CA bundle"),
        role_session_name=t.take("role_session_name", choice(("{instance_id}",)), None,
                                 '"{instance_id}" (the Roles Anywhere profile must accept it)'),
        timeout=t.take("timeout", duration_in(timedelta(seconds=1), timedelta(minutes=5)),
                       d.timeout, "a duration from 1s to 5m"),
    )  # fmt: skip


def arn_of(resource: str) -> Callable[[Any], str]:
    """A Roles Anywhere ARN of one resource type (trust-anchor or profile)."""

    def convert(value: Any) -> str:
        found = matching(ROLESANYWHERE_ARN)(value)
        if f":{resource}/" not in found:
            raise ValueError(value)
        return found

    return convert
