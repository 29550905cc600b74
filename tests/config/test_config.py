"""Configuration: every bad value is reported with key path, value and what is allowed."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from mypy import api as mypy

from imdsd.config import load, parse
from imdsd.config.reader import format_duration, parse_duration
from imdsd.errors import ConfigError
from tests.helpers import ROLE_A, config_text

INSTANCE = '[[instances]]\nid = "i-0123456789abcdef0"\naddresses = ["127.0.0.9"]\n'
PROFILE = f'[[instance_profiles]]\nname = "p"\nrole_arn = "{ROLE_A}"\n'


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return str(caught.value).splitlines()


BAD = [
    ("[imds]\nlisteners = []",
     'imds.listeners: got []; allowed: a non-empty list of "host:port" strings, IPv6 hosts in brackets ("[::1]:80")'),
    ('[imds]\nlisteners = ["::1:80"]',
     'imds.listeners: got ["::1:80"]; allowed: a non-empty list of "host:port" strings, IPv6 hosts in brackets ("[::1]:80")'),
    ('[imds]\nlisteners = ["localhost:80"]',
     'imds.listeners: got ["localhost:80"]; allowed: a non-empty list of "host:port" strings, IPv6 hosts in brackets ("[::1]:80")'),
    ("[imds]\nport = 80", "imds.port: got an unknown key; allowed: listeners, guest_devices, bind_to_devices"),
    ("[rotation]\nrefresh_fraction = 1.5", "rotation.refresh_fraction: got 1.5; allowed: a number greater than 0 and less than 1"),
    ('[rotation]\njitter = "5 minutes"',
     'rotation.jitter: got "5 minutes"; allowed: a duration: seconds as an integer, or a string like "90s", "30m", "6h", "1h30m"; to 6h'),
    ('[rotation]\nretry_max = "99999999999h"', "rotation.retry_max: got \"99999999999h\"; allowed: a duration from 1s to 1h"),
    ('[rotation]\nretry_max = 99999999999999999999', "rotation.retry_max: got 99999999999999999999; allowed: a duration from 1s to 1h"),
    (INSTANCE + 'user_data = "x"\nuser_data_file = "/etc/hostname"', 'instances[0].user_data_file: got a second source of user data; allowed: only one (user_data is set)'),
    (INSTANCE + f'user_data = "{"x" * 16385}"', "instances[0].user_data: got 16385 bytes; allowed: at most 16384 bytes (EC2's limit)"),
    (INSTANCE + 'user_data_base64 = "not base64!"', "instances[0].user_data_base64: got (redacted); allowed: base64 of the bytes"),
    (INSTANCE + 'user_data_file = "/nonexistent/user-data"', 'instances[0].user_data_file: got "/nonexistent/user-data" (No such file or directory); allowed: a regular file of at most 16384 bytes that imdsd can read'),
    (INSTANCE + 'user_data_file = "/"', 'instances[0].user_data_file: got "/" (a directory, not a regular file); allowed: a regular file of at most 16384 bytes that imdsd can read'),
    (INSTANCE + 'tags = { "a b" = "x" }', 'instances[0].tags: got {"a b": "x"}; allowed: a table of tag keys (1-128 of letters, digits and + - = . _ : @; not . .. or _index, as EC2 requires for tags in instance metadata) to string values of at most 256 characters'),
    (INSTANCE + 'tags = { "a/b" = "x" }', 'instances[0].tags: got {"a/b": "x"}; allowed: a table of tag keys (1-128 of letters, digits and + - = . _ : @; not . .. or _index, as EC2 requires for tags in instance metadata) to string values of at most 256 characters'),
    (INSTANCE + 'tags = { "_index" = "x" }', 'instances[0].tags: got {"_index": "x"}; allowed: a table of tag keys (1-128 of letters, digits and + - = . _ : @; not . .. or _index, as EC2 requires for tags in instance metadata) to string values of at most 256 characters'),
    (INSTANCE + 'metadata_options = { instance_metadata_tags = "on" }', 'instances[0].metadata_options.instance_metadata_tags: got "on"; allowed: "enabled" or "disabled"'),
    ('[identity]\nkey_file = "/etc/imdsd/key.pem"', 'identity.certificate_file: got nothing; allowed: both, or neither'),
    ('[state]\nwarm_restart = "yes"', 'state.warm_restart: got "yes"; allowed: true or false'),
    ('[state]\nkey_file = ""', 'state.key_file: got ""; allowed: an absolute path, or one relative to the directory imdsd runs in'),
    ('[rotation]\nmax_rate = 0', "rotation.max_rate: got 0; allowed: an integer from 1 to 10000"),
    ('[budgets]\nconnections = 0', "budgets.connections: got 0; allowed: an integer from 1 to 4096"),
    ('[budgets]\nidle_timeout = "2h"', 'budgets.idle_timeout: got "2h"; allowed: a duration from 1s to 1h'),
    ('[budgets]\nmax_body = -1', "budgets.max_body: got -1; allowed: an integer from 0 to 65536 (bytes)"),
    ('[budgets.instances.bad]\nburst = 7', 'budgets.instances.bad: got a name that is no instance id; allowed: "i-" + 8 or 17 lowercase hex digits'),
    ('[budgets.instances."i.0"]\nburst = 7', 'budgets.instances."i.0": got a name that is no instance id; allowed: "i-" + 8 or 17 lowercase hex digits'),
    ('[budgets.instances.i-0123456789abcdef0]\nburst = 0', "budgets.instances.i-0123456789abcdef0.burst: got 0; allowed: an integer from 1 to 100000"),
    ('[budgets]\nstrangers_connections = 5000', "budgets.strangers_connections: got 5000; allowed: an integer from 1 to 4096"),
    ('[backend.local]\nlifetime = "100000000h"', 'backend.local.lifetime: got "100000000h"; allowed: a duration from 1s to 12h'),
    ('[imds]\nlisteners = ["127.0.0.1:8169", "127.0.0.1:8169"]', 'imds.listeners: got "127.0.0.1:8169"; allowed: listeners that do not overlap (127.0.0.1:8169 is listed too)'),
    ('[imds]\nlisteners = ["0.0.0.0:80", "169.254.169.254:80"]', 'imds.listeners: got "169.254.169.254:80"; allowed: listeners that do not overlap (0.0.0.0:80 is listed too)'),
    ('[imds]\nlisteners = ["127.0.0.1:8169"]\n[metrics]\nlisten = "127.0.0.1:8169"', 'metrics.listen: got "127.0.0.1:8169"; allowed: an address no guest listener uses (imds.listeners has 127.0.0.1:8169)'),
    ("[rotation]\nconcurrency = 0", "rotation.concurrency: got 0; allowed: an integer from 1 to 1024"),
    ('[rotation]\nrefresh_before = "10m"', "rotation.refresh_before: got 10m; allowed: at least rotation.min_remaining (30m)"),
    ('[rotation]\nretry_initial = "10m"\nretry_max = "1m"', "rotation.retry_max: got 1m; allowed: at least rotation.retry_initial (10m)"),
    ('[backend]\nkind = "vault"', 'backend.kind: got "vault"; allowed: "local" or "sts" or "rolesanywhere"'),
    ('[backend]\nkind = "sts"', 'backend.sts.region: got nothing (the key is missing); allowed: a region name like "eu-west-1"'),
    ('[backend.sts]\nregion = "us-east-1"\nduration = "10m"',
     "backend.sts.duration: got \"10m\"; allowed: a duration from 15m to 12h (AssumeRole's 900 to 43200 seconds)"),
    ('[backend]\nkind = "sts"\n[backend.sts]\nregion = "us-east-1"\nduration = "1h"',
     "backend.sts.duration: got 1h; allowed: more than rotation.refresh_before + rotation.jitter (1h10m),"
     " or the session would be refreshed as soon as it is issued"),
    ('[backend.sts]\nendpoint_url = "sts.example.com"', 'backend.sts.endpoint_url: got "sts.example.com"; allowed: an http:// or https:// URL'),
    ('[backend.sts]\nsession_scope = "host"', 'backend.sts.session_scope: got "host"; allowed: "instance" or "profile"'),
    ('[backend.sts]\nsession_tags = ["vm"]', 'backend.sts.session_tags: got ["vm"]; allowed: a list of "instance_id", "host"'),
    ('[backend.sts]\nsource_identity = "a b"',
     'backend.sts.source_identity: got "a b"; allowed: 2-64 of A-Z a-z 0-9 +=,.@- ({host} is replaced by the host name)'),
    (PROFILE + 'external_id = "x"', 'instance_profiles[0].external_id: got "x"; allowed: 2-1224 of A-Z a-z 0-9 +=,.@:/-'),
    ('[backend.local]\nlifetime = "1h"',
     "backend.local.lifetime: got 1h; allowed: more than rotation.refresh_before + rotation.jitter (1h10m),"
     " or the session would be refreshed as soon as it is issued"),
    ('[backend.local]\nkey = "c2VjcmV0LWtleQ=="', "backend.local.key: got (redacted); allowed: base64 of a 16-, 24- or 32-byte AES key"),
    ('[log]\nlevel = "loud"', 'log.level: got "loud"; allowed: "debug" or "info" or "warning" or "error"'),
    ("[[instances]]\naddresses = [\"127.0.0.9\"]",
     'instances[0].id: got nothing (the key is missing); allowed: "i-" followed by 8 or 17 lowercase hex digits'),
    ('[[instances]]\nid = "i-0123"\naddresses = ["127.0.0.9"]',
     'instances[0].id: got "i-0123"; allowed: "i-" followed by 8 or 17 lowercase hex digits'),
    ('[[instances]]\nid = "i-0123456789ABCDEF0"\naddresses = ["127.0.0.9"]',
     'instances[0].id: got "i-0123456789ABCDEF0"; allowed: "i-" followed by 8 or 17 lowercase hex digits'),
    ('[[instances]]\nid = "i-01234567"\naddresses = ["127.0.0.300"]',
     'instances[0].addresses: got ["127.0.0.300"]; allowed: a non-empty list of IPv4 or IPv6 addresses, each at most once'),
    (INSTANCE + 'metadata_options = { http_tokens = "sometimes" }',
     'instances[0].metadata_options.http_tokens: got "sometimes"; allowed: "optional" or "required"'),
    (INSTANCE + "metadata_options = { hop_limit = 65 }",
     "instances[0].metadata_options.hop_limit: got 65; allowed: an integer from 1 to 64"),
    (INSTANCE + 'metadata_options = { http_endpoint = "off" }',
     'instances[0].metadata_options.http_endpoint: got "off"; allowed: "enabled" or "disabled"'),
    (INSTANCE + 'region = "eu-west-1"\navailability_zone = "us-east-1a"',
     'instances[0].availability_zone: got "us-east-1a"; allowed: a zone of the region, like "eu-west-1a"'),
    (INSTANCE + INSTANCE.replace("127.0.0.9", "127.0.0.8"),
     'instances[1].id: got "i-0123456789abcdef0"; allowed: an id no other instance has'),
    (INSTANCE + INSTANCE.replace("abcdef0", "abcdef1"),
     'instances[1].addresses: got "127.0.0.9"; allowed: addresses no other instance claims (i-0123456789abcdef0 has this one)'),
    ('[[instance_profiles]]\nname = "p"\nrole_arn = "arn:aws:iam::1234:role/x"',
     'instance_profiles[0].role_arn: got "arn:aws:iam::1234:role/x"; allowed: a role ARN: arn:aws:iam::123456789012:role/NAME'),
    (PROFILE + 'id = "AIDA123"', 'instance_profiles[0].id: got "AIDA123"; allowed: "AIPA" followed by 17 of A-Z 0-9'),
    (PROFILE + PROFILE, 'instance_profiles[1].name: got "p"; allowed: a name no other instance profile has'),
    (INSTANCE + '[[associations]]\ninstance = "i-0123456789abcdef0"\nprofile = "nope"',
     'associations[0].profile: got "nope"; allowed: one of the configured instance profile names: (none configured)'),
    (PROFILE + '[[associations]]\ninstance = "i-99999999"\nprofile = "p"',
     'associations[0].instance: got "i-99999999"; allowed: one of the configured instance ids: (none configured)'),
    (INSTANCE + PROFILE + '[[associations]]\ninstance = "i-0123456789abcdef0"\nprofile = "p"\n' * 2,
     "associations[1].instance: got \"i-0123456789abcdef0\"; allowed: an instance without an association (it has 'p')"),
    ("instances = 3", "instances: got 3; allowed: an array of tables ([[instances]])"),
    ("[server]\nport = 1", "server: got an unknown key; allowed: imds, state, admin, metrics, rotation, backend, log, budgets, identity, inventory, instances, instance_profiles, associations"),
    ('[inventory]\nsource = "consul"', 'inventory.source: got "consul"; allowed: "file" or "etcd"'),
    ('[inventory.etcd]\nendpoints = ["127.0.0.1:2379"]',
     'inventory.etcd.endpoints: got ["127.0.0.1:2379"]; allowed: a non-empty list of URLs like "https://10.0.0.5:2379"'),
    ('[inventory.etcd]\nprefix = "imdsd/"',
     'inventory.etcd.prefix: got "imdsd/"; allowed: a key prefix like "/imdsd": "/"-separated names, no trailing "/"'),
    ('[inventory.etcd]\nhost = "a host"', 'inventory.etcd.host: got "a host"; allowed: a host name: 1-253 of A-Z a-z 0-9 . _ -'),
    ('[inventory.etcd]\ncert_file = "/c.pem"',
     "inventory.etcd.key_file: got nothing; allowed: cert_file and key_file together (a client certificate and its key)"),
    ('[inventory.etcd]\nuser = "imdsd"', "inventory.etcd.password_file: got nothing; allowed: user and password_file together"),
    ('[inventory.etcd]\nendpoints = ["https://10.0.0.1:2379", "http://10.0.0.2:2379"]',
     'inventory.etcd.endpoints: got ["https://10.0.0.1:2379", "http://10.0.0.2:2379"]; allowed: all https:// or all http://'),
    ('[inventory.etcd]\nca_file = "/ca.pem"',
     'inventory.etcd.endpoints: got ["http://127.0.0.1:2379"]; allowed: https:// URLs when ca_file is set'),
    ('[inventory]\nsource = "etcd"\n' + PROFILE,
     'instance_profiles: got [[instance_profiles]] tables; allowed: none with [inventory] source = "etcd" (the records are in etcd)'),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_value_names_path_value_and_allowed(text: str, message: str) -> None:
    """Each bad value yields exactly one line: key path, the value found, what is allowed."""
    assert problems(text) == [message]


def test_every_problem_is_reported_at_once() -> None:
    """Validation collects all errors rather than stopping at the first."""
    found = problems('[rotation]\nconcurrency = 0\n[log]\nformat = "xml"\n[backend]\nkind = "x"')
    assert [line.split(":")[0] for line in found] == [
        "rotation.concurrency",
        "backend.kind",
        "log.format",
    ]


def test_secret_key_value_never_echoed() -> None:
    """Invariant 4: a malformed issuer key is reported without repeating it."""
    secret = "dGhpcyBpcyBub3QgYSBnb29kIGtleQ=="
    (line,) = problems(f'[backend.local]\nkey = "{secret}"')
    assert secret not in line and "(redacted)" in line


def test_invalid_toml_is_one_line() -> None:
    """A syntax error names the file and says what was expected."""
    (line,) = problems("[imds\n")
    assert line.startswith("<config>: got invalid TOML (") and line.endswith(
        "allowed: a TOML document"
    )


def test_missing_file(tmp_path: Path) -> None:
    """An unreadable config file is a config error (exit 3), not a traceback."""
    with pytest.raises(ConfigError, match="unreadable file"):
        load(tmp_path / "absent.toml")


def test_good_config_round_trip() -> None:
    """A valid file becomes frozen dataclasses with EC2-like derived defaults."""
    config = parse(config_text())
    a = config.instances[0]
    assert (a.region, a.availability_zone, a.private_dns_name) == (
        "eu-west-1",
        "eu-west-1a",
        "ip-127-0-0-2.eu-west-1.compute.internal",
    )
    assert a.mac_address.startswith("02:") and len(a.mac_address) == 17
    assert a.image_id.startswith("ami-") and (a.ami_id, a.hostname, a.mac) == (None, None, None)
    b = config.instances[1]
    assert b.addresses == ("127.0.0.3", "::1") and b.private_dns_name == "ip-127-0-0-3.ec2.internal"
    assert (b.options.http_tokens, b.options.hop_limit) == ("required", 3)
    profile_b = config.profiles[1]
    assert profile_b.arn == "arn:aws:iam::222222222222:instance-profile/team/profile-b"
    assert profile_b.id == "AIPABBBBBBBBBBBBBBBBB"
    assert config.profiles[0].id.startswith("AIPA") and len(config.profiles[0].id) == 21
    assert config.associations == (
        ("i-0aaaaaaaaaaaaaaaa", "profile-a"),
        ("i-0bbbbbbbbbbbbbbbb", "profile-b"),
    )
    with pytest.raises(AttributeError):
        config.rotation.jitter = timedelta(0)  # type: ignore[misc]


def test_defaults() -> None:
    """An empty file means the production listener, the local issuer and EC2's defaults."""
    config = parse("")
    assert [str(x) for x in config.imds.listeners] == ["169.254.169.254:80"]
    assert config.backend.kind == "local" and config.backend.lifetime == timedelta(hours=6)
    assert config.rotation.min_remaining == timedelta(minutes=30)


