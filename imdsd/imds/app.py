"""The guest API's request pipeline: one function per threat, in a fixed order, then bytes.

    identify -> HTTP version -> budget -> body limit -> endpoint -> token policy -> answer

Every step names the threat it stops and refuses with EC2's status; the pipeline turns any
refusal, and any bug, into EC2's page (internal detail goes to the log, never into a reply).
It receives the domain objects it reads and never reaches a backend or the scheduler: the
request path cannot wait on the upstream because it cannot even reach it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog
from aiohttp import web

from imdsd.budgets import STRANGERS, Incident, Ledger
from imdsd.clock import Clock
from imdsd.errors import Ec2Error
from imdsd.imds.handlers import TOKEN_PATH, answer
from imdsd.imds.prepared import Prepared, refusal
from imdsd.imds.tree import TreeCache
from imdsd.inventory import Inventory
from imdsd.metrics import Metrics, PathClass
from imdsd.model import Instance
from imdsd.sessions import SessionCache
from imdsd.tokens import TokenIssuer

TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105 -- a header name
# The methods the debug line names; any other is "other" (a method is the guest's own text).
METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"})
log = structlog.get_logger("imdsd.imds")
UNSUPPORTED_VERSION = web.RequestKey("unsupported_version", bool)  # set by the connection layer


def path_class(path: str) -> PathClass:
    """Which kind of path a request asked for, as the metrics label it."""
    if path == TOKEN_PATH:
        return "token"
    if "/iam/security-credentials" in path:
        return "credentials"
    return "identity" if "/dynamic/" in path else "metadata"


@dataclass(slots=True, kw_only=True)
class MetadataApi:
    """What the guest API reads, and the pipeline that answers one request."""

    inventory: Inventory
    sessions: SessionCache
    tokens: TokenIssuer
    clock: Clock
    metrics: Metrics
    ledger: Ledger
    trees: TreeCache
    log_requests: bool = False  # one debug line per request (only when the level is debug)

    def guest(self, peer: str, scope: str | None = None) -> Instance | None:
        """The instance a socket peer address in a scope belongs to; None for a stranger."""
        return self.inventory.instance_at(peer, scope)

    def incident(self, key: str, incident: Incident) -> None:
        """A guest-caused event: counted in metrics and in the guest's next summary line."""
        self.ledger.note(key, incident)
        self.metrics.limit(incident)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse | Prepared:
        """The pipeline. `request.protocol.peer` is the connection's peer address."""
        started = time.perf_counter() if self.log_requests else 0.0
        instance: Instance | None = None
        reason: str | None = None
        try:
            instance = await self.identify(request)
            self.supported_version(request, instance)
            await self.within_budget(instance)
            self.bounded_body(request, instance)
            self.endpoint_enabled(instance)
            self.token_policy(request, instance)
            response = answer(self, request, instance)
            if not isinstance(response, Prepared):
                response = await response  # a signature being made off the loop
        except Ec2Error as exc:
            head = request.method == "HEAD"
            response = refusal(exc.http_status, close=exc.close, head=head)
            reason = str(exc) if self.log_requests else None
        except Exception as exc:
            # imdsd's own bug: its class, never the guest's bytes (the path is the guest's).
            log.error("request failed", error=exc.__class__.__name__, exc_info=exc)
            response = refusal(500, head=request.method == "HEAD")
            reason = "internal error"
        kind = path_class(request.path)
        self.metrics.request(kind, response.status)
        if self.log_requests:  # the path class and a fixed reason: no guest bytes in the log
            log.debug(
                "request",
                method=request.method if request.method in METHODS else "other",
                path=kind,
                status=response.status,
                instance=instance.id if instance else None,
                reason=reason,
                ms=round((time.perf_counter() - started) * 1000, 3),
            )
        return response

    async def identify(self, request: web.BaseRequest) -> Instance:
        """Threat: a caller that is no known instance, or claims to be another one. The socket
        peer address alone decides (never a header). Strangers get 404 and learn nothing about
        any instance, whatever they send; their shared budget holds back a flood of them."""
        protocol = request.protocol
        instance = self.guest(protocol.peer, protocol.scope)  # type: ignore[attr-defined]
        if instance is None:
            wait = self.ledger.spend(STRANGERS)
            if wait:
                self.incident(STRANGERS, "throttled")
                await asyncio.sleep(wait)
            raise Ec2Error(404, "unknown caller")
        return instance

    def supported_version(self, request: web.BaseRequest, instance: Instance) -> None:
        """Threat: request lines the parser tolerates but EC2 does not serve (HTTP/0.9, /2.0,
        /9.9 ...): answered 400 like any request the parser refuses, and counted as one."""
        # len() first: the request's state is empty for every supported request, and a lookup
        # that misses costs a KeyError inside Mapping.get on each of them.
        if len(request) and request.get(UNSUPPORTED_VERSION):
            self.incident(instance.id, "bad_request")
            raise Ec2Error(400, "unsupported HTTP version", close=True)

    async def within_budget(self, instance: Instance) -> None:
        """Threat: one guest's request loop starving every other guest of the one process.
        Each instance has a token bucket; past it, the answer is 429 and is held back until a
        token is due (bounded), so a loop of retries cannot spin the daemon either. Every
        request from the instance spends, refused ones included."""
        wait = self.ledger.spend(instance.id)
        if wait:
            self.incident(instance.id, "throttled")
            await asyncio.sleep(wait)
            raise Ec2Error(429, "request budget exhausted")

    def bounded_body(self, request: web.BaseRequest, instance: Instance) -> None:
        """Threat: a body streamed at the daemon to hold memory or a connection. No endpoint
        reads a body: one declared beyond max_body (or of unknown length) is refused and the
        connection closed, unread."""
        if not request.body_exists:
            return
        length = request.content_length
        if length is None or length > self.ledger.policy.max_body:
            self.incident(instance.id, "body_limit")
            raise Ec2Error(400, "request body over the limit", close=True)

    @staticmethod
    def endpoint_enabled(instance: Instance) -> None:
        """Threat: metadata served to an instance whose operator turned IMDS off
        (EC2's HttpEndpoint=disabled answers 403 to everything)."""
        if instance.options.http_endpoint == "disabled":
            raise Ec2Error(403, "http_endpoint disabled")

    def token_policy(self, request: web.BaseRequest, instance: Instance) -> None:
        """Threat: SSRF-style reads without a session token, and tokens replayed from another
        instance or from an earlier incarnation of this one. A presented token must be valid
        for this incarnation (401 otherwise); without one, only http_tokens=optional serves."""
        if request.path == TOKEN_PATH:
            return
        token = request.headers.get(TOKEN_HEADER)
        if token is not None:
            if not self.tokens.verify(token, self.inventory.token_subject(instance.id)):
                raise Ec2Error(401, "invalid or expired token")
        elif instance.options.http_tokens == "required":
            raise Ec2Error(401, "token required")
