"""The rolesanywhere backend against the fake endpoint: keys, chains, a certificate replaced on
disk while running, expired and untrusted certificates, throttling and 5xx, the duration
clamp, the metric, and secrets kept out of logs and reprs."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from imdsd.backends import opener
from imdsd.backends.base import SignsWithCertificate
from imdsd.backends.rolesanywhere import _error
from imdsd.daemon import running
from imdsd.errors import BackendError
from imdsd.model import InstanceProfile, Role, Session
from tests.backends.rolesanywhere.fake import PROFILE, REGION, TRUST_ANCHOR
from tests.backends.rolesanywhere.pki import key_pem, leaf, new_key, replace_file, root_ca
from tests.backends.rolesanywhere.rig import DAY, ROLE_DENIED, ROLE_SHORT, Rig, rig
from tests.fakes import FakeClock
from tests.helpers import ROLE_A, VM_A

H = timedelta(hours=1)


def profile(role: str = ROLE_A) -> InstanceProfile:
    return InstanceProfile(name="p", path="/", id="AIPAAAAAAAAAAAAAAAAAA", role=Role.from_arn(role))


@pytest.fixture
async def ra(tmp_path: Path) -> AsyncIterator[Rig]:
    async with rig(tmp_path, FakeClock()) as started:
        yield started


async def issue(r: Rig, extra: str = "", *, kind: str = "rsa", role: str = ROLE_A,
                chain: bool = True) -> Session | BackendError:  # fmt: skip
    """One call through a freshly opened backend: its session, or its error."""
    config = r.config(r.host(kind, chain=chain), extra)
    async with opener("rolesanywhere")(config.backend, r.clock) as b:
        try:
            return await b.issue(profile(role), session_name=VM_A)
        except BackendError as exc:
            return exc


@pytest.mark.parametrize(("kind", "chain", "algorithm"), [
    ("rsa", True, "AWS4-X509-RSA-SHA256"), ("ec", True, "AWS4-X509-ECDSA-SHA256"),
    ("rsa", False, "AWS4-X509-RSA-SHA256"), ("ec", False, "AWS4-X509-ECDSA-SHA256"),
])  # fmt: skip
async def test_a_session_from_a_verified_request(
    ra: Rig, kind: str, chain: bool, algorithm: str
) -> None:
    """RSA and EC P-256 keys, with an intermediate in X-Amz-X509-Chain or issued by the root:
    the fake verifies the signature and the chain, and its credentials become the session,
    lasting the asked duration from the host's clock."""
    session = await issue(ra, kind=kind, chain=chain)
    assert isinstance(session, Session)
    assert ra.fake.refusals == []
    sent = ra.fake.requests[-1]
    assert str(sent["headers"]["Authorization"]).startswith(algorithm + " Credential=")
    assert ("X-Amz-X509-Chain" in sent["headers"]) == chain
    issued = ra.fake.issued[-1]
    assert session.access_key_id == issued["accessKeyId"]
    assert session.expiration - session.issued_at == 6 * H
    body = json.loads(sent["body"])
    assert body["durationSeconds"] == 21600 and "roleSessionName" not in body


async def test_role_session_name_is_the_instance_id_when_configured(ra: Rig) -> None:
    """role_session_name = "{instance_id}" sends roleSessionName (a profile that accepts it);
    a profile that does not is a refusal, which is why it is off by default."""
    refused = await issue(ra, 'role_session_name = "{instance_id}"\n')
    assert isinstance(refused, BackendError) and refused.code == "AccessDeniedException"
    ra.fake.accept_role_session_name = True
    await issue(ra, 'role_session_name = "{instance_id}"\n')
    assert json.loads(ra.fake.requests[-1]["body"])["roleSessionName"] == VM_A


async def test_an_untrusted_ca_is_a_refusal(ra: Rig) -> None:
    """A certificate from a CA the trust anchor does not name: AccessDeniedException, not
    retried soon, its code and the role in the guest's message and not the service's words."""
    stranger = root_ca("Somebody Else", ra.clock.now())
    config = ra.config(ra.host(issuer=stranger, chain=False))
    async with opener("rolesanywhere")(config.backend, ra.clock) as b:
        with pytest.raises(BackendError) as caught:
            await b.issue(profile(), session_name=VM_A)
    error = caught.value
    assert (error.code, error.retryable, error.status) == ("AccessDeniedException", False, 403)
    assert (
        ROLE_A in str(error)
        and "Untrusted" not in str(error)
        and "Untrusted" in (error.detail or "")
    )


