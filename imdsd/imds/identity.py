"""Who is calling: the socket's peer address, looked up in the inventory.

Never a header (X-Forwarded-For, Forwarded, Host...): those are the caller's own words, and
trusting them would let one VM speak for another (invariant 1).
"""

from __future__ import annotations

from aiohttp import web

from imdsd.inventory import Inventory
from imdsd.model import Instance


def peer_address(request: web.BaseRequest) -> str | None:
    """The IP address at the other end of the TCP connection."""
    transport = request.transport
    if transport is None:
        return None
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if peer else None


def identify(inventory: Inventory, request: web.BaseRequest) -> Instance | None:
    """The instance the request comes from, or None for a stranger."""
    address = peer_address(request)
    return inventory.instance_at(address) if address is not None else None
