"""The etcd client's TLS and password files, read when a client is built: one that cannot be
read (a typo, a certificate rotated non-atomically, permissions) is a config problem for
check-config, and a state the follower waits out, serving its last known inventory."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import MutableMapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from imdsd.cli import main
from imdsd.clock import SystemClock
from imdsd.config.inventory import EtcdConfig, endpoint
from imdsd.fleet.cache import Cache
from imdsd.fleet.client import open_client
from imdsd.fleet.follower import Follower
from imdsd.fleet.records import Layout, Mirror
from tests.fleet.etcd import Etcd

VM1, VM2 = "i-0c0aac7000000001a", "i-0c0aac7000000002b"
UNREADABLE = "fleet inventory: an etcd client file is unreadable; serving the last known inventory until it is"
STILL = "fleet inventory: etcd client files still unreadable"
READABLE = "fleet inventory: the etcd client files are readable again"


async def until(done: Any, what: str, seconds: float = 10.0) -> None:
    """Poll `done()` every 20 ms, for `seconds` at most."""
    for _ in range(int(seconds / 0.02)):
        if done():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {seconds} s: {what}")


async def test_a_missing_key_file_is_waited_out_serving_the_cache(
    etcd: Etcd, prefix: str, tmp_path: Path
) -> None:
    """The client key file is missing when the follower starts: one warning naming
    inventory.etcd.key_file and ENOENT (never a file's contents), however many attempts; the
    cached inventory stays served (nothing applied, not connected). Once the file is there the
    follower logs one info, connects and applies etcd's records. Before: the follower task
    died at its first attempt, silently, and never followed etcd again."""
    c = etcd.client
    key = tmp_path / "client-key.pem"  # not there yet: the rotation has not written it
    config = EtcdConfig(endpoints=(endpoint(etcd.url),), prefix=prefix, host="host-a",
                        ca_file=c.ca, cert_file=c.cert, key_file=key)  # fmt: skip
    layout = Layout(prefix, "host-a")
    writer = open_client(replace(config, key_file=c.key))
    await writer.put(layout.instance(VM2).encode(), b'{"addresses": ["10.0.0.2"]}')
    mirror = Mirror(layout)  # the last known inventory, from the cache: VM1
    mirror.reset({layout.instance(VM1): (1, b'{"addresses": ["10.0.0.1"]}')}, 1)
    applied: list[list[str]] = []

    async def apply() -> None:
        applied.append([i.id for i in mirror.baseline()[0]])

    follower = Follower(config, mirror, Cache(tmp_path, layout), apply, SystemClock(),
                        stale_since=datetime.now(UTC), backoff=(0.01, 0.05))  # fmt: skip
    with capture_logs() as logs:
        task = asyncio.create_task(follower.run())
        try:
            await until(lambda: _events(logs).count(STILL) >= 3, "three more attempts")
            assert applied == [] and [i.id for i in mirror.baseline()[0]] == [VM1]
            assert follower.status()["connected"] is False
            shutil.copyfile(c.key, key)
            await until(lambda: follower.synced.is_set(), "connected and loaded")
            assert applied[-1] == [VM2]
        finally:
            task.cancel()
            await writer.close()
    warnings = [e for e in logs if e["event"] == UNREADABLE]
    assert [(w["key"], w["errno"]) for w in warnings] == [("inventory.etcd.key_file", "ENOENT")]
    assert _events(logs).count(READABLE) == 1
    assert c.key.read_text().splitlines()[1] not in repr(logs)  # never the key's contents
    assert follower.status()["connected"] is True


def _events(logs: list[MutableMapping[str, Any]]) -> list[str]:
    return [e["event"] for e in logs]


def test_check_config_reads_the_etcd_client_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config reads the etcd CA, client certificate, key and password file: one that
    cannot be read is exit 3 and one line naming its key, the path, the errno and what is
    allowed (before: exit 0, and the daemon found out at its first connect)."""

    def check(key_file: str, password_file: str) -> tuple[int, list[str]]:
        config = _config(tmp_path, key_file, password_file)
        code = main(["check-config", "--config", str(config)])
        return code, capsys.readouterr().err.splitlines()

    assert check("client-key.pem", "password") == (0, [])
    assert check("client-key.pm", "password") == (3, [
        f"imdsd: inventory.etcd.key_file: got {tmp_path}/client-key.pm (ENOENT: No such file or"
        " directory); allowed: a file imdsd can read: the PEM private key of the client certificate"
    ])  # fmt: skip
    code, lines = check("client-key.pem", "")  # the password file's path is the directory
    assert (code, lines) == (3, [
        f"imdsd: inventory.etcd.password_file: got {tmp_path} (EISDIR: Is a directory); "
        "allowed: a file imdsd can read: the etcd user's password, UTF-8"
    ])  # fmt: skip
    (tmp_path / "password").write_bytes(b"\xff\xfe")
    assert check("client-key.pem", "password")[0] == 3


def test_the_fleet_cli_names_an_unreadable_client_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`imdsd fleet` with a TLS key file it cannot read: bad configuration (exit 3), one line
    naming inventory.etcd.key_file, not "etcd unreachable" (exit 4)."""
    config = _config(tmp_path, "client-key.pm", "password")
    assert main(["fleet", "--config", str(config), "profiles", "list"]) == 3
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"imdsd: inventory.etcd.key_file: got {tmp_path}/client-key.pm (ENOENT")


def _config(directory: Path, key_file: str, password_file: str) -> Path:
    """An etcd source config whose TLS and password files are in `directory` (placeholders:
    only whether they can be read matters here)."""
    for name in ("ca.pem", "client.pem", "client-key.pem"):
        (directory / name).write_text("-----BEGIN X-----\n")
    if not (directory / "password").exists():
        (directory / "password").write_text("s3cret-pa55\n")
    config = directory / "imdsd.toml"
    config.write_text(
        '[inventory]\nsource = "etcd"\n[inventory.etcd]\n'
        'endpoints = ["https://127.0.0.1:2379"]\nhost = "hv-1"\nuser = "imdsd"\n'
        f'ca_file = "{directory}/ca.pem"\ncert_file = "{directory}/client.pem"\n'
        f'key_file = "{directory}/{key_file}"\npassword_file = "{directory}/{password_file}"\n'
    )
    return config


async def test_a_password_file_that_never_answers_does_not_stall_the_guests(
    etcd: Etcd, prefix: str, tmp_path: Path
) -> None:
    """Invariant 9: the client files are read in a worker thread. A password file that is a
    FIFO nobody writes (or a hung mount) holds that read forever; the daemon's guests are
    answered all the same (on the loop, the read would have stopped every guest)."""
    import os

    from tests.helpers import host_sections, http
    from tests.process import Proc

    fifo = tmp_path / "password"
    os.mkfifo(fifo)
    directory = tmp_path / "host"
    directory.mkdir()
    text = ('[imds]\nlisteners = ["127.0.0.1:0"]\n' + host_sections(directory, metrics="")
            + etcd.section("host-a", prefix)
            + f'user = "imdsd"\npassword_file = "{fifo}"\n')  # fmt: skip
    daemon = await asyncio.to_thread(Proc, directory, text, until="listening")
    try:
        reply = await asyncio.wait_for(
            http(daemon.url, "/latest/meta-data/instance-id", source="127.0.0.81"), 5
        )
        assert reply.status == 404  # answered: an unknown guest, not a stalled loop
    finally:
        daemon.process.kill()
        daemon.process.wait(timeout=10)
