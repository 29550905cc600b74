"""The metadata tree of one instance, as data: path -> bytes, or a marker for credentials.

Listings are derived from the leaves, never written by hand. A tree is built once per
(instance, association) pair and reused until either changes (they are immutable values,
so an identity check tells). Credential leaves are markers: their bytes live in the
SessionCache, which rotation refreshes. The identity document's signatures are made off the
loop before a guest asks (the Notary: signatures/cache.py); a tree only fetches them.

A host keeps the trees of the guests that read lately (TREES_KEPT), not one per guest that
ever booted: a tree costs ~4 KB and is rebuilt in ~50 us; listings and the values every
instance shares are one object for all trees.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from imdsd.imds import devices, render
from imdsd.inventory import Inventory
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
# Trees kept (~6 KB each, ~8 KB with signatures): the guests reading now (a boot storm's
# crawls, 64 at a time in the bench), with room to spare.
TREES_KEPT = 512
# Instances a turn whose records are read for the notary behind a change (~1 us each alone;
# an etcd load of 10,000 read them in one 23 ms turn)
PREPARE_STEP = 250
# Listings that name what is the instance's own (its MACs): sharing them saves nothing and
# would fill the shared table with one value per instance a host has ever served.
UNIQUE_LISTINGS = frozenset({"meta-data/network/interfaces/macs"})
SHARED_KEPT = 4096  # distinct shared values (listings mostly); past it, the table starts over
# Leaves whose values many instances have in common: kept once (a path's last part).
SHARED_LEAVES = frozenset({
    "ami-launch-index", "instance-life-cycle", "instance-type", "availability-zone", "region",
    "domain", "partition", "device-number", "owner-id", "security-groups", "ami", "root",
})  # fmt: skip


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


Documents = Callable[[], Iterable[tuple[str, bytes, str]]]  # -> (instance id, document, region)


class Notary(Protocol):
    """Who makes the identity document's signatures (signatures.cache.SignatureCache)."""

    async def signatures(self, instance_id: str, document: bytes, region: str) -> Signed:
        """Ready ones, or made now off the loop: never another document's."""

    def prepare(self, instance_ids: Iterable[str], documents: Documents) -> None:
        """Sign these off the loop (`documents` is called there)."""

    def hurry(self, instance_id: str, document: bytes, region: str) -> None:
        """A guest is reading its tree: its document goes first."""

    def forget(self, instance_ids: Iterable[str]) -> None: ...

    def start(self, *, held: bool = False) -> None: ...

    def resume(self) -> None:
        """Signing in bulk may run now (held at start until priming is done)."""

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Tree:
    """One instance's tree; `nodes` maps a path below the version ("meta-data/mac") to a node."""

    instance: Instance
    association: Association | None
    nodes: dict[str, Node] = field(repr=False)
    notary: Notary = field(repr=False)
    signed: list[Signed] = field(default_factory=list, repr=False)  # fetched on first read
    fetching: list[asyncio.Future[Signed]] = field(default_factory=list, repr=False)

    def lookup(self, path: str) -> Node | None:
        """Resolve a request path ("/latest/meta-data/", "/2021-07-15/dynamic/..."). A
        signature is its bytes once fetched; before that, its leaf (see `signature`)."""
        if path == "/":
            return VERSION_LISTING
        version, _, rest = path[1:].partition("/")
        if version not in _VERSIONS:
            return None
        node = self.nodes.get(rest.rstrip("/"))
        if isinstance(node, SignatureLeaf) and self.signed:
            return getattr(self.signed[0], node.kind)  # type: ignore[no-any-return]
        return node

    @property
    def document(self) -> bytes:
        document = self.nodes[IDENTITY_DOCUMENT]
        assert isinstance(document, bytes)  # noqa: S101 -- build() puts bytes there
        return document

    async def signature(self, kind: str) -> bytes:
        """The document's signatures, fetched once per tree: made before the guest asked,
        or, when the guest outran the notary, made then in a thread (never on the loop)."""
        if not self.signed:
            if not self.fetching:  # one fetch per tree, however many requests wait on it
                self.fetching.append(asyncio.ensure_future(self.notary.signatures(
                    self.instance.id, self.document, self.instance.region)))  # fmt: skip
            fetch = self.fetching[0]
            try:
                signed = await asyncio.shield(fetch)
            except Exception:
                if self.fetching and self.fetching[0] is fetch:
                    self.fetching.clear()  # the next request tries again
                raise
            if not self.signed:
                self.signed.append(signed)
        return getattr(self.signed[0], kind)  # type: ignore[no-any-return]


def identity(instance: Instance, association: Association | None, pending: datetime) -> bytes:
    """dynamic/instance-identity/document: what the tree serves and the notary signs."""
    return render.identity_document(instance, _account(instance, association), pending)


