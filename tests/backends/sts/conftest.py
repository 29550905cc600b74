"""Fixtures for the sts backend: moto (once per module), the fault proxy, the daemon in process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any

import pytest

from imdsd.config import Config, parse
from imdsd.daemon import Daemon, running
from tests.backends.sts.upstream import ROLE_A, ROLE_B, ROLE_DENIED, FaultySts, Moto, start_moto
from tests.fakes import FakeClock
from tests.helpers import _SEQUENCE, SCRATCH, host_sections, isolate

VM_A, VM_B, VM_D = "i-0aaaaaaaaaaaaaaaa", "i-0bbbbbbbbbbbbbbbb", "i-0dddddddddddddddd"
A, B, D = "127.0.0.2", "127.0.0.3", "127.0.0.5"


def sts_config(endpoint: str, extra: str = "", backend: str = "") -> Config:
    return parse(f"""
[imds]
listeners = ["127.0.0.1:0"]
{host_sections(SCRATCH / f"sts-{next(_SEQUENCE)}")}[log]
level = "debug"
[rotation]
max_rate = 10000
[backend]
kind = "sts"
[backend.sts]
region = "us-east-1"
endpoint_url = "{endpoint}"
timeout = "2s"
{backend}
[[instance_profiles]]
name = "profile-a"
role_arn = "{ROLE_A}"
[[instance_profiles]]
name = "profile-b"
role_arn = "{ROLE_B}"
external_id = "imdsd-test-external-id"
[[instance_profiles]]
name = "profile-denied"
role_arn = "{ROLE_DENIED}"
[[instances]]
id = "{VM_A}"
addresses = ["{A}"]
metadata_options = {{ http_tokens = "optional" }}
[[instances]]
id = "{VM_B}"
addresses = ["{B}"]
metadata_options = {{ http_tokens = "optional" }}
[[instances]]
id = "{VM_D}"
addresses = ["{D}"]
metadata_options = {{ http_tokens = "optional" }}
[[associations]]
instance = "{VM_A}"
profile = "profile-a"
[[associations]]
instance = "{VM_B}"
profile = "profile-b"
{extra}
""")


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    server = start_moto()
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)


@pytest.fixture
def host_env(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The daemon's own AWS identity: the host user, from the environment (the standard chain)."""
    isolate(monkeypatch)
    env = moto.host_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
async def proxy(moto: Moto) -> AsyncIterator[FaultySts]:
    faulty = FaultySts(upstream=moto.url)
    await faulty.start()
    yield faulty
    await faulty.close()


@pytest.fixture
def clock() -> FakeClock:
    """Anchored at the real now: moto stamps sessions with real time."""
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def sts_daemon(host_env: dict[str, str], proxy: FaultySts,
               clock: FakeClock) -> Callable[..., AbstractAsyncContextManager[Daemon]]:  # fmt: skip
    """Start the real daemon (sts backend, through the fault proxy) with optional extra TOML."""

    def start(extra: str = "", backend: str = "") -> AbstractAsyncContextManager[Daemon]:
        return running(sts_config(proxy.url, extra, backend), clock)

    return start


async def run_guest(
    daemon_url: str, moto: Moto, source: str, partner: str | None = None
) -> dict[str, Any]:
    """A guest process bound to `source`, with only the metadata endpoint configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_EC2_METADATA_SERVICE_ENDPOINT": daemon_url, "HOME": "/nonexistent",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}  # fmt: skip
    args = [sys.executable, "-m", "tests.backends.sts.guest", source, moto.url] + (
        [partner] if partner else []
    )
    process = await asyncio.create_subprocess_exec(*args, env=env, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()[-3000:]
    return dict(json.loads(out))
