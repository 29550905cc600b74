"""Value types: ARNs parse like IAM's, and no repr ever shows a secret (invariant 4)."""

from __future__ import annotations

import pytest

from imdsd.model import InstanceProfile, Role, Session, key_display
from imdsd.tokens import TokenIssuer
from tests.fakes import START, FakeClock


def test_session_repr_hides_secrets() -> None:
    """Invariant 4: repr/str of a session show the key id, never the secret or the token."""
    session = Session(access_key_id="ASIAEXAMPLEEXAMPLE00", secret_access_key="s3cr3t-value",
                      token="t0ken-value", expiration=START, issued_at=START)  # fmt: skip
    for text in (repr(session), str(session), repr([session])):
        assert "ASIAEXAMPLEEXAMPLE00" in text
        assert "s3cr3t-value" not in text and "t0ken-value" not in text


def test_an_upstream_answer_repr_hides_its_body() -> None:
    """Invariant 4: an upstream's answer (backends/upstream.py) carries a new session's
    secret key and token in its body; its repr shows the status and headers, not the body."""
    from imdsd.backends.upstream import Answer

    body = b"<SecretAccessKey>s3cr3t-key</SecretAccessKey><SessionToken>t0ken</SessionToken>"
    answer = Answer(200, body, "Mon, 30 Nov 2026 00:00:00 GMT", "req-1", None)
    for text in (repr(answer), str(answer), repr([answer])):
        assert "s3cr3t" not in text and "t0ken" not in text
        assert "req-1" in text


def test_token_issuer_repr_hides_key() -> None:
    """Invariant 4: the IMDSv2 MAC key never shows in a repr."""
    key = b"k" * 32
    assert repr(key)[2:10] not in repr(TokenIssuer(FakeClock(), key))


@pytest.mark.parametrize(
    ("arn", "partition", "account", "name"),
    [
        ("arn:aws:iam::123456789012:role/app", "aws", "123456789012", "app"),
        ("arn:aws:iam::123456789012:role/a/b/app", "aws", "123456789012", "app"),
        ("arn:aws-cn:iam::123456789012:role/app", "aws-cn", "123456789012", "app"),
    ],
)
def test_role_from_arn(arn: str, partition: str, account: str, name: str) -> None:
    """A role ARN gives its partition, account and name (the last path segment)."""
    role = Role.from_arn(arn)
    assert (role.partition, role.account_id, role.name) == (partition, account, name)


@pytest.mark.parametrize(
    "arn", ["arn:aws:iam::123456789012:user/app", "arn:aws:iam::12:role/app", "role/app"]
)
def test_role_from_bad_arn(arn: str) -> None:
    """Anything but a role ARN is refused."""
    with pytest.raises(ValueError):
        Role.from_arn(arn)


def test_profile_arn_is_derived_like_iam() -> None:
    """arn:PARTITION:iam::ACCOUNT:instance-profile/PATH/NAME, from the role's partition and account."""
    role = Role.from_arn("arn:aws-us-gov:iam::123456789012:role/app")
    profile = InstanceProfile(name="web", path="/prod/", id="AIPAAAAAAAAAAAAAAAAAA", role=role)
    assert profile.arn == "arn:aws-us-gov:iam::123456789012:instance-profile/prod/web"


def test_key_display_shows_last_four() -> None:
    """Logs show an access key id by its last four characters only."""
    assert key_display("ASIAABCDEFGHIJKLWXYZ") == "****WXYZ"
