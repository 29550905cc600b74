"""The guest API's security checks and error shaping, one middleware each, in a fixed order.

    [request log, only at debug] -> errors -> identify -> endpoint -> token policy -> handler

Each middleware states the threat it stops. Internal detail goes to the log, never into a
response: a guest sees only EC2's status codes and pages.
"""

from __future__ import annotations

import time

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from imdsd.imds import render
from imdsd.imds.identity import identify, peer_address
from imdsd.imds.keys import INSTANCE, INVENTORY, METRICS, TOKENS
from imdsd.metrics import PathClass

TOKEN_PATH = "/latest/api/token"  # noqa: S105 -- a URL path, not a password
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 -- a header name
TEXT = "text/plain"
SERVER = "EC2ws"
log = structlog.get_logger("imdsd.imds")
REASON = web.RequestKey("reason", str)  # why a request was refused, for the debug line


class Ec2Error(Exception):
    """Answer with EC2's page for this status; `reason` is for the log only."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def error_page(status: int) -> web.Response:
    return web.Response(
        status=status,
        body=render.ERROR_PAGES[status],
        content_type="text/html",
        headers={"Server": SERVER},
    )


def path_class(path: str) -> PathClass:
    """Which kind of path a request asked for, as the metrics label it."""
    if path == TOKEN_PATH:
        return "token"
    if "/iam/security-credentials" in path:
        return "credentials"
    return "identity" if "/dynamic/" in path else "metadata"


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Threat: a malformed request that crashes a handler and leaks a traceback, or takes the
    daemon down for every VM. Every failure becomes an EC2 status page. Counts every answer."""
    try:
        response = await handler(request)
    except Ec2Error as exc:
        request[REASON] = str(exc)
        response = error_page(exc.status)
    except web.HTTPException as exc:
        request[REASON] = exc.reason
        response = error_page(exc.status if exc.status in render.ERROR_PAGES else 400)
    except Exception as exc:
        log.error("request failed", error=exc.__class__.__name__, path=request.path)
        response = error_page(500)
    request.app[METRICS].request(path_class(request.path), response.status)
    return response


@web.middleware
async def request_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One canonical debug line per request. Installed only when the level is debug, so the
    production hot path neither builds nor filters log fields."""
    started = time.perf_counter()
    response = await handler(request)
    instance = request.get(INSTANCE)
    log.debug(
        "request",
        method=request.method,
        path=request.path,
        status=response.status,
        instance=instance.id if instance else None,
        peer=peer_address(request),
        reason=request.get(REASON),
        ms=round((time.perf_counter() - started) * 1000, 3),
    )
    return response


@web.middleware
async def identified(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Threat: a caller that is no known instance (or claims to be another one). The peer
    address alone decides; strangers get 404 and learn nothing about any instance."""
    instance = identify(request.app[INVENTORY], request)
    if instance is None:
        raise Ec2Error(404, "unknown caller")
    request[INSTANCE] = instance
    return await handler(request)


@web.middleware
async def endpoint_enabled(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Threat: metadata served to an instance whose operator turned IMDS off
    (EC2's HttpEndpoint=disabled answers 403 to everything)."""
    if request[INSTANCE].options.http_endpoint == "disabled":
        raise Ec2Error(403, "http_endpoint disabled")
    return await handler(request)


@web.middleware
async def token_policy(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Threat: SSRF-style reads without a session token, and tokens replayed from another
    instance. A presented token must be valid for this instance (401 otherwise); without one,
    only an instance with http_tokens=optional is served."""
    if request.path == TOKEN_PATH:
        return await handler(request)
    instance = request[INSTANCE]
    token = request.headers.get(TOKEN_HEADER)
    if token is not None:
        if not request.app[TOKENS].verify(token, instance.id):
            raise Ec2Error(401, "invalid or expired token")
    elif instance.options.http_tokens == "required":
        raise Ec2Error(401, "token required")
    return await handler(request)


MIDDLEWARES = (errors, identified, endpoint_enabled, token_policy)
LOGGED_MIDDLEWARES = (request_log, *MIDDLEWARES)
