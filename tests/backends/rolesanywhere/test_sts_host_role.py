"""The sts backend with its host credentials from Roles Anywhere (`host_credentials =
"rolesanywhere"`), against moto's STS with IAM authorization on: the fake endpoint hands out
real moto credentials of the host's role (moto has no Roles Anywhere: the fake assumes that
role with the setup user's key, standing in for the service), and imdsd signs AssumeRole with
them, as role chaining."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from structlog.testing import capture_logs

from imdsd.backends import opener
from imdsd.model import InstanceProfile, Role
from tests.backends.rolesanywhere.rig import rig
from tests.backends.sts.conftest import VM_A, sts_config
from tests.backends.sts.upstream import HOST_ROLE, HOST_ROLE_SESSION_NAME, ROLE_A, Moto, start_moto
from tests.fakes import FakeClock

pytestmark = pytest.mark.slow  # starts moto's server (a few seconds)
H = timedelta(hours=1)


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    server = start_moto()
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)


def minting(moto: Moto) -> object:
    """The fake's credentials: a real session of the host role from moto."""
    sts = boto3.client("sts", endpoint_url=moto.url, region_name="us-east-1",
                       aws_access_key_id=moto.host_key["AccessKeyId"],
                       aws_secret_access_key=moto.host_key["SecretAccessKey"])  # fmt: skip

    async def mint(role: str, name: str | None, seconds: int) -> dict[str, str]:
        found = await asyncio.to_thread(sts.assume_role, RoleArn=role,
                                        RoleSessionName=HOST_ROLE_SESSION_NAME, DurationSeconds=seconds)  # fmt: skip
        c = found["Credentials"]
        return {"accessKeyId": c["AccessKeyId"], "secretAccessKey": c["SecretAccessKey"],
                "sessionToken": c["SessionToken"]}  # fmt: skip

    return mint


async def test_assume_role_signed_with_roles_anywhere_host_credentials(
    moto: Moto, tmp_path: Path
) -> None:
    """No key on the host: the host role's session comes from Roles Anywhere and signs
    AssumeRole for a profile's role (moto authorises it by the host role's policy); the
    session is clamped to role chaining's one hour, said once; the host credentials are
    reused while young and renewed at half their life; the certificate's expiry is exposed."""
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))  # moto stamps real time
    async with rig(tmp_path, clock) as r:
        r.fake.roles[HOST_ROLE] = 43200
        r.fake.mint = minting(moto)  # type: ignore[assignment]
        files = r.host("ec")
        extra = 'host_credentials = "rolesanywhere"\n'  # then its own table, after [backend.sts]
        section = r.section(files, f'role_arn = "{HOST_ROLE}"\nduration = "2h"\n').split("\n", 2)[2]
        config = sts_config(moto.url, backend=extra + section)
        profile = InstanceProfile(
            name="a", path="/", id="AIPAAAAAAAAAAAAAAAAAA", role=Role.from_arn(ROLE_A)
        )
        with capture_logs() as logs:
            async with opener("sts")(config.backend, clock) as backend:
                first = await backend.issue(profile, session_name=VM_A)
                await backend.issue(profile, session_name=VM_A)
                assert len(r.fake.issued) == 1  # the host credentials reused
                clock.advance(H + timedelta(minutes=1))  # past half of the host session's 2 h
                await backend.issue(profile, session_name=VM_A)
                assert len(r.fake.issued) == 2
                assert backend.certificate_expiry() is not None  # type: ignore[attr-defined]
    assert r.fake.refusals == []
    assert first.expiration - first.issued_at == H
    guest = boto3.client("sts", endpoint_url=moto.url, region_name="us-east-1",
                         aws_access_key_id=first.access_key_id,
                         aws_secret_access_key=first.secret_access_key,
                         aws_session_token=first.token)  # fmt: skip
    arn = (await asyncio.to_thread(guest.get_caller_identity))["Arn"]
    assert arn.endswith(f":assumed-role/role-a/{VM_A}")
    clamps = [e for e in logs if e["event"].startswith("session duration clamped: role chaining")]
    assert len(clamps) == 1
