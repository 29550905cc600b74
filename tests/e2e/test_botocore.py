"""End to end: botocore's own instance-metadata code gets credentials from the running daemon.

InstanceMetadataFetcher and InstanceMetadataProvider are what boto3 and the AWS CLI use.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from botocore.credentials import InstanceMetadataProvider
from botocore.utils import InstanceMetadataFetcher

from tests.e2e.conftest import Running

pytestmark = pytest.mark.slow  # the daemon as a process and botocore

README = Path(__file__).parents[2] / "README.md"


def fetcher(url: str, *, v1_disabled: bool = False) -> InstanceMetadataFetcher:
    config = {"ec2_metadata_service_endpoint": url, "ec2_metadata_v1_disabled": v1_disabled}
    return InstanceMetadataFetcher(timeout=2, num_attempts=2, config=config)


def test_botocore_fetcher_gets_role_credentials(start_daemon: Callable[..., Running]) -> None:
    """IMDSv2 (token required): the fetcher returns the role's keys and an expiry it parsed."""
    daemon = start_daemon()
    creds = fetcher(daemon.url).retrieve_iam_role_credentials()
    assert creds["role_name"] == "demo-role"
    assert re.fullmatch(r"ASIA[A-Z2-7]{16}", creds["access_key"])
    assert len(creds["secret_key"]) == 40 and creds["token"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", creds["expiry_time"])
    events = [line.get("event") for line in daemon.lines()]
    # listeners first (invariant 8), READY once priming has finished
    assert events.index("listening") < events.index("session rotated") < events.index("ready")


def test_botocore_with_v1_disabled(start_daemon: Callable[..., Running]) -> None:
    """With AWS_EC2_METADATA_V1_DISABLED semantics the SDK must use a token, and succeeds."""
    daemon = start_daemon()
    creds = fetcher(daemon.url, v1_disabled=True).retrieve_iam_role_credentials()
    assert creds["role_name"] == "demo-role" and creds["access_key"].startswith("ASIA")


def test_boto3_with_v1_disabled_env_uses_a_token(
    start_daemon: Callable[..., Running], tmp_path: Path
) -> None:
    """AWS_EC2_METADATA_V1_DISABLED=true through boto3's own config chain: the SDK must PUT for
    a token first (the daemon's request log shows it) and then gets the credentials."""
    daemon = start_daemon(tokens="optional")  # v1 would be allowed: the SDK must still use v2
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "HOME": str(tmp_path),
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": daemon.url,
        "AWS_EC2_METADATA_V1_DISABLED": "true",
    }
    code = "import boto3; c = boto3.Session().get_credentials(); print(c.method, c.access_key)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.startswith("iam-role ASIA"), out.stderr
    requests = [
        (line["method"], line["path"], line["status"])
        for line in daemon.lines()
        if line.get("event") == "request"
    ]
    assert requests[0] == ("PUT", "token", 200)
    assert ("GET", "credentials", 404) not in requests  # botocore reads the legacy path only


def test_botocore_provider_loads_credentials(start_daemon: Callable[..., Running]) -> None:
    """The credential provider of boto3's default chain yields usable frozen credentials."""
    daemon = start_daemon(tokens="optional")
    loaded = InstanceMetadataProvider(iam_role_fetcher=fetcher(daemon.url)).load()
    assert loaded is not None and loaded.method == "iam-role"
    frozen = loaded.get_frozen_credentials()
    assert frozen.access_key.startswith("ASIA") and frozen.token


def test_botocore_sees_new_keys_after_rotation(start_daemon: Callable[..., Running]) -> None:
    """The one real-time test: 6-second sessions, refreshed at 3 s by the real APScheduler;
    botocore's next fetch returns the new keys, and the daemon logged the rotation."""
    extra = '\n[rotation]\nrefresh_before = "2s"\nmin_remaining = "1s"\njitter = "0s"\n'
    daemon = start_daemon(extra + '[backend.local]\nlifetime = "6s"\n')
    first = fetcher(daemon.url).retrieve_iam_role_credentials()["access_key"]
    deadline = time.monotonic() + 15
    latest = first
    while latest == first and time.monotonic() < deadline:
        time.sleep(0.25)
        latest = fetcher(daemon.url).retrieve_iam_role_credentials()["access_key"]
    assert latest != first
    rotations = [line for line in daemon.lines() if line.get("event") == "session rotated"]
    assert len(rotations) >= 2


def test_readme_boto3_snippet_works(start_daemon: Callable[..., Running], tmp_path: Path) -> None:
    """The README's boto3 command, run as written (port swapped), prints iam-role and a key."""
    daemon = start_daemon()
    block = re.search(
        r"```sh\n(AWS_EC2_METADATA_SERVICE_ENDPOINT=.*?)```", README.read_text(), re.S
    )
    assert block is not None, "README lost its boto3 snippet"
    command = (
        block.group(1)
        .replace("http://127.0.0.1:8169", daemon.url)
        .replace("python3", sys.executable)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "HOME": str(tmp_path)
    }
    out = subprocess.run(
        ["sh", "-c", command], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert re.fullmatch(r"iam-role ASIA[A-Z2-7]{16}\n", out.stdout), out.stderr


def test_sigterm_exits_cleanly(start_daemon: Callable[..., Running]) -> None:
    """SIGTERM: the daemon logs that it is stopping and exits 0."""
    daemon = start_daemon()
    daemon.process.terminate()
    assert daemon.process.wait(timeout=10) == 0
    assert any(line.get("event") == "stopping" for line in daemon.lines())
