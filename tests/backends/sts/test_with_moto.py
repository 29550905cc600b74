"""The sts backend against a real STS (moto's server), with real guests (boto3 processes)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from datetime import datetime, timedelta
from urllib.parse import unquote

import pytest
import structlog
from structlog.testing import capture_logs

from imdsd.daemon import Daemon, running
from imdsd.model import Role
from tests.backends.sts.conftest import VM_A, VM_B, VM_D, A, B, D, run_guest, sts_config
from tests.backends.sts.upstream import (
    PARTNER,
    PARTNER_ROLE,
    ROLE_A,
    ROLE_B,
    ROLE_DENIED,
    FaultySts,
    Moto,
)
from tests.fakes import FakeClock
from tests.helpers import http

pytestmark = pytest.mark.slow  # moto's server and boto3 guest processes

StartDaemon = Callable[..., AbstractAsyncContextManager[Daemon]]
CREDS = "/latest/meta-data/iam/security-credentials/"


async def test_guest_is_the_assumed_role_named_after_its_instance(
    sts_daemon: StartDaemon, moto: Moto
) -> None:
    """1. A guest that knows only the metadata endpoint is assumed-role/<role>/<instance-id>."""
    async with sts_daemon() as daemon:
        guest = await run_guest(daemon.urls[0], moto, A)
    assert guest["method"] == "iam-role"
    assert guest["arn"] == f"arn:aws:sts::123456789012:assumed-role/role-a/{VM_A}"


async def test_role_policies_decide_what_each_guest_can_read(
    sts_daemon: StartDaemon, moto: Moto
) -> None:
    """2. With moto's IAM authorization on, A reads bucket-a and is denied bucket-b; B the reverse."""
    async with sts_daemon() as daemon:
        a = await run_guest(daemon.urls[0], moto, A)
        b = await run_guest(daemon.urls[0], moto, B)
    assert (a["bucket-a"], a["bucket-b"]) == ("from a", "AccessDenied")
    assert (b["bucket-a"], b["bucket-b"]) == ("AccessDenied", "from b")
    assert b["arn"] == f"arn:aws:sts::123456789012:assumed-role/role-b/{VM_B}"


async def test_cross_account_chaining(sts_daemon: StartDaemon, moto: Moto) -> None:
    """3. The guest's role credentials AssumeRole into a role of a second account."""
    async with sts_daemon() as daemon:
        guest = await run_guest(daemon.urls[0], moto, A, partner=PARTNER_ROLE)
    assert guest["partner_arn"] == f"arn:aws:sts::{PARTNER}:assumed-role/partner-reader/chained"


async def test_replaced_profile_serves_the_new_role(sts_daemon: StartDaemon, moto: Moto) -> None:
    """4. Replacing A's profile makes the guest's next fetch return the new role's credentials."""
    async with sts_daemon() as daemon:
        assert (await run_guest(daemon.urls[0], moto, A))["arn"].endswith(f"role-a/{VM_A}")
        inventory = daemon.inventory
        changed = await inventory.commit(lambda: inventory.replace_association(VM_A, "profile-b"))
        daemon.apply(changed)
        await daemon.settled(changed)
        guest = await run_guest(daemon.urls[0], moto, A)
    assert guest["arn"] == f"arn:aws:sts::123456789012:assumed-role/role-b/{VM_A}"
    assert (guest["bucket-a"], guest["bucket-b"]) == ("AccessDenied", "from b")


async def test_what_is_sent_upstream(sts_daemon: StartDaemon, proxy: FaultySts) -> None:
    """RoleSessionName is the instance id; the profile's external id, session tags and source
    identity are sent when configured; the requested duration is EC2's 6 hours by default."""
    backend = 'session_tags = ["instance_id", "host"]\nsource_identity = "imdsd-{host}"'
    async with sts_daemon(backend=backend):
        pass
    sent = {unquote(f["RoleSessionName"]): f for f in proxy.seen}
    b = sent[VM_B]
    assert (b["Action"], b["DurationSeconds"], b["ExternalId"]) == (
        "AssumeRole",
        "21600",
        "imdsd-test-external-id",
    )
    assert (b["Tags.member.1.Key"], b["Tags.member.1.Value"]) == ("InstanceId", VM_B)
    assert b["Tags.member.2.Key"] == "HostName" and unquote(b["SourceIdentity"]).startswith(
        "imdsd-"
    )
    assert "ExternalId" not in sent[VM_A]


