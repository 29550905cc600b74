"""The etcd layout and the mirror, without a server: validation, address reuse, bad records."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from imdsd.errors import RecordError
from imdsd.fleet.records import Layout, Mirror, parse
from imdsd.model import Instance, InstanceProfile

LAYOUT = Layout("/imdsd", "h1")
ROLE = "arn:aws:iam::123456789012:role/web"
VM1, VM2 = "i-0123456789abcdef1", "i-0123456789abcdef2"


def put(mirror: Mirror, key: str, value: object, created: int) -> None:
    mirror.put(key, json.dumps(value).encode(), created)


def test_records_parse_like_the_config_tables() -> None:
    """Each kind of key yields the model value the config file's table would; the name in
    the key may be left out of the value, and one that disagrees with it is refused. Whoever
    can write etcd cannot make a host serve one of its files as user data."""
    profile = parse(LAYOUT, "/imdsd/profiles/web", json.dumps({"role_arn": ROLE}).encode())
    assert isinstance(profile, InstanceProfile) and profile.role.arn == ROLE
    instance = parse(LAYOUT, LAYOUT.instance(VM1), b'{"addresses": ["10.0.0.5"]}')
    assert isinstance(instance, Instance) and instance.local_ipv4 == "10.0.0.5"
    assert parse(LAYOUT, LAYOUT.association(VM1), b'{"profile": "web"}') == "web"
    with pytest.raises(RecordError, match=r"instances/i-0123456789abcdef1\.id: got"):
        parse(
            LAYOUT,
            LAYOUT.instance(VM1),
            json.dumps({"id": VM2, "addresses": ["10.0.0.5"]}).encode(),
        )
    with pytest.raises(RecordError, match="hop_limit: got 0; allowed: an integer from 1 to 64"):
        parse(LAYOUT, LAYOUT.instance(VM1),
              b'{"addresses": ["10.0.0.5"], "metadata_options": {"hop_limit": 0}}')  # fmt: skip
    with pytest.raises(
        RecordError, match=r"user_data_file: got .*only the config file may name a file of the host"
    ):
        parse(LAYOUT, LAYOUT.instance(VM1),
              b'{"addresses": ["10.0.0.5"], "user_data_file": "/var/lib/imdsd/vault.key"}')  # fmt: skip
    with pytest.raises(RecordError, match="not a key of the layout"):
        parse(LAYOUT, "/imdsd/hosts/h2/instances/" + VM1, b"{}")


@given(st.binary(max_size=200) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12).map(lambda v: json.dumps(v).encode()),
    st.sampled_from([LAYOUT.instance(VM1), LAYOUT.association(VM1), LAYOUT.profile("web")]))  # fmt: skip
def test_any_value_is_a_record_or_a_record_error(value: bytes, key: str) -> None:
    """Whatever another writer puts in etcd, parsing yields a record or RecordError naming
    the key, never another exception (one bad record cannot stop the watch)."""
    try:
        parse(LAYOUT, key, value)
    except RecordError as exc:
        assert all(p.startswith(key) for p in exc.problems)


def test_baseline_skips_bad_records_with_one_warning_each() -> None:
    """A bad record is left out of the inventory with one warning naming its key; the other
    records are served; a later good value of the same key is taken."""
    mirror = Mirror(LAYOUT)
    with capture_logs() as logs:
        put(mirror, LAYOUT.profile("web"), {"role_arn": ROLE}, 1)
        put(mirror, LAYOUT.instance(VM1), {"addresses": ["10.0.0.1"]}, 2)
        mirror.put(LAYOUT.instance(VM2), b"{not json", 3)
        put(mirror, LAYOUT.association(VM1), {"profile": "web"}, 4)
        mirror.baseline()
        mirror.baseline()
    skipped = [e for e in logs if e["event"] == "fleet record skipped"]
    assert [e["record"] for e in skipped] == [LAYOUT.instance(VM2)]
    instances, _, associations = mirror.baseline()
    assert [i.id for i in instances] == [VM1] and associations == [(VM1, "web")]
    put(mirror, LAYOUT.instance(VM2), {"addresses": ["10.0.0.2"]}, 3)
    assert sorted(i.id for i in mirror.baseline()[0]) == [VM1, VM2]


def test_a_reused_address_belongs_to_the_older_record_until_it_goes() -> None:
    """Two instances claiming one address (a VM re-created before the old record is gone):
    the older record keeps it, the newer waits with one warning, and takes over when the
    older is deleted. An address never serves two instances, or the previous one's role."""
    mirror = Mirror(LAYOUT)
    put(mirror, LAYOUT.instance(VM1), {"addresses": ["10.0.0.1"]}, 5)
    put(mirror, LAYOUT.instance(VM2), {"addresses": ["10.0.0.1"]}, 9)
    with capture_logs() as logs:
        assert [i.id for i in mirror.baseline()[0]] == [VM1]
        assert [i.id for i in mirror.baseline()[0]] == [VM1]
    assert [e["instance"] for e in logs] == [VM2]
    mirror.delete(LAYOUT.instance(VM1))
    assert [i.id for i in mirror.baseline()[0]] == [VM2]


def test_reset_drops_what_a_full_load_no_longer_has() -> None:
    """A reload (after compaction or an outage) replaces the records: deleted keys go."""
    mirror = Mirror(LAYOUT)
    put(mirror, LAYOUT.instance(VM1), {"addresses": ["10.0.0.1"]}, 1)
    mirror.reset({LAYOUT.instance(VM2): (7, b'{"addresses": ["10.0.0.2"]}')}, 7)
    assert [i.id for i in mirror.baseline()[0]] == [VM2] and mirror.revision == 7


def test_an_association_to_an_unknown_profile_waits_with_one_warning() -> None:
    """An association written before its profile: skipped with one warning (not one per
    change), served once the profile exists."""
    mirror = Mirror(LAYOUT)
    put(mirror, LAYOUT.instance(VM1), {"addresses": ["10.0.0.1"]}, 1)
    put(mirror, LAYOUT.association(VM1), {"profile": "web"}, 2)
    with capture_logs() as logs:
        assert mirror.baseline()[2] == [] and mirror.baseline()[2] == []
    assert [(e["event"], e["profile"]) for e in logs] == [
        ("fleet association to an unknown profile skipped", "web")
    ]
    put(mirror, LAYOUT.profile("web"), {"role_arn": ROLE}, 3)
    assert mirror.baseline()[2] == [(VM1, "web")]


def test_records_carry_keys_interfaces_and_block_devices() -> None:
    """An etcd instance record takes public_keys, network_interfaces and block_device_mapping
    like the config's table, and a key that is not OpenSSH is refused naming it."""
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKo3w7NPk/WVpdfeHQxxCs0oDHhy2zVSNa8vcTa4Khvx ops"
    record = {"addresses": ["10.0.0.5"], "public_keys": [key],
              "network_interfaces": [{"mac": "02:00:00:00:00:05", "addresses": ["10.0.0.5"]}],
              "block_device_mapping": {"ephemeral0": "/dev/vdb"}}  # fmt: skip
    instance = parse(LAYOUT, LAYOUT.instance(VM1), json.dumps(record).encode())
    assert isinstance(instance, Instance) and instance.public_keys == (key,)
    assert instance.mac_address == "02:00:00:00:00:05"
    assert instance.block_devices == (("ephemeral0", "/dev/vdb"),)
    with pytest.raises(RecordError, match=r"public_keys\[0\]"):
        parse(LAYOUT, LAYOUT.instance(VM1), json.dumps(record | {"public_keys": ["x"]}).encode())