def _account(instance: Instance, association: Association | None) -> str:
    return instance.account_id or (
        association.profile.role.account_id if association else DEFAULT_ACCOUNT
    )


def build(instance: Instance, association: Association | None, pending: datetime,
          notary: Notary, shared: dict[bytes, bytes] | None = None) -> Tree:  # fmt: skip
    """Every leaf of the instance's tree, plus the listings derived from them. Values equal
    to one in `shared` (listings, SHARED_LEAVES) are that object: trees share them."""
    partition, domain = _partition(instance.region)
    account = _account(instance, association)
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
    if shared is not None:
        _share(nodes, nodes.keys() - leaves.keys() - unlisted.keys(), shared)
    return Tree(instance=instance, association=association, nodes=nodes, notary=notary)


def _share(nodes: dict[str, Node], directories: set[str], shared: dict[bytes, bytes]) -> None:
    """Listings and common leaves become the one equal object `shared` holds."""
    if len(shared) > SHARED_KEPT:
        shared.clear()  # a host of unlike instances: start over, never grow without bound
    for path, node in nodes.items():
        if type(node) is bytes and (
            (path in directories and path not in UNIQUE_LISTINGS)
            or path.rpartition("/")[2] in SHARED_LEAVES
        ):
            nodes[path] = shared.setdefault(node, node)


def _listings(leaves: dict[str, Node]) -> dict[str, Node]:
    """Each directory's children, sorted; subtrees end in '/', except at the version root."""
    children: dict[str, set[str]] = {}
    for path in leaves:
        directory, _, name = path.rpartition("/")
        while (names := children.get(directory)) is None:  # a directory seen first: its parents
            children[directory] = {name}
            if not directory:
                break
            directory, _, name = directory.rpartition("/")
            name += "/"
        else:
            names.add(name)
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
    """The trees of the instances that read lately, each rebuilt when its instance or
    association changed; the oldest built goes past TREES_KEPT (rebuilt if it reads again).
    Each identity document is signed by the notary, off the loop, when it appears."""

    def __init__(self, notary: Notary, kept: int = TREES_KEPT) -> None:
        self.notary, self._kept = notary, kept
        self._trees: dict[str, Tree] = {}  # oldest built first
        self._shared: dict[bytes, bytes] = {}

    @contextmanager
    def signing(self, inventory: Inventory) -> Iterator[None]:
        """The notary's thread, for as long as the daemon runs; it starts with every
        instance's document (those kept from the last run are not signed again), signed in
        bulk once `resume_signing()` says start-up's own work is done."""
        self.prepare(inventory)
        self.notary.start(held=True)
        try:
            yield
        finally:
            self.notary.close()

    def resume_signing(self) -> None:
        self.notary.resume()

    def prepare(self, inventory: Inventory, instance_ids: Iterable[str] | None = None) -> None:
        """Have the notary sign these instances' documents (every instance's: None), as they
        are now; the documents are rendered and signed in its thread, not on the loop."""
        if instance_ids is None:
            instances = inventory.instances()
        else:
            instances = [i for i in map(inventory.instance, instance_ids) if i is not None]
        now = [(i, inventory.association(i.id), inventory.launched_at(i.id)) for i in instances]
        self.notary.prepare(
            [i.id for i in instances],
            lambda: ((i.id, identity(i, a, p), i.region) for i, a, p in now),
        )

    def prepare_soon(self, inventory: Inventory, instance_ids: Iterable[str]) -> None:
        """prepare() behind this call, PREPARE_STEP instances a turn, each as it is then (a
        guest that reads its document first has it signed at once anyway)."""
        ids = list(instance_ids)
        loop = asyncio.get_running_loop()

        def step(start: int) -> None:
            self.prepare(inventory, ids[start : start + PREPARE_STEP])
            if start + PREPARE_STEP < len(ids):
                loop.call_soon(step, start + PREPARE_STEP)

        loop.call_soon(step, 0)

    def forget(self, instance_ids: Iterable[str]) -> None:
        """Drop the trees and signatures of instances that are gone (short-lived VMs)."""
        instance_ids = list(instance_ids)
        for instance_id in instance_ids:
            self._trees.pop(instance_id, None)
        self.notary.forget(instance_ids)

    def __len__(self) -> int:
        return len(self._trees)

    def get(self, instance: Instance, association: Association | None, pending: datetime) -> Tree:
        tree = self._trees.get(instance.id)
        if tree is None or tree.instance is not instance or tree.association is not association:
            tree = build(instance, association, pending, self.notary, self._shared)
            self._trees.pop(instance.id, None)  # the newest built goes last
            if len(self._trees) >= self._kept:
                del self._trees[next(iter(self._trees))]
            self._trees[instance.id] = tree
            self.notary.hurry(instance.id, tree.document, instance.region)
        return tree
