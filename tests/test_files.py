"""Crash-safe writes (files.py): whatever instant one looks, the file is one whole version."""

from __future__ import annotations

import threading
from pathlib import Path

from imdsd.files import write_atomically

WRITERS = 4
WRITES = 40


def test_concurrent_writers_each_replace_a_whole_file(tmp_path: Path) -> None:
    """Writers of one file at once (the vault's worker thread and its shutdown seal) never
    share a temporary file: every write succeeds, the file is always one writer's whole bytes
    (their lengths differ, so a mix would show), and no temporary file is left behind."""
    path = tmp_path / "sessions.sealed"
    versions = [bytes([65 + n]) * (1000 + 300 * n) for n in range(WRITERS)]
    write_atomically(path, versions[0], 0o600)
    errors: list[BaseException] = []
    seen: set[bytes] = set()
    done = threading.Event()

    def write(data: bytes) -> None:
        try:
            for _ in range(WRITES):
                write_atomically(path, data, 0o600)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    def read() -> None:
        while not done.is_set():
            seen.add(path.read_bytes())

    threads = [threading.Thread(target=write, args=(v,)) for v in versions]
    reader = threading.Thread(target=read)
    reader.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    reader.join()
    assert errors == []
    assert seen <= set(versions) and path.read_bytes() in versions
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    """A write that fails midway (here: data that is not bytes, refused after the temporary
    file exists) raises and leaves the previous file as it was, with no temporary beside it."""
    path = tmp_path / "state.json"
    write_atomically(path, b"old", 0o600)
    try:
        write_atomically(path, "not bytes", 0o600)  # type: ignore[arg-type]
    except TypeError:
        pass
    else:
        raise AssertionError("a str was written")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
