"""Only the config file (root's to write) names files of the host. The admin API, the state
file and etcd records never make the daemon read one and serve it to a VM; the config's own
user_data_file is a regular file read with a cap, so a FIFO, a device or a huge file is one
config problem and never a daemon blocked on open() or reading until it runs out of memory."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imdsd.cli.client import request
from imdsd.errors import Refused
from imdsd.model import USER_DATA_MAX_BYTES
from tests.helpers import host_sections, http
from tests.process import Proc

VM, NEW, ADDED = "i-0aaaaaaaaaaaaaaaa", "i-0eeeeeeeeeeeeeeee", "127.0.0.6"
SECRET = b"-----BEGIN PRIVATE KEY-----\nthe host's own key\n-----END PRIVATE KEY-----\n"
ALLOWED = f"a regular file of at most {USER_DATA_MAX_BYTES} bytes that imdsd can read"
REFUSED = "user_data or user_data_base64 (only the config file may name a file of the host)"
OPTIONAL = {"http_tokens": "optional"}


def config(directory: Path, user_data_file: Path | str | None = None) -> str:
    """One instance at 127.0.0.2 (IMDSv1 allowed), with user data from `user_data_file`."""
    text = (
        f'[imds]\nlisteners = ["127.0.0.1:0"]\n{host_sections(directory, metrics="")}'
        f'[log]\nlevel = "info"\n[[instances]]\nid = "{VM}"\naddresses = ["127.0.0.2"]\n'
        'metadata_options = { http_tokens = "optional" }\n'
    )
    return text + (f'user_data_file = "{user_data_file}"\n' if user_data_file else "")


def imdsd(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m imdsd ARGS` with a deadline and 1 GiB of address space: code that blocks on a
    FIFO or reads /dev/zero to its end fails this test instead of hanging or exhausting the
    host."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run([sys.executable, "-m", "imdsd", *args], capture_output=True, text=True,
                          timeout=30, preexec_fn=limit)  # fmt: skip


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Proc]:
    proc = Proc(tmp_path, config(tmp_path))
    yield proc
    stop(proc)


def stop(proc: Proc) -> None:
    try:
        assert proc.stop() == 0
    except subprocess.TimeoutExpired:  # a daemon stuck in open(): kill it, then fail
        proc.process.kill()
        proc.process.wait()
        raise


async def test_admin_api_refuses_user_data_file(tmp_path: Path, daemon: Proc) -> None:
    """POST /v1/instances naming a file of the host as user data is refused (400
    InvalidParameter, one problem naming the key): no instance is added and no guest is ever
    served the file. A PATCH of metadata options cannot name one either."""
    secret = tmp_path / "identity-key.pem"
    secret.write_bytes(SECRET)
    socket = tmp_path / "admin.sock"
    body = {"id": NEW, "addresses": [ADDED], "metadata_options": OPTIONAL,
            "user_data_file": str(secret)}  # fmt: skip
    with pytest.raises(Refused) as refused:
        await request(socket, "POST", "/v1/instances", body)
    assert (refused.value.http_status, refused.value.code) == (400, "InvalidParameter")
    assert refused.value.problems == [
        f'instance.user_data_file: got "{secret}"; allowed: {REFUSED}'
    ]
    assert NEW not in [i["id"] for i in await request(socket, "GET", "/v1/instances")]
    reply = await http(daemon.url, "/latest/user-data", source=ADDED)
    assert reply.status != 200 and SECRET not in reply.body
    with pytest.raises(Refused) as refused:
        await request(socket, "PATCH", f"/v1/instances/{VM}/metadata-options",
                      {"user_data_file": str(secret)})  # fmt: skip
    assert refused.value.http_status == 400
    assert SECRET not in (await http(daemon.url, "/latest/user-data", source="127.0.0.2")).body


async def test_cli_reads_the_callers_file_with_a_cap(tmp_path: Path, daemon: Proc) -> None:
    """`instances add --user-data-file` still works: the CLI reads the file (a pipe too) and
    sends its bytes, which the guest is served. /dev/zero is read only to one byte over the
    limit and refused by the daemon (exit 1, the limit named); a missing file is exit 1."""
    add = ("instances", "add", "--socket", str(tmp_path / "admin.sock"), "--http-tokens",
           "optional", "--user-data-file")  # fmt: skip
    user_data = tmp_path / "user-data"
    user_data.write_bytes(b"#cloud-config\n")
    done = imdsd(*add, str(user_data), "--id", NEW, "--address", ADDED)
    assert done.returncode == 0, done.stderr
    reply = await http(daemon.url, "/latest/user-data", source=ADDED)
    assert (reply.status, reply.body) == (200, b"#cloud-config\n")
    done = imdsd(*add, "/dev/zero", "--id", "i-0ffffffffffffffff", "--address", "127.0.0.7")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"imdsd: InvalidParameter: instance.user_data_base64: got {USER_DATA_MAX_BYTES + 1}"
        f" bytes; allowed: at most {USER_DATA_MAX_BYTES} bytes (EC2's limit)"
    ]
    done = imdsd(
        *add, str(tmp_path / "absent"), "--id", "i-0ffffffffffffffff", "--address", "127.0.0.7"
    )
    assert done.returncode == 1
    assert done.stderr == f"imdsd: cannot read {tmp_path / 'absent'}: No such file or directory\n"


def test_state_file_naming_a_host_file_is_refused(tmp_path: Path) -> None:
    """A state file record (hand-edited, or from an old version) that names a file of the host
    is a bad state file: check-config exits 3 with one line naming the record's key."""
    path = tmp_path / "imdsd.toml"
    path.write_text(config(tmp_path))
    (tmp_path / "state").mkdir()
    record = {"id": NEW, "addresses": [ADDED], "user_data_file": "/etc/imdsd/vault.key"}
    state = tmp_path / "state" / "state.json"
    state.write_text(json.dumps({"version": 2, "added": {NEW: record}}))
    done = imdsd("check-config", "--config", str(path))
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr.splitlines() == [
        f'imdsd: {state}: added.{NEW}.user_data_file: got "/etc/imdsd/vault.key"; allowed: '
        + REFUSED
    ]


