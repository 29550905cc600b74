"""The signed instance identity document, user data and instance tags, checked the way users
check them: the EC2 user guide's own commands (openssl, base64, curl's files) against a live
daemon, with the certificate that `imdsd identity certificate` prints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import host_sections
from tests.process import Proc

pytestmark = pytest.mark.slow  # the daemon as a process

A, B = "127.0.0.2", "127.0.0.3"
CONFIG = """
[imds]
listeners = ["127.0.0.1:0"]
{host}
[[instance_profiles]]
name = "web"
role_arn = "arn:aws:iam::111111111111:role/web"
[[instances]]
id = "i-0aaaaaaaaaaaaaaaa"
addresses = ["127.0.0.2"]
region = "eu-west-1"
instance_type = "m5.large"
account_id = "111111111111"
user_data = "#!/bin/sh\\necho hello from a\\n"
tags = {{ Name = "web-1", "team:owner" = "blue" }}
metadata_options = {{ http_tokens = "optional", instance_metadata_tags = "enabled" }}
[[instances]]
id = "i-0bbbbbbbbbbbbbbbb"
addresses = ["127.0.0.3"]
region = "us-east-2"
instance_type = "c6g.xlarge"
account_id = "222222222222"
user_data_base64 = "H4sIAAAAAAAAA0tMSgYAXKMqJQMAAAA="
tags = {{ Secret = "b's tag" }}
metadata_options = {{ http_tokens = "optional" }}
[[associations]]
instance = "i-0aaaaaaaaaaaaaaaa"
profile = "web"
"""
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")


def fetch(daemon: Proc, path: str, source: str) -> tuple[int, bytes]:
    done = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--interface", source,
                           daemon.url + path], capture_output=True, timeout=30)  # fmt: skip
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status), body


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Proc]:
    if shutil.which("curl") is None:
        pytest.skip("no curl")
    proc = Proc(tmp_path, CONFIG.format(host=host_sections(tmp_path, metrics="")))
    yield proc
    proc.stop()


def certificate(daemon: Proc, into: Path) -> Path:
    """`imdsd identity certificate`, as an operator publishes it."""
    done = subprocess.run([sys.executable, "-m", "imdsd", "identity", "certificate",
                           "--config", str(daemon.config)], capture_output=True, text=True, check=True)  # fmt: skip
    into.write_text(done.stdout)
    return into


def sh(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=60)


@needs_openssl
def test_user_guide_verification_commands(daemon: Proc, tmp_path: Path) -> None:
    """The guide's PKCS7 variant (openssl smime -verify ... -certfile certificate -noverify)
    succeeds for /rsa2048 and /pkcs7 and yields exactly /document; the base64 signature
    variant (openssl dgst -sha256 -verify key -signature signature document) says Verified OK;
    a changed document fails both."""
    work = tmp_path / "guest"
    work.mkdir()
    certificate(daemon, work / "certificate")
    base = f"curl -s --interface {A} {daemon.url}/latest/dynamic/instance-identity"
    for kind in ("rsa2048", "pkcs7"):
        made = sh(f'echo "-----BEGIN PKCS7-----" > {kind} && {base}/{kind} >> {kind}'
                  f' && echo "" >> {kind} && echo "-----END PKCS7-----" >> {kind}', work)  # fmt: skip
        assert made.returncode == 0, made.stderr
        verify = sh(f"openssl smime -verify -in {kind} -inform PEM -certfile certificate -noverify"
                    f" > {kind}.content", work)  # fmt: skip
        assert verify.returncode == 0 and "Verification successful" in verify.stderr, verify.stderr
        assert (work / f"{kind}.content").read_bytes() == fetch(
            daemon, "/latest/dynamic/instance-identity/document", A
        )[1]
    steps = (
        f"{base}/signature | base64 -d > signature && {base}/document > document"
        " && openssl x509 -pubkey -noout -in certificate > key"
        " && openssl dgst -sha256 -verify key -signature signature document"
    )
    verified = sh(steps, work)
    assert verified.returncode == 0 and verified.stdout.strip() == "Verified OK", verified
    (work / "document").write_bytes(
        (work / "document").read_bytes().replace(b"m5.large", b"m5.small")
    )
    forged = sh("openssl dgst -sha256 -verify key -signature signature document", work)
    assert forged.returncode == 1 and "Verification failure" in forged.stdout
    tampered = (work / "rsa2048").read_text().replace("A", "B", 1)
    (work / "rsa2048").write_text(tampered)
    assert (
        sh(
            "openssl smime -verify -in rsa2048 -inform PEM -certfile certificate -noverify", work
        ).returncode
        != 0
    )


def test_signatures_are_wrapped_like_ec2s(daemon: Proc) -> None:
    """signature, pkcs7 and rsa2048: base64 in lines of at most 76 characters, no PEM armour,
    no final newline; the identity listing names the three beside the document."""
    for kind in ("signature", "pkcs7", "rsa2048"):
        status, body = fetch(daemon, f"/latest/dynamic/instance-identity/{kind}", A)
        lines = body.split(b"\n")
        assert status == 200 and b"-----" not in body and not body.endswith(b"\n")
        assert all(len(line) == 76 for line in lines[:-1]) and 0 < len(lines[-1]) <= 76
    assert (
        fetch(daemon, "/latest/dynamic/instance-identity/", A)[1]
        == b"document\npkcs7\nrsa2048\nsignature"
    )


@needs_openssl
def test_two_instances_one_certificate_and_a_restart_keeps_it(daemon: Proc, tmp_path: Path) -> None:
    """Two instances' documents differ in every per-instance field and both verify with the one
    certificate; after a restart the certificate is the same and still verifies."""
    docs = {
        s: json.loads(fetch(daemon, "/latest/dynamic/instance-identity/document", s)[1])
        for s in (A, B)
    }
    for field in (
        "accountId",
        "availabilityZone",
        "imageId",
        "instanceId",
        "instanceType",
        "privateIp",
        "region",
    ):
        assert docs[A][field] != docs[B][field], field
    before = certificate(daemon, tmp_path / "certificate").read_text()

    def verifies(source: str) -> bool:
        signed = fetch(daemon, "/latest/dynamic/instance-identity/rsa2048", source)[1].decode()
        (tmp_path / "p7").write_text(f"-----BEGIN PKCS7-----\n{signed}\n-----END PKCS7-----\n")
        return (
            sh(
                "openssl smime -verify -in p7 -inform PEM -certfile certificate -noverify", tmp_path
            ).returncode
            == 0
        )

    assert verifies(A) and verifies(B)
    assert daemon.stop() == 0
    again = Proc(daemon.directory, daemon.config.read_text())
    try:
        daemon.process, daemon.url = again.process, again.url
        assert certificate(daemon, tmp_path / "certificate").read_text() == before
        assert verifies(A)
    finally:
        again.stop()


def test_user_data_and_tags(daemon: Proc) -> None:
    """user-data: each instance its own bytes (text or binary), listed in /latest/ only where
    present; tags only with instance_metadata_tags enabled, keys listed, values served; no
    instance reads another's."""
    assert fetch(daemon, "/latest/user-data", A) == (200, b"#!/bin/sh\necho hello from a\n")
    status, binary = fetch(daemon, "/latest/user-data", B)
    assert status == 200 and binary.startswith(b"\x1f\x8b")  # gzip, as cloud-init takes it
    assert fetch(daemon, "/latest/", A)[1] == b"dynamic\nmeta-data\nuser-data"
    assert fetch(daemon, "/latest/meta-data/tags/instance", A) == (200, b"Name\nteam:owner")
    assert fetch(daemon, "/latest/meta-data/tags/instance/team:owner", A) == (200, b"blue")
    assert fetch(daemon, "/latest/meta-data/tags/instance/Secret", A)[0] == 404
    assert fetch(daemon, "/latest/meta-data/tags/instance", B)[0] == 404  # the option is off
    assert b"tags/" not in fetch(daemon, "/latest/meta-data/", B)[1]
