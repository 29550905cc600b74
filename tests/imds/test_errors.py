"""Invariant 5 at the last line of defence: a bug inside the pipeline still answers like EC2."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import fields

import pytest
from aiohttp.web import BaseRequest, StreamResponse
from structlog.testing import capture_logs

from imdsd.daemon import Daemon, running
from imdsd.imds.app import MetadataApi
from imdsd.imds.listener import serving_guests
from imdsd.imds.render import ERROR_PAGES
from imdsd.imds.server import GuestServer
from imdsd.model import Instance
from tests.fakes import FakeClock
from tests.helpers import http, make_config

A, D = "127.0.0.2", "127.0.0.5"


class BuggyApi(MetadataApi):
    """The real pipeline with one step that crashes on one path: a stand-in for an imdsd bug
    (no real part can be made to have one on cue)."""

    def endpoint_enabled(self, instance: Instance) -> None:  # type: ignore[override]
        if instance.id.startswith("i-0a"):
            raise RuntimeError("internal detail that must stay inside")


@asynccontextmanager
async def serving_as(
    kind: type[MetadataApi], clock: FakeClock
) -> AsyncIterator[tuple[Daemon, str]]:
    """The real daemon, and beside it a guest listener whose pipeline is `kind` over the same
    parts (the daemon's own MetadataApi fields)."""
    async with running(make_config(), clock) as daemon:
        api = daemon.api
        copy = kind(**{f.name: getattr(api, f.name) for f in fields(api)})
        async with serving_guests(
            GuestServer(copy), [("127.0.0.1", 0)], backlog=8, grace=1
        ) as bound:
            yield daemon, f"http://127.0.0.1:{bound[0][1]}"


@pytest.fixture
async def buggy(clock: FakeClock) -> AsyncIterator[tuple[Daemon, str]]:
    async with serving_as(BuggyApi, clock) as served:
        yield served


async def test_unexpected_exception_becomes_500_page(buggy: tuple[Daemon, str]) -> None:
    """An internal bug yields EC2's 500 page (no traceback, no detail) with Server: EC2ws, an
    error log line naming only the exception class; other VMs are served normally."""
    daemon, url = buggy
    with capture_logs() as logs:
        reply = await http(url, "/latest/meta-data/instance-id", source=A)
    assert (reply.status, reply.body) == (500, ERROR_PAGES[500])
    assert reply.headers["server"] == "EC2ws"
    assert b"internal detail" not in reply.body
    assert [(e["event"], e["error"], e["log_level"]) for e in logs] == [
        ("request failed", "RuntimeError", "error")
    ]
    assert "/latest/meta-data/instance-id" not in str(logs)
    assert (await http(url, "/latest/meta-data/instance-id", source=D)).status == 200
    sample = daemon.api.metrics.registry.get_sample_value(
        "imdsd_requests_total", {"path": "metadata", "status": "500"}
    )
    assert sample == 1


class EscapingApi(MetadataApi):
    """A pipeline that itself crashes: the connection layer's last resort must answer."""

    async def handle(self, request: BaseRequest) -> StreamResponse:
        raise RuntimeError("internal detail that must stay inside")


async def test_exception_escaping_the_pipeline_is_a_logged_500(clock: FakeClock) -> None:
    """Should the pipeline itself raise, the connection answers EC2's 500 page and closes;
    the bug is logged once with its traceback (imdsd's own bug, not the guest's)."""
    async with serving_as(EscapingApi, clock) as (_, url):
        with capture_logs() as logs:
            reply = await http(url, "/", source=A)
    assert (reply.status, reply.body) == (500, ERROR_PAGES[500])
    assert b"internal detail" not in reply.body and reply.headers["server"] == "EC2ws"
    assert [(e["event"], e["status"]) for e in logs] == [("guest connection failed", 500)]
