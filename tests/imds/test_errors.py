"""Invariant 5 at the last line of defence: a handler that crashes still answers like EC2."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from imdsd.imds.keys import METRICS
from imdsd.imds.middlewares import errors
from imdsd.imds.render import ERROR_PAGES
from imdsd.metrics import Metrics


async def test_unexpected_exception_becomes_500_page(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    """An internal bug yields EC2's 500 page (no traceback, no detail) and an error log line
    naming only the exception class; the next request is served normally."""

    async def broken(request: web.Request) -> web.Response:
        if request.path == "/boom":
            raise RuntimeError("internal detail that must stay inside")
        return web.Response(text="fine")

    app = web.Application(middlewares=[errors])
    app[METRICS] = metrics = Metrics()
    app.router.add_get("/{tail:.*}", broken)
    client: TestClient = await aiohttp_client(app)
    with capture_logs() as logs:
        reply = await client.get("/boom")
        body = await reply.read()
    assert reply.status == 500 and body == ERROR_PAGES[500]
    assert b"internal detail" not in body
    assert {
        "event": "request failed",
        "error": "RuntimeError",
        "path": "/boom",
        "log_level": "error",
    } in logs
    assert (await (await client.get("/ok")).text()) == "fine"
    assert (
        metrics.registry.get_sample_value(
            "imdsd_requests_total", {"path": "metadata", "status": "500"}
        )
        == 1
    )
