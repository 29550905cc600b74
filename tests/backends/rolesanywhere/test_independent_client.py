"""The fake endpoint cross-checked with an independent signer: AWS's iam-rolesanywhere-session
package gets credentials from it over https, and its requests, once tampered with, are
refused. A fake that only mirrored imdsd's signer would pass imdsd's tests whatever both got
wrong; this one must also agree with AWS's own client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from botocore.awsrequest import AWSRequest
from botocore.httpsession import URLLib3Session
from iam_rolesanywhere_session import (
    CredentialsRetrievalError,
    IAMRolesAnywhereSession,
    IAMRolesAnywhereSigner,
)

from imdsd.backends import opener
from imdsd.model import InstanceProfile, Role
from tests.backends.rolesanywhere.fake import PROFILE, REGION, TRUST_ANCHOR
from tests.backends.rolesanywhere.pki import HostFiles
from tests.backends.rolesanywhere.rig import Rig, rig
from tests.fakes import FakeClock
from tests.helpers import ROLE_A


@pytest.fixture
async def https(tmp_path: Path) -> AsyncIterator[Rig]:
    """The fake on TLS, its clock at the real time (the independent client signs with it)."""
    async with rig(tmp_path, FakeClock(datetime.now(UTC)), tls=True) as started:
        yield started


def independent(r: Rig, files: HostFiles) -> IAMRolesAnywhereSession:
    assert r.ca_bundle is not None
    return IAMRolesAnywhereSession(
        profile_arn=PROFILE,
        role_arn=ROLE_A,
        trust_anchor_arn=TRUST_ANCHOR,
        certificate=str(files.certificate_file),
        private_key=str(files.private_key_file),
        certificate_chain=str(files.certificate_chain_file)
        if files.certificate_chain_file
        else None,
        region=REGION,
        endpoint=r.fake.url.removeprefix("https://").rstrip("/"),
        verify=str(r.ca_bundle),
        session_duration=3600,
    )


@pytest.mark.parametrize(("kind", "chain"), [("rsa", True), ("ec", True), ("ec", False)])
async def test_the_independent_client_gets_credentials(https: Rig, kind: str, chain: bool) -> None:
    """AWS's Python signer (RSA or EC P-256, with or without the intermediate) is served: the
    fake verifies what AWS's own client sends, so it checks the protocol, not imdsd's reading."""
    files = https.host(kind, chain=chain)
    session = independent(https, files)
    try:
        frozen = await asyncio.to_thread(
            lambda: session.get_refreshable_credentials().get_frozen_credentials()
        )
    finally:
        session._session.close()  # its urllib3 pool: no socket left to the garbage collector
    assert https.fake.refusals == []
    issued = https.fake.issued[-1]
    assert (frozen.access_key, frozen.secret_key, frozen.token) == (
        issued["accessKeyId"],
        issued["secretAccessKey"],
        issued["sessionToken"],
    )


def _signed(https: Rig, files: HostFiles, body: dict[str, object]) -> AWSRequest:
    signer = IAMRolesAnywhereSigner(
        certificate=str(files.certificate_file),
        private_key=str(files.private_key_file),
        certificate_chain=str(files.certificate_chain_file),
        region=REGION,
    )
    request = AWSRequest(method="POST", url=https.fake.url + "sessions", data=json.dumps(body))
    signer.add_auth(request)
    return request


@pytest.mark.parametrize("tamper", ["body", "date", "certificate", "serial", "chain"])
async def test_a_tampered_request_is_refused(https: Rig, tamper: str) -> None:
    """The independent client's signed request passes untouched and is refused once anything
    signed changes: the body, X-Amz-Date, the leaf certificate, the serial in Credential, or
    the chain (an intermediate from a CA the trust anchor does not know)."""
    files = https.host("ec")
    body = {
        "durationSeconds": 3600,
        "profileArn": PROFILE,
        "roleArn": ROLE_A,
        "trustAnchorArn": TRUST_ANCHOR,
    }
    request = _signed(https, files, body)
    http = URLLib3Session(verify=str(https.ca_bundle))
    try:
        await _tampered_is_refused(https, files, body, request, http, tamper)
    finally:
        http.close()


async def _tampered_is_refused(
    https: Rig,
    files: HostFiles,
    body: dict[str, object],
    request: AWSRequest,
    http: URLLib3Session,
    tamper: str,
) -> None:
    untouched = await asyncio.to_thread(http.send, request.prepare())
    assert untouched.status_code == 201, untouched.text
    headers = request.headers
    if tamper == "body":
        request.data = json.dumps({**body, "durationSeconds": 7200})
    elif tamper == "date":
        headers.replace_header("X-Amz-Date", headers["X-Amz-Date"][:-3] + "00Z")
    elif tamper == "certificate":
        other = _signed(https, https.host("ec", name="other"), body)
        headers.replace_header("X-Amz-X509", other.headers["X-Amz-X509"])
    elif tamper == "serial":
        auth = headers["Authorization"]
        serial = auth.split("Credential=")[1].split("/")[0]
        headers.replace_header("Authorization", auth.replace(serial, str(int(serial) + 1)))
    else:
        stranger = https.host("ec", issuer=None, name="stranger")
        headers.replace_header(
            "X-Amz-X509-Chain", _signed(https, stranger, body).headers["X-Amz-X509"]
        )
    refused = await asyncio.to_thread(http.send, request.prepare())
    assert refused.status_code == 403
    assert refused.headers["x-amzn-ErrorType"] == "AccessDeniedException"
    assert "message" in json.loads(refused.text)


async def test_an_untrusted_certificate_is_refused_to_the_independent_client(https: Rig) -> None:
    """A certificate from a CA the trust anchor does not name fails for AWS's client too."""
    from tests.backends.rolesanywhere.pki import root_ca

    stranger = root_ca("Somebody Else's CA", https.clock.now())
    session = independent(https, https.host("rsa", chain=False, issuer=stranger))
    with pytest.raises(CredentialsRetrievalError) as caught:
        try:
            await asyncio.to_thread(
                lambda: session.get_refreshable_credentials().get_frozen_credentials()
            )
        finally:
            session._session.close()
    assert caught.value.status_code == 403 and "Untrusted" in caught.value.message


async def test_imdsd_over_https_with_a_private_ca_bundle(https: Rig) -> None:
    """imdsd's own client reaches the same https endpoint through backend.rolesanywhere.ca_bundle."""
    config = https.config(https.host("ec"))
    profile = InstanceProfile(
        name="p", path="/", id="AIPAAAAAAAAAAAAAAAAAA", role=Role.from_arn(ROLE_A)
    )
    async with opener("rolesanywhere")(config.backend, https.clock) as backend:
        session = await backend.issue(profile, session_name="i-0aaaaaaaaaaaaaaaa")
    assert session.access_key_id == https.fake.issued[-1]["accessKeyId"]
