"""Thin answers: the token endpoint, and the instance's tree as prepared bytes.

The credential path does one dict lookup and one expiry comparison (SessionCache.answer);
everything else was rendered at rotation or association time. The token PUT is one MAC and
one prepared write (no response object, no header dict).
"""

from __future__ import annotations

import socket
from collections.abc import Coroutine
from typing import Protocol

from aiohttp import web

from imdsd.clock import Clock
from imdsd.errors import Ec2Error
from imdsd.imds import prepared
from imdsd.imds.prepared import TTL_HEADER, Prepared
from imdsd.imds.tree import CredentialLeaf, SignatureLeaf, Tree, TreeCache
from imdsd.inventory import Inventory
from imdsd.model import Instance
from imdsd.sessions import SessionCache
from imdsd.tokens import TokenIssuer, parse_ttl


class Reads(Protocol):
    """What an answer reads (the pipeline, imds.app.MetadataApi, has it): the handlers take
    no more than this, so they need nothing of the pipeline's own module."""

    inventory: Inventory
    sessions: SessionCache
    tokens: TokenIssuer
    clock: Clock
    trees: TreeCache


Answer = Prepared | Coroutine[None, None, Prepared]
TOKEN_PATH = "/latest/api/token"  # noqa: S105 -- a URL path, not a password


def answer(api: Reads, request: web.BaseRequest, instance: Instance) -> Answer:
    """The token endpoint takes PUT, the tree takes GET and HEAD. Prepared bytes at once, or
    (a signature the notary has not handed this tree yet) a coroutine that awaits them."""
    if request.path == TOKEN_PATH:
        if request.method != "PUT":
            raise Ec2Error(405, "wrong method on the token path")
        return token(api, request, instance)
    if request.method not in ("GET", "HEAD"):
        raise Ec2Error(405, "wrong method on a metadata path")
    return metadata(api, request, instance)


def metadata(api: Reads, request: web.BaseRequest, instance: Instance) -> Answer:
    """GET of any tree path: a leaf, a listing, or the role's credential document."""
    inventory = api.inventory
    association = inventory.association(instance.id)
    tree = api.trees.get(instance, association, inventory.launched_at(instance.id))
    node = tree.lookup(request.path)
    if node is None:
        raise Ec2Error(404, "no such path")
    if isinstance(node, CredentialLeaf):
        body, closing = api.sessions.answer(
            instance.id, node.role_arn, extended=node.extended, now=api.clock.now()
        )
    elif isinstance(node, SignatureLeaf):
        return signature(tree, node.kind, request.method == "GET")
    else:
        body, closing = node, b""
    if request.method == "GET":
        return Prepared(body, closing)  # the hot path: one prepared write
    return prepared.head_only(body, closing)


async def signature(tree: Tree, kind: str, get: bool) -> Prepared:
    """A signature the tree fetches once from the notary (made off the loop)."""
    body = await tree.signature(kind)
    return Prepared(body) if get else prepared.head_only(body)


def token(api: Reads, request: web.BaseRequest, instance: Instance) -> Prepared:
    """PUT /latest/api/token: a session token for the calling instance."""
    if "X-Forwarded-For" in request.headers:
        # EC2 refuses tokens to requests that went through a proxy.
        raise Ec2Error(403, "token PUT carried X-Forwarded-For")
    try:
        ttl = parse_ttl(request.headers.get(TTL_HEADER))
    except ValueError:
        raise Ec2Error(400, "missing or invalid token TTL") from None
    set_hop_limit(request, instance.options.hop_limit)
    value = api.tokens.mint(api.inventory.token_subject(instance.id), ttl)
    return prepared.token(value.encode(), ttl)


def set_hop_limit(request: web.BaseRequest, hops: int) -> None:
    """EC2's HttpPutResponseHopLimit: the token reply's packets leave with this IP TTL (IPv6
    hop limit), so a caller more hops away (a container behind the VM) never receives it.
    The setting stays on the connection (a caller too far away never got this reply anyway),
    so a connection's next PUT costs no system call unless the instance's hop limit changed."""
    protocol = request.protocol
    if protocol.hop_limit == hops:  # type: ignore[attr-defined]
        return
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport else None
    if sock is None:
        return
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, hops)
    if sock.family == socket.AF_INET or protocol.peer.startswith("::ffff:"):  # type: ignore[attr-defined]
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, hops)
    protocol.hop_limit = hops  # type: ignore[attr-defined]