async def test_a_role_the_profile_does_not_list_is_a_refusal(ra: Rig) -> None:
    """The Roles Anywhere profile decides which roles the host may have: others are refused."""
    error = await issue(ra, role=ROLE_DENIED)
    assert isinstance(error, BackendError) and not error.retryable


@pytest.mark.parametrize(("starts", "code"), [
    (-2 * DAY, "HostCertificateExpired"), (H, "HostCertificateNotYetValid"),
])  # fmt: skip
async def test_an_invalid_certificate_signs_nothing(ra: Rig, starts: timedelta, code: str) -> None:
    """An expired or not-yet-valid certificate is never used: no request reaches the endpoint,
    the failure says why (retried: a renewed file fixes it without a restart), and the
    operator is warned once, however many calls fail."""
    config = ra.config(ra.host(starts=starts))
    with capture_logs() as logs:
        async with opener("rolesanywhere")(config.backend, ra.clock) as b:
            errors = []
            for _ in range(3):
                with pytest.raises(BackendError) as caught:
                    await b.issue(profile(), session_name=VM_A)
                errors.append(caught.value)
    assert ra.fake.requests == []
    assert {e.code for e in errors} == {code} and errors[0].retryable
    assert "certificate" in str(errors[0])
    assert len([e for e in logs if e["log_level"] == "warning"]) == 1


async def test_a_certificate_replaced_on_disk_is_used_at_the_next_call(ra: Rig) -> None:
    """Renewal by rename (certificate and key, even a new key type): the next call signs with
    the new pair, without a restart; a half-done renewal (new certificate, old key) keeps
    signing with the old pair and warns once."""
    files = ra.host("rsa")
    config = ra.config(files)
    async with opener("rolesanywhere")(config.backend, ra.clock) as b:
        await b.issue(profile(), session_name=VM_A)
        first = ra.fake.requests[-1]["headers"]["X-Amz-X509"]
        key = new_key("ec")
        renewed = leaf(ra.middle, key, ra.clock.now(), 2 * DAY)
        replace_file(files.certificate_file, renewed.public_bytes(Encoding.PEM))
        with capture_logs() as logs:
            await b.issue(profile(), session_name=VM_A)
            await b.issue(profile(), session_name=VM_A)
        assert ra.fake.requests[-1]["headers"]["X-Amz-X509"] == first  # the old pair still
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "host certificate files unusable; signing with the previous ones"
        ]
        replace_file(files.private_key_file, key_pem(key))
        await b.issue(profile(), session_name=VM_A)
        sent = ra.fake.requests[-1]["headers"]
        assert sent["X-Amz-X509"] == base64.b64encode(renewed.public_bytes(Encoding.DER)).decode()
        assert str(sent["Authorization"]).startswith("AWS4-X509-ECDSA-SHA256")
        assert isinstance(b, SignsWithCertificate)
        assert b.certificate_expiry() == renewed.not_valid_after_utc
    assert ra.fake.refusals == []


async def test_a_third_of_the_lifetime_left_warns_once(ra: Rig) -> None:
    """Less than a third of the certificate's life left: one warning naming its expiry."""
    config = ra.config(ra.host(lifetime=3 * DAY, starts=timedelta(0)))
    async with opener("rolesanywhere")(config.backend, ra.clock) as b:
        with capture_logs() as logs:
            await b.issue(profile(), session_name=VM_A)
            ra.clock.advance(2 * DAY + H)
            await b.issue(profile(), session_name=VM_A)
            await b.issue(profile(), session_name=VM_A)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == [
        "host certificate has less than a third of its lifetime left"
    ]


@pytest.mark.parametrize(("mode", "code", "throttling"), [
    ("throttle", "ThrottlingException", True), ("outage", "InternalServerException", False),
])  # fmt: skip
async def test_throttling_and_5xx_are_retryable(
    ra: Rig, mode: str, code: str, throttling: bool
) -> None:
    """429 ThrottlingException slows every call down (throttling); a 5xx is retried soon."""
    ra.fake.mode = mode
    error = await issue(ra)
    assert isinstance(error, BackendError)
    assert (error.code, error.retryable, error.throttling) == (code, True, throttling)


