"""Thin handlers: look the path up in the instance's tree, return prepared bytes.

The credential path does one dict lookup and one expiry comparison (SessionCache.answer);
everything else was rendered at rotation or association time.
"""

from __future__ import annotations

import socket

from aiohttp import web

from imdsd.imds.keys import CLOCK, INSTANCE, INVENTORY, SESSIONS, TOKENS, TREES
from imdsd.imds.middlewares import SERVER, TEXT, TOKEN_PATH, Ec2Error
from imdsd.imds.tree import CredentialLeaf
from imdsd.tokens import parse_ttl

TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
_HEADERS = {"Server": SERVER}


async def dispatch(request: web.Request) -> web.Response:
    """The one route: the token endpoint takes PUT, the tree takes GET and HEAD."""
    if request.path == TOKEN_PATH:
        if request.method != "PUT":
            raise Ec2Error(405, f"{request.method} on the token path")
        return token(request)
    if request.method not in ("GET", "HEAD"):
        raise Ec2Error(405, f"{request.method} on a metadata path")
    return metadata(request)


def metadata(request: web.Request) -> web.Response:
    """GET of any tree path: a leaf, a listing, or the role's credential document."""
    instance = request[INSTANCE]
    inventory = request.app[INVENTORY]
    association = inventory.association(instance.id)
    tree = request.app[TREES].get(instance, association, inventory.launched_at(instance.id))
    node = tree.lookup(request.path)
    if node is None:
        raise Ec2Error(404, "no such path")
    if isinstance(node, CredentialLeaf):
        node = request.app[SESSIONS].answer(
            instance.id,
            node.role_arn,
            extended=node.extended,
            now=request.app[CLOCK].now(),
        )
    return web.Response(body=node, content_type=TEXT, headers=_HEADERS)


def token(request: web.Request) -> web.Response:
    """PUT /latest/api/token: a session token for the calling instance."""
    if "X-Forwarded-For" in request.headers:
        # EC2 refuses tokens to requests that went through a proxy.
        raise Ec2Error(403, "token PUT carried X-Forwarded-For")
    try:
        ttl = parse_ttl(request.headers.get(TTL_HEADER))
    except ValueError:
        raise Ec2Error(400, "missing or invalid token TTL") from None
    instance = request[INSTANCE]
    set_hop_limit(request, instance.options.hop_limit)
    body = request.app[TOKENS].mint(instance.id, ttl).encode()
    return web.Response(body=body, content_type=TEXT, headers={**_HEADERS, TTL_HEADER: str(ttl)})


def set_hop_limit(request: web.Request, hops: int) -> None:
    """EC2's HttpPutResponseHopLimit: the token reply's packets leave with this IP TTL (IPv6
    hop limit), so a caller more hops away (a container behind the VM) never receives it.
    The setting stays on the connection: a caller too far away never got this reply anyway."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport else None
    if sock is None:
        return
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, hops)
    if sock.family == socket.AF_INET or _v4_mapped(request):
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, hops)


def _v4_mapped(request: web.Request) -> bool:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport else None
    return peer is not None and str(peer[0]).startswith("::ffff:")