def test_sts_section() -> None:
    """The sts backend: regional endpoint by default, the duration is the session lifetime."""
    config = parse(
        '[backend]\nkind = "sts"\n[backend.sts]\nregion = "eu-central-1"\nduration = "12h"\n'
        'session_tags = ["host", "instance_id", "host"]\nsource_identity = "imdsd-{host}"'
    )
    sts = config.backend.sts
    assert sts.endpoint == "https://sts.eu-central-1.amazonaws.com"
    assert config.backend.lifetime == timedelta(hours=12) and sts.session_tags == (
        "host",
        "instance_id",
    )
    assert (
        parse('[backend.sts]\nregion = "cn-north-1"').backend.sts.endpoint
        == "https://sts.cn-north-1.amazonaws.com.cn"
    )
    custom = parse('[backend.sts]\nendpoint_url = "http://127.0.0.1:5000"').backend.sts
    assert custom.endpoint == "http://127.0.0.1:5000/"


def test_ipv6_listener() -> None:
    """IPv6 listeners are written in brackets and kept without them."""
    config = parse('[imds]\nlisteners = ["[fd00:ec2::254]:80", "169.254.169.254:80"]')
    assert [(x.host, x.port) for x in config.imds.listeners] == [
        ("fd00:ec2::254", 80),
        ("169.254.169.254", 80),
    ]
    assert str(config.imds.listeners[0]) == "[fd00:ec2::254]:80"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(90, timedelta(seconds=90)), ("90s", timedelta(seconds=90)), ("30m", timedelta(minutes=30)),
     ("6h", timedelta(hours=6)), ("1h30m", timedelta(minutes=90)), ("1h0m5s", timedelta(seconds=3605))],
)  # fmt: skip
def test_durations(value: object, expected: timedelta) -> None:
    """Durations are integer seconds or h/m/s strings, and print back in the same form."""
    assert parse_duration(value) == expected
    assert parse_duration(format_duration(expected)) == expected


