"""make_app(): the guest-facing metadata API as an aiohttp Application.

One catch-all route, the middlewares in their fixed order, and the typed keys. It receives the
domain objects it reads; it never reaches a backend or the scheduler (invariant: the request
path cannot wait on the upstream because it cannot even reach it).
"""

from __future__ import annotations

from aiohttp import web

from imdsd.clock import Clock
from imdsd.imds.handlers import dispatch
from imdsd.imds.keys import CLOCK, INVENTORY, METRICS, SESSIONS, TOKENS, TREES
from imdsd.imds.middlewares import LOGGED_MIDDLEWARES, MIDDLEWARES
from imdsd.imds.tree import TreeCache
from imdsd.inventory import Inventory
from imdsd.metrics import Metrics
from imdsd.sessions import SessionCache
from imdsd.tokens import TokenIssuer


def make_app(
    inventory: Inventory,
    sessions: SessionCache,
    tokens: TokenIssuer,
    clock: Clock,
    metrics: Metrics,
    *,
    log_requests: bool = False,
) -> web.Application:
    """The metadata API for the instances in `inventory` (one debug line per request if asked)."""
    middlewares = LOGGED_MIDDLEWARES if log_requests else MIDDLEWARES
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024)
    app[INVENTORY] = inventory
    app[SESSIONS] = sessions
    app[TOKENS] = tokens
    app[CLOCK] = clock
    app[TREES] = TreeCache()
    app[METRICS] = metrics
    app.router.add_route("*", "/{path:.*}", dispatch)
    return app
