"""[backend]: which backend mints sessions, and each backend's own section."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal, get_args

from imdsd.config.converters import (
    aes_key,
    choice,
    choices_list,
    duration_in,
    http_url,
    matching,
    nonempty,
    one_of,
)
from imdsd.config.instances import REGION
from imdsd.config.reader import Section, keys_of, show

BackendKind = Literal["local", "sts"]
SessionScope = Literal["instance", "profile"]
SessionTag = Literal["instance_id", "host"]
STS_DURATION_MIN = timedelta(seconds=900)  # AssumeRole's DurationSeconds limits
STS_DURATION_MAX = timedelta(seconds=43200)
STS_NAME = re.compile(r"[\w+=,.@{}-]{2,64}", re.ASCII)  # RoleSessionName/SourceIdentity, + {host}
H = timedelta(hours=1)


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
    if sts.session_scope == "profile" and "instance_id" in sts.session_tags:
        t.problem(
            "sts.session_tags",
            show(list(sts.session_tags)),
            'tags without "instance_id" when session_scope = "profile" (one session serves many)',
        )
    return BackendConfig(kind=kind, local=local, sts=sts)


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