@pytest.mark.parametrize("value", ["", "1d", "m", "-5", -5, True, 1.5, "1m1h"])
def test_bad_durations(value: object) -> None:
    """Anything else is refused."""
    with pytest.raises(ValueError):
        parse_duration(value)


def test_choice_is_typed_as_its_choices(tmp_path: Path) -> None:
    """choice() returns the type of the values it is given, so mypy --strict checks the
    Literal field it fills: a converter of one Literal's values cannot fill another's."""
    snippet = tmp_path / "snippet.py"
    snippet.write_text(
        "from typing import Literal, get_args\n"
        "from imdsd.config.converters import choice\n"
        'Color = Literal["red", "blue"]\n'
        'Size = Literal["s", "m"]\n'
        "colors: tuple[Color, ...] = get_args(Color)\n"
        'color: Color = choice(colors)("red")\n'
        'size: Size = choice(colors)("red")\n'
    )
    out, _, status = mypy.run(["--strict", "--cache-dir", str(tmp_path / "cache"), str(snippet)])
    assert status == 1 and out.splitlines()[:1] == [
        f"{snippet}:7: error: Incompatible types in assignment (expression has type "
        "\"Literal['red', 'blue']\", variable has type \"Literal['s', 'm']\")  [assignment]"
    ], out


def test_a_reload_parses_the_same_config_with_the_stdlib_parser(tmp_path: Path) -> None:
    """SIGHUP's reread parses with tomllib (pure Python: a worker thread parsing lets the
    guest loop run) and gets exactly the config the start-up's tomli gives; a bad file is
    refused the same way by both."""
    example = Path(__file__).parents[2] / "config" / "imdsd.example.toml"
    assert load(example, beside_a_loop=True) == load(example)
    bad = tmp_path / "bad.toml"
    bad.write_text("[imds\n")
    for beside in (False, True):
        with pytest.raises(ConfigError, match="invalid TOML"):
            load(bad, beside_a_loop=beside)
