"""Invariant 4: no secret reaches a log line, through a full start -> fetch -> rotate -> fail cycle."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from datetime import timedelta

import pytest
import structlog
from prometheus_client import generate_latest

from imdsd import log
from imdsd.daemon import running
from imdsd.errors import BackendError
from imdsd.model import Session
from tests.fakes import FakeClock, FlakyBackend, wrapping
from tests.helpers import VM_A, VM_B, http, make_config, token_for

ISSUER_KEY = base64.b64encode(b"issuer-key-issuer-key-issuer-key").decode()


@pytest.fixture
def captured() -> io.StringIO:
    """structlog configured exactly as in production (JSON, debug), writing to a buffer."""
    buffer = io.StringIO()
    log.configure("debug", "json", stream=buffer)
    return buffer


def forms(secret: str | bytes) -> list[str]:
    raw = secret.encode() if isinstance(secret, str) else secret
    return [raw.decode(errors="replace"), raw.hex(), base64.b64encode(raw).decode()]


async def test_full_cycle_logs_no_secret(captured: io.StringIO) -> None:
    """Secret keys, session tokens, IMDSv2 tokens (also inside refused requests) and their MAC
    key, and the issuer key never appear in the logs or the metrics; access key ids appear
    only by their last four characters."""
    clock = FakeClock()
    flaky: list[FlakyBackend] = []
    config = make_config(f'\n[log]\nlevel = "debug"\n[backend.local]\nkey = "{ISSUER_KEY}"\n')

    def wrap(backend):  # type: ignore[no-untyped-def]
        flaky.append(FlakyBackend(backend))
        return flaky[0]

    sessions: list[Session] = []
    imds_tokens: list[str] = []
    async with running(config, clock, open_backend=wrapping(wrap)) as daemon:
        url = daemon.urls[0]
        for key in (VM_A, VM_B):
            entry = daemon.sessions.get(key)
            assert entry is not None
            sessions.append(entry.session)
        imds_tokens.append(await token_for(url, "127.0.0.3"))
        for source, role in (("127.0.0.2", "role-a"), ("127.0.0.3", "role-b")):
            await http(url, f"/latest/meta-data/iam/security-credentials/{role}", source=source,
                       headers={"X-aws-ec2-metadata-token": imds_tokens[0]})  # fmt: skip
        clock.advance(timedelta(hours=3, minutes=1))
        await asyncio.gather(*await daemon.rotator.wake())  # rotate
        entry = daemon.sessions.get(VM_A)
        assert entry is not None and entry.session not in sessions
        sessions.append(entry.session)
        flaky[0].failing = BackendError(
            "AccessDenied", "The issuer refused the role.", retryable=False
        )
        clock.advance(timedelta(hours=3, minutes=1))
        await asyncio.gather(*await daemon.rotator.wake())  # fail
        clock.advance(timedelta(hours=6))
        await http(url, "/latest/meta-data/iam/security-credentials/role-a", source="127.0.0.2")
        # A token in a request the parser refuses, and in one from a stranger, stays out too.
        imds_tokens.append(await token_for(url, "127.0.0.2"))
        await http(url, "/latest/meta-data/\x01", source="127.0.0.2",
                   headers={"X-aws-ec2-metadata-token": imds_tokens[1]})  # fmt: skip
        await http(url, "/latest/meta-data/", source="127.0.0.9",
                   headers={"X-aws-ec2-metadata-token": imds_tokens[1]})  # fmt: skip
        mac_key = daemon.api.tokens._key
        scrape = generate_latest(daemon.api.metrics.registry).decode()
    events = [json.loads(line) for line in captured.getvalue().splitlines()]  # all JSON
    text = captured.getvalue() + scrape
    names = {e["event"] for e in events}
    assert {"session rotated", "session refresh failed", "request"} <= names
    secrets: list[str | bytes] = [base64.b64decode(ISSUER_KEY), mac_key, *imds_tokens]
    for s in sessions:
        secrets += [s.secret_access_key, s.token]
        assert s.access_key_id not in text and s.access_key_id[-4:] in text
    for secret in secrets:
        for form in forms(secret):
            assert form not in text


def test_secret_keys_are_hidden_by_the_processor(captured: io.StringIO) -> None:
    """A log call that passes a secret under a secret-sounding key shows <hidden> instead."""
    structlog.get_logger("t").info(
        "oops", secret_access_key="AAA", Token="BBB", key="CCC", role="r"
    )
    line = json.loads(captured.getvalue())
    assert line["secret_access_key"] == line["Token"] == line["key"] == "<hidden>"
    assert line["role"] == "r"


async def test_info_level_logs_no_request_lines() -> None:
    """At info (production), serving a request writes nothing: the per-request line exists
    only at debug, so a busy host's journal holds rotations and failures, not traffic."""
    buffer = io.StringIO()
    log.configure("info", "json", stream=buffer)
    async with running(make_config(), FakeClock()) as daemon:
        before = buffer.getvalue()
        reply = await http(daemon.urls[0], "/latest/meta-data/instance-id", source="127.0.0.2")
        assert reply.status == 200
        assert buffer.getvalue() == before