def bad_files(directory: Path) -> list[tuple[Path, str]]:
    """(a user_data_file, why it is refused): a FIFO nobody writes to, a directory, a device
    that never ends, a regular file over EC2's limit."""
    fifo, big = directory / "fifo", directory / "big"
    os.mkfifo(fifo)
    big.write_bytes(b"x" * 17 * 1024)
    return [
        (fifo, "a FIFO, not a regular file"),
        (directory, "a directory, not a regular file"),
        (Path("/dev/zero"), "a character device, not a regular file"),
        (big, f"more than {USER_DATA_MAX_BYTES} bytes"),
    ]


@pytest.mark.parametrize("which", range(4), ids=["fifo", "directory", "dev-zero", "17KiB"])
def test_check_config_refuses_what_is_not_a_small_regular_file(tmp_path: Path, which: int) -> None:
    """check-config: a user_data_file that is not a regular file of at most 16 KiB is one line
    naming the key, the value (and why) and what is allowed, exit 3, at once."""
    user_data_file, why = bad_files(tmp_path)[which]
    path = tmp_path / "imdsd.toml"
    path.write_text(config(tmp_path, user_data_file))
    done = imdsd("check-config", "--config", str(path))
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr.splitlines() == [
        f'imdsd: instances[0].user_data_file: got "{user_data_file}" ({why}); allowed: {ALLOWED}'
    ]


async def test_reload_refuses_a_bad_user_data_file_and_keeps_serving(tmp_path: Path) -> None:
    """A regular user_data_file is served; a SIGHUP with a FIFO, a directory, /dev/zero or an
    oversized file in its place is refused with the problem logged, and the daemon goes on
    serving the running config."""
    user_data = tmp_path / "user-data"
    user_data.write_bytes(b"#!/bin/sh\necho hello\n")
    proc = Proc(tmp_path, config(tmp_path, user_data))
    try:
        reply = await http(proc.url, "/latest/user-data", source="127.0.0.2")
        assert (reply.status, reply.body) == (200, b"#!/bin/sh\necho hello\n")
        for user_data_file, why in bad_files(tmp_path):
            proc.config.write_text(config(tmp_path, user_data_file))
            mark = len(proc.events())
            proc.process.send_signal(signal.SIGHUP)
            refused = proc.wait_for(
                "reload refused: the config is invalid; keeping the running one", after=mark
            )
            assert refused["problems"] == [
                f'instances[0].user_data_file: got "{user_data_file}" ({why}); allowed: {ALLOWED}'
            ]
            reply = await http(proc.url, "/latest/user-data", source="127.0.0.2")
            assert (reply.status, reply.body) == (200, b"#!/bin/sh\necho hello\n")
    finally:
        stop(proc)
