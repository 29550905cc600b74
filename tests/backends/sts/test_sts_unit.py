"""The sts backend's pure parts: error classification and response parsing, and start-up
without host credentials."""

from __future__ import annotations

from pathlib import Path

import pytest

from imdsd.backends.sts import _error, _xml_fields, host_credentials
from imdsd.cli import main
from imdsd.errors import BackendError, DurationTooLong
from imdsd.model import InstanceProfile, Role
from tests.helpers import isolate

PROFILE = InstanceProfile(name="p", path="/", id="AIPAAAAAAAAAAAAAAAAAA",
                          role=Role.from_arn("arn:aws:iam::123456789012:role/app"))  # fmt: skip


def xml(code: str, message: str = "m", request_id: str = "") -> bytes:
    rid = f"<RequestId>{request_id}</RequestId>" if request_id else ""
    return (f'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error>{rid}</ErrorResponse>").encode()  # fmt: skip


@pytest.mark.parametrize(
    ("status", "payload", "code", "retryable"),
    [
        (400, xml("Throttling"), "Throttling", True),
        (400, xml("RequestLimitExceeded"), "RequestLimitExceeded", True),
        (503, xml("ServiceUnavailable"), "ServiceUnavailable", True),
        (500, b"<html>proxy error</html>", "ServiceUnavailable", True),
        (502, b"not xml at all", "ServiceUnavailable", True),
        (429, b"", "HTTP429", True),
        (403, xml("AccessDenied"), "AccessDenied", False),
        (400, xml("MalformedPolicyDocument"), "MalformedPolicyDocument", False),
        (403, xml("InvalidClientTokenId"), "InvalidClientTokenId", False),
        (400, xml("ValidationError", "1 validation error: roleArn"), "ValidationError", False),
    ],
)  # fmt: skip
def test_error_classification(status: int, payload: bytes, code: str, retryable: bool) -> None:
    """Throttling, 5xx and 429 are retried soon; refusals are not. A guest's message names the
    role and the code, never the upstream's own words."""
    error = _error(PROFILE, status, payload, None)
    assert (error.code, error.retryable) == (code, retryable)
    assert PROFILE.role.arn in str(error) and "validation error" not in str(error)


def test_duration_refusal_is_recognised() -> None:
    """STS's DurationSeconds refusal becomes DurationTooLong, carrying the request id."""
    message = "The requested DurationSeconds exceeds the MaxSessionDuration set for this role."
    error = _error(PROFILE, 400, xml("ValidationError", message, "req-1"), "hdr-1")
    assert isinstance(error, DurationTooLong) and error.request_id == "req-1"


def test_signature_echo_never_reaches_the_log() -> None:
    """Invariant 4: SignatureDoesNotMatch repeats the canonical request (which can hold the
    host's x-amz-security-token); the detail kept for the log stops before it."""
    token = "IQoJb3JpZ2luX2VjEXAMPLEHOSTSESSIONTOKEN"
    message = ("The request signature we calculated does not match the signature you provided. "
               "Check your AWS Secret Access Key and signing method.\n\nThe Canonical String for this "
               f"request should have been\n'POST\n/\n\nhost:sts.amazonaws.com\nx-amz-security-token:{token}\n'"
               f"\n\nThe String-to-Sign should have been\n'AWS4-HMAC-SHA256\n{token}'")  # fmt: skip
    error = _error(PROFILE, 403, xml("SignatureDoesNotMatch", message), None)
    assert error.detail is not None and error.detail.startswith(
        "The request signature we calculated"
    )
    assert token not in error.detail and token not in str(error)
    assert len(_error(PROFILE, 403, xml("AccessDenied", "x" * 5000), None).detail or "") == 300


def test_request_id_falls_back_to_the_header() -> None:
    """Some STS-compatible servers put the request id only in x-amzn-RequestId."""
    assert _error(PROFILE, 403, xml("AccessDenied"), "hdr-2").request_id == "hdr-2"


def test_xml_fields_ignores_namespaces_and_garbage() -> None:
    """First text of each named element, any namespace; None for non-XML."""
    fields = _xml_fields(xml("AccessDenied", "no", "r-9"), ("Code", "RequestId", "Absent"))
    assert fields == {"Code": "AccessDenied", "RequestId": "r-9"}
    assert _xml_fields(b"\x00garbage", ("Code",)) is None


async def test_no_host_credentials_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no credentials anywhere in the chain, opening the backend fails with one sentence."""
    isolate(monkeypatch)
    with pytest.raises(BackendError, match="no AWS credentials for the host") as caught:
        await host_credentials(None)
    assert caught.value.code == "NoHostCredentials"


def test_run_without_host_credentials_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """`imdsd run` with the sts backend and no host credentials: one line, exit status 1."""
    isolate(monkeypatch)
    config = tmp_path / "c.toml"
    config.write_text(
        '[imds]\nlisteners = ["127.0.0.1:0"]\n[backend]\nkind = "sts"\n[backend.sts]\nregion = "eu-west-1"\n'
    )
    assert main(["run", "--config", str(config), "--log-format", "json"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("imdsd: cannot start: no AWS credentials for the host")
        and len(err.splitlines()) == 1
    )


def test_named_profile_that_does_not_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend.sts.profile naming a missing profile is reported as such, not as a traceback."""
    import asyncio

    isolate(monkeypatch)
    with pytest.raises(BackendError, match="cannot load the host's AWS credentials"):
        asyncio.run(host_credentials("no-such-profile"))
