"""[backend.rolesanywhere] and [backend.sts] host_credentials: every problem one line naming
the key path, the value and what is allowed."""

from __future__ import annotations

import pytest

from imdsd.config import parse
from imdsd.errors import ConfigError
from tests.backends.rolesanywhere.fake import PROFILE, TRUST_ANCHOR
from tests.helpers import config_text

FILES = 'certificate_file = "/etc/imdsd/host.pem"\nprivate_key_file = "/etc/imdsd/host-key.pem"\n'
GOOD = (
    f'region = "eu-west-1"\ntrust_anchor_arn = "{TRUST_ANCHOR}"\nprofile_arn = "{PROFILE}"\n{FILES}'
)


def problems(backend: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(config_text(backend))
    return [str(p) for p in caught.value.problems]


def test_a_complete_section_and_its_defaults() -> None:
    """The issue's example parses; duration 6h, the regional endpoint, no session name."""
    config = parse(
        config_text(f'[backend]\nkind = "rolesanywhere"\n[backend.rolesanywhere]\n{GOOD}')
    )
    ra = config.backend.rolesanywhere
    assert ra.sessions_url == "https://rolesanywhere.eu-west-1.amazonaws.com/sessions"
    assert config.backend.lifetime.total_seconds() == 21600 and ra.role_session_name is None
    assert config.backend.lifetime_key == "backend.rolesanywhere.duration"


def test_missing_keys_are_named() -> None:
    """kind = "rolesanywhere" requires the region, both ARNs and both files."""
    found = problems('[backend]\nkind = "rolesanywhere"\n')
    assert {p.split(":")[0] for p in found} == {
        f"backend.rolesanywhere.{k}"
        for k in (
            "region",
            "trust_anchor_arn",
            "profile_arn",
            "certificate_file",
            "private_key_file",
        )
    }
    assert all("nothing (the key is missing)" in p for p in found)


@pytest.mark.parametrize(("line", "message"), [
    ('duration = "13h"', 'backend.rolesanywhere.duration: got "13h"; allowed: a duration from 15m to 12h (CreateSession\'s 900 to 43200 seconds)'),
    ('role_session_name = "vm"', 'backend.rolesanywhere.role_session_name: got "vm"; allowed: "{instance_id}" (the Roles Anywhere profile must accept it)'),
    ('endpoint = "ftp://x"', 'backend.rolesanywhere.endpoint: got "ftp://x"; allowed: an http:// or https:// base URL'),
    ('nonsense = 1', "backend.rolesanywhere.nonsense: got an unknown key; allowed: region, trust_anchor_arn, profile_arn, role_arn, certificate_file, private_key_file, certificate_chain_file, duration, endpoint, ca_bundle, role_session_name, timeout"),
])  # fmt: skip
def test_bad_values(line: str, message: str) -> None:
    """A bad value: one line, the key path, the value and what is allowed."""
    assert problems(
        f'[backend]\nkind = "rolesanywhere"\n[backend.rolesanywhere]\n{GOOD}{line}\n'
    ) == [message]


def test_a_trust_anchor_arn_is_not_a_profile_arn() -> None:
    """The two ARNs are told apart by their resource type."""
    swapped = GOOD.replace(f'profile_arn = "{PROFILE}"', f'profile_arn = "{TRUST_ANCHOR}"')
    found = problems(f'[backend]\nkind = "rolesanywhere"\n[backend.rolesanywhere]\n{swapped}')
    assert found == [f'backend.rolesanywhere.profile_arn: got "{TRUST_ANCHOR}"; allowed: '
                     "arn:aws:rolesanywhere:REGION:ACCOUNT:profile/ID"]  # fmt: skip


def test_sts_host_credentials_need_the_hosts_role() -> None:
    """host_credentials = "rolesanywhere" needs [backend.rolesanywhere] and its role_arn."""
    sts = '[backend]\nkind = "sts"\n[backend.sts]\nregion = "eu-west-1"\nhost_credentials = "rolesanywhere"\n'
    found = problems(f"{sts}[backend.rolesanywhere]\n{GOOD}")
    assert found == ['backend.rolesanywhere.role_arn: got nothing (the key is missing); allowed: '
                     'the host\'s own role ARN when backend.sts.host_credentials = "rolesanywhere"']  # fmt: skip
    role = 'role_arn = "arn:aws:iam::123456789012:role/imdsd-host"\n'
    config = parse(config_text(f"{sts}[backend.rolesanywhere]\n{GOOD}{role}"))
    assert config.backend.signs_with_certificate and config.backend.kind == "sts"
    assert problems(sts.replace('"rolesanywhere"\n', '"vault"\n')) == [
        'backend.sts.host_credentials: got "vault"; allowed: "chain" or "rolesanywhere"'
    ]
