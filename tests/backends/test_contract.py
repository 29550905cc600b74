"""One contract for every backend: what the Rotator and the guests rely on, run against each.

A backend is added by adding a harness to HARNESSES: `local` (the embedded issuer), `sts`
(moto's STS behind the FaultySts proxy) and `rolesanywhere` (the fake endpoint that verifies
requests as AWS does). A session for a profile lasting the duration asked; for backends with
an upstream: the duration clamped when the upstream caps it, refusals (not retried soon, their
code in the failure document) vs retryable answers, throttling halving the rate; for all:
cancellation mid-call leaving nothing behind, and no secret in a repr or a log line.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from imdsd.backends import opener
from imdsd.backends.base import Backend
from imdsd.config import Config
from imdsd.errors import BackendError
from imdsd.imds import render
from imdsd.inventory import Inventory
from imdsd.model import InstanceProfile
from imdsd.ratelimit import RateLimit
from imdsd.scheduler import Rotator
from imdsd.sessions import SessionCache
from tests.backends.rolesanywhere.rig import ROLE_DENIED, rig
from tests.backends.sts.conftest import VM_D as STS_VM_D
from tests.backends.sts.conftest import sts_config
from tests.backends.sts.upstream import FaultySts, Moto, start_moto
from tests.fakes import FakeClock
from tests.helpers import VM_A, VM_D, isolate, make_config

H = timedelta(hours=1)
ASKED = timedelta(hours=2)
DENIED = '[[instance_profiles]]\nname = "profile-denied"\nrole_arn = "{}"\n'
DENY = '[[associations]]\ninstance = "{}"\nprofile = "profile-denied"\n'


@dataclass
class Harness:
    """One backend, opened, and the means to make its upstream misbehave."""

    backend: Backend
    config: Config  # VM_A -> a granted profile; `refused` -> one the upstream refuses
    clock: FakeClock
    refused: str = ""  # an instance whose profile's role the upstream refuses
    refusal_code: str = ""
    fault: Callable[[str], None] | None = None  # pass | throttle | outage | stall | too-long
    calls: Callable[[], int] = lambda: 0  # upstream calls so far
    secrets: list[str] = field(default_factory=list)  # the backend's own (keys, signatures)
    signatures: Callable[[], list[str]] = list


async def local(stack: AsyncExitStack, tmp: Path, request: pytest.FixtureRequest) -> Harness:
    key = "bG9jYWwtaXNzdWVyLWtleS1sb2NhbC1pc3N1ZXIta2U="  # 32 bytes, base64
    config = make_config(f'[backend.local]\nlifetime = "2h"\nkey = "{key}"\n')
    clock = FakeClock()
    backend = await stack.enter_async_context(opener("local")(config.backend, clock))
    return Harness(backend, config, clock, secrets=[key])


async def sts(stack: AsyncExitStack, tmp: Path, request: pytest.FixtureRequest) -> Harness:
    moto: Moto = request.getfixturevalue("moto")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    isolate(monkeypatch)
    for name, value in moto.host_env().items():
        monkeypatch.setenv(name, value)
    proxy = FaultySts(upstream=moto.url, stall_seconds=1.5)  # the proxy's close waits for it
    await proxy.start()
    stack.push_async_callback(proxy.close)
    config = sts_config(proxy.url, DENY.format(STS_VM_D), 'duration = "2h"\n')
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))  # moto stamps real time
    backend = await stack.enter_async_context(opener("sts")(config.backend, clock))

    def fault(mode: str) -> None:
        proxy.mode = "too-long-once" if mode == "too-long" else mode

    return Harness(backend, config, clock, STS_VM_D, "AccessDenied", fault, lambda: len(proxy.seen),
                   [moto.host_key["SecretAccessKey"]])  # fmt: skip


async def rolesanywhere(
    stack: AsyncExitStack, tmp: Path, request: pytest.FixtureRequest
) -> Harness:
    clock = FakeClock()
    r = await stack.enter_async_context(rig(tmp, clock))
    files = r.host("ec")
    config = make_config(
        r.section(files, 'duration = "2h"\n') + DENIED.format(ROLE_DENIED) + DENY.format(VM_D)
    )
    backend = await stack.enter_async_context(opener("rolesanywhere")(config.backend, clock))
    fake = r.fake

    def fault(mode: str) -> None:
        if mode == "too-long":
            fake.roles = dict.fromkeys(fake.roles, 3600)
        else:
            fake.mode = mode

    def signatures() -> list[str]:
        return [str(q["headers"]["Authorization"]).rpartition("=")[2] for q in fake.requests]

    pem = files.private_key_file.read_text()
    return Harness(backend, config, clock, VM_D, "AccessDeniedException", fault, lambda: len(fake.requests),
                   [pem, "".join(pem.splitlines()[1:-1])[:64]], signatures)  # fmt: skip


HARNESSES = [
    pytest.param(local, id="local"),
    pytest.param(sts, id="sts", marks=pytest.mark.slow),  # starts moto's server
    pytest.param(rolesanywhere, id="rolesanywhere"),
]
UPSTREAM = [p for p in HARNESSES if p.id != "local"]  # the embedded issuer has no upstream


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    server = start_moto()
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)


@pytest.fixture
async def h(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    async with AsyncExitStack() as stack:
        yield await request.param(stack, tmp_path, request)


def rotator(h: Harness) -> tuple[Rotator, SessionCache, RateLimit]:
    c = h.config
    inventory = Inventory(c.instances, c.profiles, c.associations, h.clock)
    sessions = SessionCache(render.credentials, render.failure, render.read_credentials)
    rate = RateLimit(8)
    return (Rotator(h.backend, inventory, sessions, c.rotation, h.clock, rng=random.Random(1),
                    rate=rate), sessions, rate)  # fmt: skip


def granted(h: Harness) -> InstanceProfile:
    c = h.config
    association = Inventory(c.instances, c.profiles, c.associations, h.clock).association(VM_A)
    assert association is not None
    return association.profile


def document(sessions: SessionCache, key: str, role: str, now: datetime) -> dict[str, str]:
    fields, closing = sessions.answer(key, role, extended=False, now=now)
    return dict(json.loads(bytes(fields) + bytes(closing)))


@pytest.mark.parametrize("h", HARNESSES, indirect=True)
async def test_a_session_for_a_profile_lasting_the_duration_asked(h: Harness) -> None:
    """Every backend mints an STS-shaped session for a profile's role, issued now (host
    clock) and lasting what was asked."""
    session = await h.backend.issue(granted(h), session_name=VM_A)
    assert session.access_key_id.startswith("ASIA") and session.secret_access_key and session.token
    assert session.issued_at == h.clock.now().replace(microsecond=0)
    assert session.expiration - session.issued_at == ASKED


@pytest.mark.parametrize("h", UPSTREAM, indirect=True)
async def test_a_duration_the_upstream_caps_is_clamped_to_an_hour(h: Harness) -> None:
    """An upstream that refuses the duration (longer than the role allows) gets one hour
    instead, and the operator one warning."""
    assert h.fault is not None
    h.fault("too-long")
    with capture_logs() as logs:
        session = await h.backend.issue(granted(h), session_name=VM_A)
    assert session.expiration - session.issued_at == H
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["session duration clamped"]


@pytest.mark.parametrize("h", UPSTREAM, indirect=True)
async def test_refusals_wait_retryable_failures_retry_and_throttling_halves_the_rate(
    h: Harness,
) -> None:
    """A refusal is not retried before retry_max, and its code is the failure document's; an
    outage is retried sooner; a throttling answer halves the rate of every upstream call."""
    assert h.fault is not None
    rotor, sessions, rate = rotator(h)
    now = h.clock.now()
    denied = next(p for p in h.config.profiles if p.name == "profile-denied")
    await rotor.refresh(h.refused)
    assert document(sessions, h.refused, denied.role.arn, now)["Code"] == h.refusal_code
    assert rotor.due(h.refused) == now + h.config.rotation.retry_max
    h.fault("outage")
    await rotor.refresh(VM_A)
    role = granted(h).role.arn
    assert document(sessions, VM_A, role, now)["Code"] not in ("Success", h.refusal_code)
    due = rotor.due(VM_A)
    assert due is not None and due < now + h.config.rotation.retry_max
    assert rate.rate == 8
    h.fault("throttle")
    await rotor.refresh(VM_A)
    assert rate.rate == 4
    await rotor.aclose()


def _client_tasks() -> set[asyncio.Task[object]]:
    """Tasks of the process but the test servers' request handlers."""
    return {t for t in asyncio.all_tasks() if "RequestHandler" not in t.get_coro().__qualname__}  # type: ignore[union-attr]


