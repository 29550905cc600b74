"""The metadata tree of one instance, as data: path -> bytes, or a marker for credentials.

Listings are derived from the leaves, never written by hand. A tree is built once per
(instance, association) pair and reused until either changes (they are immutable values,
so an identity check tells). Credential leaves are markers: their bytes live in the
SessionCache, which rotation refreshes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from imdsd.imds import devices, render
from imdsd.model import Association, Instance

# EC2's `GET /` lists every API version it still answers; all of them serve today's tree.
VERSIONS = (
    "1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15", "2008-02-01",
    "2008-09-01", "2009-04-04", "2011-01-01", "2011-05-01", "2012-01-12", "2014-02-25",
    "2014-11-05", "2015-10-20", "2016-04-19", "2016-06-30", "2016-09-02", "2018-03-28",
    "2018-08-17", "2018-09-24", "2019-10-01", "2020-10-27", "2021-01-03", "2021-03-23",
    "2021-07-15", "2022-09-24", "2024-04-11", "latest",
)  # fmt: skip
VERSION_LISTING = render.listing(VERSIONS)
_VERSIONS = frozenset(VERSIONS)
DEFAULT_ACCOUNT = "000000000000"
IDENTITY_DOCUMENT = "dynamic/instance-identity/document"


@dataclass(frozen=True, slots=True)
class CredentialLeaf:
    """Where the role's credential document goes; `extended` adds AccountId."""

    role_arn: str
    extended: bool


@dataclass(frozen=True, slots=True)
class SignatureLeaf:
    """Where one of the identity document's signatures goes ("signature", "pkcs7", "rsa2048")."""

    kind: str


Node = bytes | CredentialLeaf | SignatureLeaf


class Signed(Protocol):
    """The identity document's signatures (signatures.Signatures has this shape)."""

    @property
    def signature(self) -> bytes: ...
    @property
    def pkcs7(self) -> bytes: ...
    @property
    def rsa2048(self) -> bytes: ...


Sign = Callable[[bytes, str], Signed]  # (document, region) -> its signatures


@dataclass(frozen=True, slots=True)
class Tree:
    """One instance's tree; `nodes` maps a path below the version ("meta-data/mac") to a node."""

    instance: Instance
    association: Association | None
    nodes: dict[str, Node] = field(repr=False)
    sign: Sign = field(repr=False)
    signed: list[Signed] = field(default_factory=list, repr=False)  # made on first read

    def lookup(self, path: str) -> bytes | CredentialLeaf | None:
        """Resolve a request path ("/latest/meta-data/", "/2021-07-15/dynamic/...")."""
        if path == "/":
            return VERSION_LISTING
        version, _, rest = path[1:].partition("/")
        if version not in _VERSIONS:
            return None
        node = self.nodes.get(rest.rstrip("/"))
        return self._signature(node.kind) if isinstance(node, SignatureLeaf) else node

    def _signature(self, kind: str) -> bytes:
        """The document's signatures are made once, at the first read after it changed (a new
        tree): never per request, and not for the instances nobody asks (RSA costs ~2 ms)."""
        if not self.signed:
            document = self.nodes[IDENTITY_DOCUMENT]
            assert isinstance(document, bytes)  # noqa: S101 -- build() puts bytes there
            self.signed.append(self.sign(document, self.instance.region))
        return getattr(self.signed[0], kind)  # type: ignore[no-any-return]


