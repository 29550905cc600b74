"""The admin lists of a big host are made in bounded steps: the guest loop turns between them
(invariant 9), and the JSON is the same array the CLI always read."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from imdsd.admin import app as admin
from imdsd.budgets import BudgetPolicy, Ledger
from imdsd.cli.client import request
from imdsd.config.instances import instance_from
from imdsd.imds import render
from imdsd.inventory import Inventory
from imdsd.model import InstanceProfile, Role
from imdsd.sessions import SessionCache
from tests.fakes import FakeClock

COUNT = 2 * admin.LISTING_STEP + 1
PROFILE = InstanceProfile(name="p", path="/", id="AIPAPPPPPPPPPPPPPPPPP",
                          role=Role.from_arn("arn:aws:iam::123456789012:role/p"))  # fmt: skip


@pytest.fixture
async def socket_(tmp_path: Path) -> AsyncIterator[Path]:
    listed = [instance_from({"id": f"i-{n:017x}", "addresses": [f"127.5.{n // 250}.{n % 250 + 1}"]})
              for n in range(COUNT)]  # fmt: skip
    clock = FakeClock()
    inventory = Inventory(listed, [PROFILE], [(i.id, "p") for i in listed], clock)
    sessions = SessionCache(render.credentials, render.failure, render.read_credentials)

    async def rotate(_: str) -> None: ...

    async def settled(_: set[str]) -> None: ...

    app = admin.make_admin_app(inventory, sessions, clock, Ledger(BudgetPolicy(), 1024),
                               apply=lambda _: None, settled=settled, rotate=rotate,
                               due=lambda _: None, info={}, source=dict)  # fmt: skip
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(tmp_path / "admin.sock")).start()
    yield tmp_path / "admin.sock"
    await runner.cleanup()


@pytest.mark.parametrize(("url", "view"), [("/v1/instances", "instance_view"),
                                           ("/v1/sessions", "session_view")])  # fmt: skip
async def test_a_listing_is_made_in_bounded_steps(
    socket_: Path, url: str, view: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each row is made in a step of at most LISTING_STEP rows, with a turn of the loop (a
    guest's chance) between steps; the answer is every row, in order."""
    turns: Counter[str] = Counter()
    steps: Counter[int] = Counter()
    made = getattr(admin, view)

    def counted(*args: Any) -> dict[str, Any]:
        steps[turns["loop"]] += 1
        return made(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(admin, view, counted)
    stop = asyncio.Event()

    async def guest() -> None:
        while not stop.is_set():
            turns["loop"] += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(guest())
    rows = await request(socket_, "GET", url)
    stop.set()
    await task
    assert [r.get("id") or r.get("instance") for r in rows] == [f"i-{n:017x}" for n in range(COUNT)]
    assert sum(steps.values()) == COUNT
    assert max(steps.values()) <= admin.LISTING_STEP and len(steps) >= 3