async def test_refusal_shows_failure_document_and_spares_others(sts_daemon: StartDaemon) -> None:
    """AccessDenied from the upstream: D's role document is EC2's failure shape (Code, Message,
    LastUpdated), a warning names the role ARN, and A is served normally."""
    extra = f'[[associations]]\ninstance = "{VM_D}"\nprofile = "profile-denied"\n'
    with capture_logs() as logs:
        async with sts_daemon(extra) as daemon:
            denied = await http(daemon.urls[0], CREDS + "role-denied", source=D)
            fine = await http(daemon.urls[0], CREDS + "role-a", source=A)
    doc = json.loads(denied.body)
    assert denied.status == 200 and list(doc) == ["Code", "Message", "LastUpdated"]
    assert doc["Code"] == "AccessDenied" and ROLE_DENIED in doc["Message"]
    assert "not authorized" not in doc["Message"]  # the upstream's words stay in the log
    warning = next(e for e in logs if e["event"] == "session refresh failed")
    assert (warning["role"], warning["code"], warning["retryable"]) == (
        ROLE_DENIED,
        "AccessDenied",
        False,
    )
    assert "not authorized" in warning["detail"] and len(warning["request_id"]) >= 16
    assert json.loads(fine.body)["Code"] == "Success"


async def test_thirty_percent_failures_still_rotate_in_time(sts_daemon: StartDaemon, proxy: FaultySts,
                                                            clock: FakeClock) -> None:  # fmt: skip
    """5a. With 30% of upstream calls failing, over 24 hours every served session keeps at least
    min_remaining (30 min): the retries land long before each deadline."""
    async with sts_daemon() as daemon:
        proxy.fail_rate = 0.3
        keys = set()
        for _ in range(24 * 60):
            clock.advance(timedelta(minutes=1))
            await asyncio.gather(*await daemon.rotator.wake())
            for vm in (VM_A, VM_B):
                entry = daemon.sessions.get(vm)
                assert entry is not None and entry.session.expiration - clock.now() >= timedelta(
                    minutes=30
                )
                keys.add(entry.session.access_key_id)
    failures = sum(1 for f in proxy.seen if f.get("Action") == "AssumeRole") - len(keys)
    assert len(keys) >= 2 * 7 and failures >= 3  # ~3-hourly rotations for two VMs, some failed


async def test_outage_serves_until_expiry_then_recovers(sts_daemon: StartDaemon, proxy: FaultySts,
                                                        clock: FakeClock) -> None:  # fmt: skip
    """5b. A full outage: the current keys are served until they expire and never after; when
    the upstream returns, rotation resumes and the guest gets fresh keys."""
    async with sts_daemon() as daemon:
        url = daemon.urls[0]
        first = json.loads((await http(url, CREDS + "role-a", source=A)).body)
        proxy.mode = "outage"
        for _ in range(6 * 60 - 1):
            clock.advance(timedelta(minutes=1))
            await asyncio.gather(*await daemon.rotator.wake())
        assert json.loads((await http(url, CREDS + "role-a", source=A)).body) == first
        clock.advance(timedelta(minutes=1))
        down = json.loads((await http(url, CREDS + "role-a", source=A)).body)
        assert down["Code"] == "InternalFailure" and "AccessKeyId" not in down
        proxy.mode = "pass"
        for _ in range(6):
            clock.advance(timedelta(minutes=1))
            await asyncio.gather(*await daemon.rotator.wake())
        back = json.loads((await http(url, CREDS + "role-a", source=A)).body)
    assert back["Code"] == "Success" and back["AccessKeyId"] != first["AccessKeyId"]


async def test_throttling_and_stalls_are_retried(
    sts_daemon: StartDaemon, proxy: FaultySts, clock: FakeClock
) -> None:
    """Throttling answers and a stalled upstream (past the 2 s timeout) are retryable: the
    session stays served and the next attempt comes after a short backoff."""
    async with sts_daemon() as daemon:
        served = daemon.sessions.get(VM_A)
        for mode, code in (("throttle", "Throttling"), ("stall", "RequestTimeout")):
            proxy.mode = mode
            clock.advance(timedelta(hours=3, minutes=5))
            with capture_logs() as logs:
                await daemon.rotator.refresh(VM_A)
            failure = daemon.sessions.failure(VM_A)
            assert failure is not None and failure.code == code
            assert (
                next(e for e in logs if e["event"] == "session refresh failed")["retryable"] is True
            )
            due = daemon.rotator.due(VM_A)
            assert due is not None and due - clock.now() <= timedelta(seconds=2)
        assert daemon.sessions.get(VM_A) is served
        proxy.mode = "pass"
        await daemon.rotator.refresh(VM_A)
        assert daemon.sessions.get(VM_A) is not served