def build(instance: Instance, association: Association | None, pending: datetime,
          sign: Sign) -> Tree:  # fmt: skip
    """Every leaf of the instance's tree, plus the listings derived from them."""
    partition, domain = _partition(instance.region)
    account = instance.account_id or (
        association.profile.role.account_id if association else DEFAULT_ACCOUNT
    )
    leaves: dict[str, Node] = {
        "meta-data/ami-id": instance.image_id.encode(),
        "meta-data/ami-launch-index": b"0",
        "meta-data/hostname": instance.private_dns_name.encode(),
        "meta-data/instance-id": instance.id.encode(),
        "meta-data/instance-life-cycle": b"on-demand",
        "meta-data/instance-type": instance.instance_type.encode(),
        "meta-data/local-hostname": instance.private_dns_name.encode(),
        "meta-data/local-ipv4": instance.local_ipv4.encode(),
        "meta-data/mac": instance.mac_address.encode(),
        "meta-data/placement/availability-zone": instance.availability_zone.encode(),
        "meta-data/placement/region": instance.region.encode(),
        "meta-data/services/domain": domain.encode(),
        "meta-data/services/partition": partition.encode(),
    }
    leaves[IDENTITY_DOCUMENT] = render.identity_document(instance, account, pending)
    for kind in ("signature", "pkcs7", "rsa2048"):
        leaves[f"dynamic/instance-identity/{kind}"] = SignatureLeaf(kind)
    if instance.user_data is not None:  # /latest/ lists user-data only where it exists, as EC2
        leaves["user-data"] = instance.user_data
    if instance.options.instance_metadata_tags == "enabled":
        for key, value in instance.tags:
            leaves[f"meta-data/tags/instance/{key}"] = value.encode()
    leaves |= devices.network(instance, account) | devices.block_devices(instance)
    keys, keys_listing = devices.public_keys(instance)
    leaves |= keys
    unlisted: dict[str, Node] = {}
    if association is not None:
        role = association.profile.role
        leaves["meta-data/iam/info"] = render.info(association)
        leaves[f"meta-data/iam/security-credentials/{role.name}"] = CredentialLeaf(role.arn, False)
        # Served, never listed (EC2 lists info and security-credentials/ only): a client that
        # saves what it crawls (cloud-init's instance-data.json, mode 0644) must not save keys.
        extended = f"meta-data/iam/security-credentials-extended/{role.name}"
        unlisted[extended] = CredentialLeaf(role.arn, True)
    nodes = leaves | _listings(leaves)
    if unlisted:
        nodes |= {k: v for k, v in (unlisted | _listings(unlisted)).items() if k not in nodes}
    if keys_listing is not None:  # EC2 lists keys as "0=name", not as the directories they are
        nodes["meta-data/public-keys"] = keys_listing
    return Tree(instance=instance, association=association, nodes=nodes, sign=sign)


def _listings(leaves: dict[str, Node]) -> dict[str, Node]:
    """Each directory's children, sorted; subtrees end in '/', except at the version root."""
    children: dict[str, set[str]] = {}
    for path in leaves:
        parts = path.split("/")
        for depth in range(len(parts)):
            directory = "/".join(parts[:depth])
            has_children = depth < len(parts) - 1
            children.setdefault(directory, set()).add(parts[depth] + ("/" if has_children else ""))
    # EC2 lists /latest/ as plain names ("dynamic", "meta-data"), unlike every level below it.
    children[""] = {name.rstrip("/") for name in children[""]}
    return {
        directory: render.listing(sorted(names, key=lambda name: name.rstrip("/")))
        for directory, names in children.items()
    }


def _partition(region: str) -> tuple[str, str]:
    if region.startswith("cn-"):
        return "aws-cn", "amazonaws.com.cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov", "amazonaws.com"
    return "aws", "amazonaws.com"


class TreeCache:
    """The current tree of each instance, rebuilt only when its instance or association changed
    (its identity document signed then, never per request)."""

    def __init__(self, sign: Sign) -> None:
        self._sign = sign
        self._trees: dict[str, Tree] = {}

    def forget(self, instance_ids: Iterable[str]) -> None:
        """Drop the trees of instances that are gone (hosts with short-lived VMs)."""
        for instance_id in instance_ids:
            self._trees.pop(instance_id, None)

    def __len__(self) -> int:
        return len(self._trees)

    def get(self, instance: Instance, association: Association | None, pending: datetime) -> Tree:
        tree = self._trees.get(instance.id)
        if tree is None or tree.instance is not instance or tree.association is not association:
            tree = self._trees[instance.id] = build(instance, association, pending, self._sign)
        return tree
