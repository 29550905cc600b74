"""The control plane's leaks and faults: what a removed instance leaves behind, an admin API
bug answered as JSON, a CLI that never prints a traceback, and options logged as fields."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from imdsd.admin.app import make_admin_app
from imdsd.cli.client import request
from imdsd.daemon import Daemon
from tests.helpers import VM_D, http

ADDRESS = "127.0.0.44"
STRAY = "i-0c0de00000000044a"


async def test_an_instance_removed_without_an_association_leaves_nothing_behind(
    daemon: Daemon, url: str
) -> None:
    """Invariant 9 (and 1): an instance that never had an association, crawled by its guest
    and then removed, loses its tree, its budget account and its token incarnation; an
    instance added again at that address is served its own id, not the cached tree."""
    admin = daemon.admin_socket
    body = {"id": STRAY, "addresses": [ADDRESS], "metadata_options": {"http_tokens": "optional"}}
    await request(admin, "POST", "/v1/instances", body)
    trees = len(daemon.api.trees)
    assert (await http(url, "/latest/meta-data/instance-id", source=ADDRESS)).text == STRAY
    assert len(daemon.api.trees) == trees + 1
    assert STRAY in daemon.api.ledger._accounts
    await request(admin, "DELETE", f"/v1/instances/{STRAY}")
    assert len(daemon.api.trees) == trees
    assert STRAY not in daemon.api.ledger._accounts
    assert (await http(url, "/latest/meta-data/instance-id", source=ADDRESS)).status == 404


async def test_metadata_options_are_logged_as_fields(daemon: Daemon) -> None:
    """A metadata-options change is logged as JSON fields, never a Python repr inside a line."""
    with capture_logs() as logs:
        await request(daemon.admin_socket, "PATCH", f"/v1/instances/{VM_D}/metadata-options",
                      {"http_tokens": "optional", "hop_limit": 2})  # fmt: skip
    (line,) = [e for e in logs if e["event"] == "metadata options modified"]
    assert line["http_tokens"] == "optional" and line["hop_limit"] == 2
    assert "MetadataOptions(" not in repr(line)


class Broken(Exception):
    """A bug in imdsd's own code, as an admin handler might meet one."""


def _broken_source() -> dict[str, Any]:
    raise Broken("a bug's own words, not for the caller")


@pytest.fixture
async def broken_admin(daemon: Daemon, tmp_path: Path) -> AsyncIterator[Path]:
    """The real admin app on a unix socket, with a status source that fails (a bug)."""
    app = make_admin_app(daemon.inventory, daemon.sessions, daemon.api.clock, daemon.api.ledger,
                         apply=daemon.apply, settled=daemon.settled, rotate=daemon.rotator.refresh,
                         due=daemon.rotator.due, info={}, source=_broken_source)  # fmt: skip
    async with _unix(app, tmp_path / "broken.sock") as path:
        yield path


@asynccontextmanager
async def _unix(app: web.Application, path: Path) -> AsyncIterator[Path]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    try:
        yield path
    finally:
        await runner.cleanup()


async def test_an_admin_api_bug_is_a_json_500_and_the_cli_says_one_line(
    broken_admin: Path,
) -> None:
    """Invariant 5 for the operator: an unexpected error in an admin handler is a JSON 500
    InternalError (its class logged, its text not sent), and the CLI prints one line and exits
    1, no traceback."""
    with capture_logs() as logs:
        result = await _cli("status", "--socket", str(broken_admin))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("imdsd: InternalError: ") and result.stderr.count("\n") == 1
    assert "bug's own words" not in result.stderr and "Traceback" not in result.stderr
    assert [e["error"] for e in logs if e["log_level"] == "error"] == ["Broken"]


async def test_the_cli_says_one_line_for_an_answer_that_is_not_json(tmp_path: Path) -> None:
    """A 500 page that is not the admin API's JSON (a crash, a proxy) is one line from the
    CLI with exit 1, never a JSONDecodeError traceback."""

    async def crash(request: web.Request) -> web.Response:
        return web.Response(status=500, text="500 Internal Server Error")

    app = web.Application()
    app.router.add_get("/v1/status", crash)
    async with _unix(app, tmp_path / "crash.sock") as path:
        result = await _cli("status", "--socket", str(path))
        assert result.returncode == 1
        assert result.stderr == "imdsd: HTTP500: the daemon's answer is not JSON\n"


async def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "imdsd", *args],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