async def test_duration_clamped_when_the_role_allows_less(
    sts_daemon: StartDaemon, proxy: FaultySts
) -> None:
    """STS says the duration exceeds the role's maximum: one warning, then 1-hour sessions."""
    proxy.mode = "too-long-once"
    with capture_logs() as logs:
        async with sts_daemon(backend="") as daemon:
            sessions = [daemon.sessions.get(vm) for vm in (VM_A, VM_B)]
    lifetimes = sorted(s.session.lifetime for s in sessions if s is not None)
    assert lifetimes[0] == 3600 and lifetimes[1] in (3600, 21600)
    clamp = next(e for e in logs if e["event"] == "session duration clamped")
    assert (clamp["asked_seconds"], clamp["using_seconds"]) == (21600, 3600)
    assert clamp["request_id"] == "req-fault-0001"


async def test_profile_scope_shares_one_session(sts_daemon: StartDaemon, proxy: FaultySts) -> None:
    """session_scope = "profile": two instances of one profile, one upstream call, one session
    named after the profile (the audit trail names the profile, not the VM)."""
    extra = f'[[associations]]\ninstance = "{VM_D}"\nprofile = "profile-a"\n'
    async with sts_daemon(extra, backend='session_scope = "profile"') as daemon:
        a, d = daemon.sessions.get(VM_A), daemon.sessions.get(VM_D)
    assert a is not None and d is not None and a.session.access_key_id == d.session.access_key_id
    names = sorted(unquote(f["RoleSessionName"]) for f in proxy.seen)
    assert names == ["imdsd-profile-a", "imdsd-profile-b"]


async def test_many_associations_do_not_stampede(
    host_env: dict[str, str], proxy: FaultySts, clock: FakeClock
) -> None:
    """200 associations at start: never more than rotation.concurrency upstream calls at once,
    all primed, and their next refreshes spread over their refresh window."""
    from imdsd.daemon import running
    from tests.backends.sts.conftest import sts_config

    many = "".join(
        f'[[instances]]\nid = "i-{n:08x}"\naddresses = ["127.0.1.{n % 250}", "127.0.{2 + n // 250}.{n % 250}"]\n'
        f'[[associations]]\ninstance = "i-{n:08x}"\nprofile = "profile-a"\n'
        for n in range(1, 201)
    )
    config = sts_config(proxy.url, many)
    config = replace(config, rotation=replace(config.rotation, concurrency=4))
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(30)
    )  # quiet: 200 rotations
    async with running(config, clock) as daemon:
        dues = [daemon.rotator.due(f"i-{n:08x}") for n in range(1, 201)]
    assert proxy.max_in_flight <= 4
    assert all(d is not None for d in dues)
    spread = max(dues) - min(dues)  # type: ignore[type-var,operator]
    assert spread >= timedelta(hours=2)  # stratified over the window, not bunched in the jitter


async def test_no_upstream_or_session_secret_in_logs(
    sts_daemon: StartDaemon, moto: Moto, clock: FakeClock
) -> None:
    """Invariant 4 with a real upstream: through start, guest fetches, a rotation and a refusal,
    the production log output holds neither the host's secret key nor any session's secret or
    token; access key ids appear only by their last four characters."""
    import io

    from imdsd import log
    from tests.test_no_secrets import forms

    buffer = io.StringIO()
    log.configure("debug", "json", stream=buffer)
    extra = f'[[associations]]\ninstance = "{VM_D}"\nprofile = "profile-denied"\n'
    sessions = []
    async with sts_daemon(extra) as daemon:
        guest = await run_guest(daemon.urls[0], moto, A)
        sessions.append(daemon.sessions.get(VM_A))
        clock.advance(timedelta(hours=3, minutes=5))
        await asyncio.gather(*await daemon.rotator.wake())
        sessions += [daemon.sessions.get(VM_A), daemon.sessions.get(VM_B)]
        await http(daemon.urls[0], CREDS + "role-denied", source=D)
    text = buffer.getvalue()
    events = {json.loads(line)["event"] for line in text.splitlines()}
    assert {"session rotated", "session refresh failed", "request"} <= events
    secrets = [moto.host_key["SecretAccessKey"]]
    for served in sessions:
        assert served is not None
        secrets += [served.session.secret_access_key, served.session.token]
        assert served.session.access_key_id not in text
    assert guest["access_key"] not in text
    for secret in secrets:
        for form in forms(secret):
            assert form not in text


