"""Value types in EC2/IAM vocabulary: instances, instance profiles, roles, sessions.

Frozen and slotted; secrets are `repr=False` so no repr, log line or traceback shows them.
Imports the standard library only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

HttpTokens = Literal["optional", "required"]
HttpEndpoint = Literal["enabled", "disabled"]
InstanceMetadataTags = Literal["enabled", "disabled"]
USER_DATA_MAX_BYTES = 16 * 1024  # EC2's limit on user data (before base64)

INSTANCE_ID = re.compile(r"i-(?:[0-9a-f]{8}|[0-9a-f]{17})")
PROFILE_ID = re.compile(r"AIPA[A-Z0-9]{17}")
# IAM names: letters, digits and +=,.@_- ; paths are /-delimited segments of the same.
IAM_NAME = re.compile(r"[\w+=,.@-]{1,128}", re.ASCII)
IAM_PATH = re.compile(r"/(?:[\w+=,.@-]+/)*", re.ASCII)
ROLE_ARN = re.compile(
    r"arn:(?P<partition>aws[a-z-]*):iam::(?P<account>\d{12}):role"
    r"(?P<path>/(?:[\w+=,.@-]+/)*)(?P<name>[\w+=,.@-]{1,64})",
    re.ASCII,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Role:
    """An IAM role, known by its ARN."""

    arn: str
    partition: str
    account_id: str
    name: str

    @classmethod
    def from_arn(cls, arn: str) -> Role:
        """Parse `arn:PARTITION:iam::ACCOUNT:role[/path/]NAME`; ValueError if it is not one."""
        m = ROLE_ARN.fullmatch(arn)
        if m is None:
            raise ValueError(arn)
        return cls(arn=arn, partition=m["partition"], account_id=m["account"], name=m["name"])


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceProfile:
    """A named container for exactly one role, as in IAM."""

    name: str
    path: str
    id: str
    role: Role
    external_id: str | None = None  # sent with AssumeRole when the role's trust policy asks

    @property
    def arn(self) -> str:
        """Derived like IAM's: the role's partition and account, then path and name."""
        return (
            f"arn:{self.role.partition}:iam::{self.role.account_id}:"
            f"instance-profile{self.path}{self.name}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class MetadataOptions:
    """EC2's InstanceMetadataOptions for one instance."""

    http_tokens: HttpTokens = "required"
    hop_limit: int = 1
    http_endpoint: HttpEndpoint = "enabled"
    instance_metadata_tags: InstanceMetadataTags = "disabled"  # tags/instance in the tree


DEVICE_SCOPE, NETNS_SCOPE = "dev:", "netns:"


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkInterface:
    """One of the instance's network interfaces (EC2's ENI), as network/interfaces/macs/<mac>/
    serves it. Ids left out are derived (stable, from the instance id and the MAC or CIDR)."""

    mac: str
    device_number: int = 0
    addresses: tuple[str, ...] = ()  # its private IPv4 addresses, the primary first
    subnet: str | None = None  # IPv4 CIDR; None: the /24 of the primary address
    ipv6: tuple[str, ...] = ()
    ipv6_subnet: str | None = None  # None: the /64 of the first IPv6 address
    vpc_cidr: str | None = None  # None: the subnet's
    interface_id: str | None = None  # "eni-..."
    subnet_id: str | None = None  # "subnet-..."
    vpc_id: str | None = None  # "vpc-..."
    security_groups: tuple[str, ...] = ("default",)