async def test_a_duration_longer_than_the_role_allows_falls_back_to_an_hour(ra: Rig) -> None:
    """ValidationException on durationSeconds: one hour, at once and from then on for that
    role, with one warning."""
    config = ra.config(ra.host())
    with capture_logs() as logs:
        async with opener("rolesanywhere")(config.backend, ra.clock) as b:
            first = await b.issue(profile(ROLE_SHORT), session_name=VM_A)
            second = await b.issue(profile(ROLE_SHORT), session_name=VM_A)
    assert first.expiration - first.issued_at == second.expiration - second.issued_at == H
    asked = [json.loads(r["body"])["durationSeconds"] for r in ra.fake.requests]
    assert asked == [21600, 3600, 3600]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["session duration clamped"]


@pytest.mark.parametrize(("status", "kind", "body", "code", "retryable"), [
    (403, "AccessDeniedException:http://internal.amazon.com/coral/", b'{"message": "no"}', "AccessDeniedException", False),
    (400, "ValidationException", b'{"message": "roleArn is bad"}', "ValidationException", False),
    (429, None, b"", "HTTP429", True),
    (502, None, b"<html>bad gateway</html>", "ServiceUnavailable", True),
    (400, None, b'{"__type": "com.amazon#ThrottlingException", "message": "slow"}', "ThrottlingException", True),
])  # fmt: skip
def test_error_classification(
    status: int, kind: str | None, body: bytes, code: str, retryable: bool
) -> None:
    """The code from x-amzn-ErrorType (or the body's __type), else from the status; the
    service's words kept for the log only."""
    error = _error(ROLE_A, status, kind, body, "req-1")
    assert (error.code, error.retryable, error.request_id) == (code, retryable, "req-1")
    assert ROLE_A in str(error)


async def test_the_metric_and_no_secret_in_logs_or_reprs(ra: Rig) -> None:
    """Invariant 4: a daemon on this backend exports the certificate's expiry in seconds, and
    neither its logs, its metrics nor the backend's repr carry the private key, a signature,
    a SecretAccessKey or a session token."""
    files = ra.host("ec")
    config = ra.config(files)
    with capture_logs() as logs:
        async with running(config, ra.clock) as daemon:
            scrape = generate_latest(daemon.api.metrics.registry).decode()
            served = daemon.sessions.get(VM_A)
            ra.fake.mode = "throttle"
            await daemon.rotator.refresh(VM_A)
    assert served is not None
    assert "imdsd_host_certificate_expiry_seconds 82800.0" in scrape  # 23 h left of 24
    text = json.dumps(logs, default=str) + scrape + repr(served.session)
    pem = files.private_key_file.read_bytes()
    secrets = [pem.decode(), "".join(pem.decode().splitlines()[1:-1])[:64]]
    secrets += [
        str(r["headers"]["Authorization"]).rpartition("Signature=")[2] for r in ra.fake.requests
    ]
    for issued in ra.fake.issued:
        secrets += [issued["secretAccessKey"], issued["sessionToken"]]
    assert len(secrets) >= 6
    for secret in secrets:
        assert secret not in text