async def test_answer_read_whole_when_it_arrives_in_pieces(
    sts_daemon: StartDaemon, proxy: FaultySts, clock: FakeClock
) -> None:
    """An AssumeRole answer that arrives in 100-byte pieces is read whole (not just what is
    buffered), so the session is issued."""
    async with sts_daemon() as daemon:
        served = daemon.sessions.get(VM_A)
        proxy.mode = "trickle"
        await daemon.rotator.refresh(VM_A)
        assert daemon.sessions.failure(VM_A) is None
        assert daemon.sessions.get(VM_A) is not served


async def test_upstream_status_is_logged(sts_daemon: StartDaemon, proxy: FaultySts) -> None:
    """An upstream 500 is logged with its HTTP status beside the code and request id."""
    async with sts_daemon() as daemon:
        proxy.mode = "outage"
        with capture_logs() as logs:
            await daemon.rotator.refresh(VM_A)
    warning = next(e for e in logs if e["event"] == "session refresh failed")
    assert (warning["status"], warning["code"], warning["request_id"]) == (
        500,
        "InternalFailure",
        "req-fault-0001",
    )


async def test_unreachable_upstream_message_reads_well(
    host_env: dict[str, str], clock: FakeClock
) -> None:
    """Nothing listens at the endpoint: the guest's failure Message is a sentence."""
    async with running(sts_config("http://127.0.0.1:9/"), clock) as daemon:
        doc = json.loads((await http(daemon.urls[0], CREDS + "role-a", source=A)).body)
    assert doc["Code"] == "ServiceUnavailable"
    assert (
        doc["Message"]
        == f"The upstream STS could not be reached while assuming {ROLE_A}; retrying."
    )


async def test_profile_scope_follows_a_changed_role(
    sts_daemon: StartDaemon, proxy: FaultySts
) -> None:
    """session_scope = "profile": when a reload points the profile at another role, its
    instances get a session of the new role at once, never the old role's keys under the new
    role's name."""
    async with sts_daemon(backend='session_scope = "profile"') as daemon:
        old = daemon.sessions.get(VM_A)
        profiles = [
            replace(p, role=Role.from_arn(ROLE_B)) if p.name == "profile-a" else p
            for p in daemon.inventory.profiles()
        ]
        config = sts_config(proxy.url)
        changed = daemon.inventory.reload(config.instances, profiles, config.associations)
        daemon.apply(changed)
        await daemon.settled(changed)
        new = daemon.sessions.get(VM_A)
        reply = await http(daemon.urls[0], CREDS + "role-b", source=A)
    assert old is not None and new is not None
    assert new.session.access_key_id != old.session.access_key_id and new.role_arn == ROLE_B
    assert json.loads(reply.body)["AccessKeyId"] == new.session.access_key_id
    assert unquote(proxy.seen[-1]["RoleArn"]) == ROLE_B


@pytest.mark.parametrize(
    ("mode", "what"), [("huge", "answered too much"), ("bad-date", "sent an unreadable time")]
)
async def test_an_answer_too_large_or_with_an_unreadable_date_is_refused(
    sts_daemon: StartDaemon, proxy: FaultySts, mode: str, what: str
) -> None:
    """A 200 over the 1 MiB answer limit, or whose Date cannot be read, issues nothing: the
    failure is InvalidResponse in a sentence naming the role, and the session being served
    stays served."""
    async with sts_daemon() as daemon:
        served = daemon.sessions.get(VM_A)
        proxy.mode = mode
        await daemon.rotator.refresh(VM_A)
        failure = daemon.sessions.failure(VM_A)
        assert failure is not None and failure.code == "InvalidResponse"
        assert failure.message == f"The upstream STS {what} while assuming {ROLE_A}; retrying."
        assert daemon.sessions.get(VM_A) is served


async def test_an_answer_without_a_date_lasts_from_the_host_clock(
    sts_daemon: StartDaemon, proxy: FaultySts, clock: FakeClock
) -> None:
    """With no Date to re-base on, a session is issued now on the host clock (whole seconds)
    and expires at the upstream's Expiration."""
    async with sts_daemon() as daemon:
        proxy.mode = "no-date"
        clock.advance(timedelta(minutes=1, microseconds=250))
        await daemon.rotator.refresh(VM_A)
        served = daemon.sessions.get(VM_A)
        assert served is not None and daemon.sessions.failure(VM_A) is None
        assert served.session.issued_at == clock.now().replace(microsecond=0)
        found = re.search(rb"<Expiration>([^<]+)</Expiration>", proxy.answered)
        assert found is not None
        expiration = datetime.fromisoformat(found.group(1).decode())
        assert served.session.expiration == expiration.replace(microsecond=0)