@dataclass(frozen=True, slots=True, kw_only=True)
class Instance:
    """One VM, known by where its traffic arrives (the host's namespace, or a named one; maybe
    one host device) and its source addresses there (none: every address on its device)."""

    id: str
    addresses: tuple[str, ...]
    region: str
    availability_zone: str
    instance_type: str
    local_ipv4: str
    # As configured; None when left to EC2-like defaults, which are derived when read (a host
    # with thousands of instances keeps no three strings each that it can work out again).
    ami_id: str | None = None
    hostname: str | None = None
    mac: str | None = None
    account_id: str | None = None
    options: MetadataOptions = field(default_factory=MetadataOptions)
    user_data: bytes | None = field(default=None, repr=False)  # may hold the guest's secrets
    tags: tuple[tuple[str, str], ...] = ()  # (key, value), as EC2's instance tags
    # None: one interface made from `mac` and `addresses` (see `interfaces`)
    network_interfaces: tuple[NetworkInterface, ...] | None = None
    public_keys: tuple[str, ...] = ()  # OpenSSH public keys ("ssh-ed25519 AAAA... comment")
    block_devices: tuple[tuple[str, str], ...] = ()  # ("ephemeral0", "/dev/vdb"); ami, root
    host_interface: str | None = None  # the host device its packets arrive on (tap, bridge, VRF)
    host_netns: str | None = None  # the named network namespace (/run/netns) they arrive in

    @property
    def scope(self) -> str | None:
        """Where its traffic arrives: "dev:NAME", "netns:NAME", or None (the host's own
        namespace, any device): two instances may share an address only in different scopes."""
        if self.host_interface is not None:
            return DEVICE_SCOPE + self.host_interface
        if self.host_netns is not None:
            return NETNS_SCOPE + self.host_netns
        return None

    @property
    def interfaces(self) -> tuple[NetworkInterface, ...]:
        """The configured interfaces, or the one EC2 would give: the instance's MAC and its
        addresses (IPv4 and IPv6), device 0."""
        if self.network_interfaces is not None:
            return self.network_interfaces
        ipv4 = tuple(a for a in self.addresses if ":" not in a)
        ipv6 = tuple(a for a in self.addresses if ":" in a)
        return (NetworkInterface(mac=self.mac_address, addresses=ipv4, ipv6=ipv6),)

    @property
    def image_id(self) -> str:
        """ami_id, else a stable one derived from the instance id."""
        return self.ami_id or "ami-" + self._digest()[:17]

    @property
    def private_dns_name(self) -> str:
        """hostname, else EC2's form for the instance's IPv4 address in its region."""
        if self.hostname:
            return self.hostname
        domain = "ec2.internal" if self.region == "us-east-1" else f"{self.region}.compute.internal"
        return f"ip-{self.local_ipv4.replace('.', '-').replace(':', '-')}.{domain}"

    @property
    def mac_address(self) -> str:
        """mac, else device 0's, else a locally administered one (02:...) derived from the
        instance id."""
        if self.mac:
            return self.mac
        if self.network_interfaces:
            return min(self.network_interfaces, key=lambda n: n.device_number).mac
        digest = self._digest()
        return "02:" + ":".join(digest[i : i + 2] for i in range(0, 10, 2))

    def _digest(self) -> str:
        """What the derived ami id and mac are made of: SHA-256 of the instance id, in hex."""
        return hashlib.sha256(self.id.encode()).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Association:
    """Instance -> instance profile; at most one per instance."""

    instance_id: str
    profile: InstanceProfile
    associated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """Temporary credentials vended for one association."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    token: str = field(repr=False)
    expiration: datetime  # aware, UTC
    issued_at: datetime

    @property
    def lifetime(self) -> float:
        """Seconds between issue and expiry."""
        return (self.expiration - self.issued_at).total_seconds()


def key_display(access_key_id: str) -> str:
    """An access key id as logs and admin output show it: its last four characters (ASCII,
    so JSON logs stay readable: aws-vault's FormatKeyForDisplay)."""
    return "****" + access_key_id[-4:]


@dataclass(frozen=True, slots=True, kw_only=True)
class RotationPolicy:
    """When sessions are refreshed, and how failures are retried.

    refresh at min(issued + fraction * lifetime, expiration - refresh_before) - jitter * u,
    u uniform in [0, 1); min_remaining is the freshness floor served while the issuer is healthy.
    """

    refresh_fraction: float = 0.5
    refresh_before: timedelta = timedelta(minutes=60)
    min_remaining: timedelta = timedelta(minutes=30)
    jitter: timedelta = timedelta(minutes=10)
    retry_initial: timedelta = timedelta(seconds=1)
    retry_max: timedelta = timedelta(minutes=5)
    concurrency: int = 8
    max_rate: int = 20  # issuer calls a second at most, halved for a while after throttling
    startup_deadline: timedelta = timedelta(seconds=20)  # priming waits this long at most