@pytest.mark.parametrize("h", HARNESSES, indirect=True)
async def test_cancellation_mid_call_leaves_nothing_behind(h: Harness) -> None:
    """A call cancelled while the upstream holds it ends at once, leaves no task behind, and
    the next call succeeds (no half-open state, no lock held)."""
    if h.fault is not None:
        h.fault("stall")
    before = _client_tasks()
    task = asyncio.create_task(h.backend.issue(granted(h), session_name=VM_A))
    for _ in range(500 if h.fault else 0):  # until the upstream holds the call
        if h.calls():
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    await asyncio.sleep(0)
    assert _client_tasks() - before == set()
    if h.fault is not None:
        h.fault("pass")
    session = await asyncio.wait_for(h.backend.issue(granted(h), session_name=VM_A), 10)
    assert session.expiration > h.clock.now()


@pytest.mark.parametrize("h", HARNESSES, indirect=True)
async def test_secrets_never_in_repr_or_log(h: Harness) -> None:
    """Invariant 4: through a success and (with an upstream) a refusal and an outage, no
    SecretAccessKey, session token, signing key or signature reaches a log line or a repr."""
    with capture_logs() as logs:
        session = await h.backend.issue(granted(h), session_name=VM_A)
        if h.fault is not None:
            h.fault("outage")
            with pytest.raises(BackendError) as caught:
                await h.backend.issue(granted(h), session_name=VM_A)
            logs.append({"error": str(caught.value), "detail": caught.value.detail})
    text = json.dumps(logs, default=str) + repr(h.backend) + repr(session) + str(session)
    secrets = [session.secret_access_key, session.token, *h.secrets, *h.signatures()]
    assert all(secrets)
    for secret in secrets:
        assert secret not in text