def test_unsupported_key_and_mismatched_key_in_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config refuses an unsupported key type, a key that is not the certificate's and
    an unreadable file: one line each, naming the key path, exit 3."""
    from imdsd.cli import main
    from tests.backends.rolesanywhere.pki import write_host
    from tests.helpers import config_text

    clock = FakeClock()
    ca = root_ca("CA", clock.now())
    good = new_key("ec")
    files = write_host(tmp_path / "h", leaf(ca, good, clock.now(), DAY), good)
    section = (
        f'[backend]\nkind = "rolesanywhere"\n[backend.rolesanywhere]\nregion = "{REGION}"\n'
        f'trust_anchor_arn = "{TRUST_ANCHOR}"\nprofile_arn = "{PROFILE}"\n{files.toml()}'
    )
    cases = {
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "another": new_key("ec"),
    }
    path = tmp_path / "c.toml"
    path.write_text(config_text(section))
    assert main(["check-config", "--config", str(path)]) == 0
    for name, key in cases.items():
        replace_file(files.private_key_file, key_pem(key))
        assert main(["check-config", "--config", str(path)]) == 3
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "imdsd: backend.rolesanywhere.private_key_file: got "
        )
        assert name == "another" or "Ed25519" in lines[0]
    files.certificate_file.unlink()
    assert main(["check-config", "--config", str(path)]) == 3
    err = capsys.readouterr().err
    assert (
        err.startswith("imdsd: backend.rolesanywhere.certificate_file: got ")
        and "No such file" in err
    )


async def test_the_watcher_sees_a_renewal_while_nothing_signs(
    ra: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A certificate renewed on disk shows in the expiry (the metric) within the watch
    interval, even when no session is due: an alert on the metric never waits for a rotation."""
    from imdsd.backends import rolesanywhere

    monkeypatch.setattr(rolesanywhere, "WATCH_SECONDS", 0.01)
    files = ra.host("ec")
    config = ra.config(files)
    async with opener("rolesanywhere")(config.backend, ra.clock) as b:
        assert isinstance(b, SignsWithCertificate)
        key = new_key("ec")
        renewed = leaf(ra.middle, key, ra.clock.now(), 5 * DAY)
        replace_file(files.private_key_file, key_pem(key))
        replace_file(files.certificate_file, renewed.public_bytes(Encoding.PEM))
        for _ in range(200):
            if b.certificate_expiry() == renewed.not_valid_after_utc:
                break
            await asyncio.sleep(0.01)
        assert b.certificate_expiry() == renewed.not_valid_after_utc
    assert ra.fake.requests == []


@pytest.mark.parametrize(
    ("mode", "answered"), [("garbage", "without credentials"), ("huge", "too much")]
)
async def test_an_unreadable_answer_is_retried(ra: Rig, mode: str, answered: str) -> None:
    """A 201 that is not CreateSession's JSON, or one over 1 MiB: InvalidResponse, retried."""
    ra.fake.mode = mode
    error = await issue(ra)
    assert isinstance(error, BackendError) and error.code == "InvalidResponse" and error.retryable
    assert answered in str(error)


async def test_an_unreachable_endpoint_is_retried(ra: Rig) -> None:
    """Nothing listening at the endpoint: ServiceUnavailable, retried with backoff."""
    await ra.fake.close()
    error = await issue(ra)
    assert isinstance(error, BackendError)
    assert (error.code, error.retryable, error.detail) == (
        "ServiceUnavailable",
        True,
        "ClientConnectorError",
    )


async def test_a_role_that_refuses_even_an_hour_is_a_refusal(ra: Rig) -> None:
    """After the one-hour fallback is refused too, the duration error stands (not retried soon)."""
    ra.fake.roles[ROLE_A] = 900
    error = await issue(ra)
    assert isinstance(error, BackendError) and error.code == "ValidationException"
    assert not error.retryable
    assert [json.loads(r["body"])["durationSeconds"] for r in ra.fake.requests] == [21600, 3600]


@pytest.mark.parametrize(("key", "content", "said"), [
    ("ca_bundle", None, "No such file or directory"),
    ("ca_bundle", b"not a certificate", "no PEM certificate in it"),
    ("certificate_chain_file", b"-----BEGIN NOTHING-----", "not usable"),
])  # fmt: skip
def test_check_config_names_an_unusable_bundle_or_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        key: str, content: bytes | None, said: str) -> None:  # fmt: skip
    """An unreadable CA bundle or a chain file that is not PEM: one line naming the key, exit 3."""
    from imdsd.cli import main
    from tests.backends.rolesanywhere.pki import write_host
    from tests.helpers import config_text

    clock = FakeClock()
    ca = root_ca("CA", clock.now())
    k = new_key("rsa")
    files = write_host(tmp_path / "h", leaf(ca, k, clock.now(), DAY), k)
    target = tmp_path / f"{key}.pem"
    if content is not None:
        target.write_bytes(content)
    path = tmp_path / "c.toml"
    path.write_text(config_text(
        f'[backend]\nkind = "rolesanywhere"\n[backend.rolesanywhere]\nregion = "{REGION}"\n'
        f'trust_anchor_arn = "{TRUST_ANCHOR}"\nprofile_arn = "{PROFILE}"\n{files.toml()}{key} = "{target}"\n'))  # fmt: skip
    assert main(["check-config", "--config", str(path)]) == 3
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"imdsd: backend.rolesanywhere.{key}: got ")
    assert said in lines[0]
