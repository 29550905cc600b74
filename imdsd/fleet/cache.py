"""The fleet inventory cache: the last applied records in the state directory, so a host
restarted while etcd is down serves its last known inventory (kept for one prefix and host).

Two files: the whole record set (`fleet-inventory.json`, written after a full load from etcd,
atomically) and a journal beside it (`fleet-inventory.journal`), one JSON line per watch batch
with only the records it changed: a batch costs its own size, not the 20,000 records of a big
host. When the journal outgrows the whole file, the next batch writes the whole file again and
starts the journal over. A journal line older than the whole file (a crash between the two)
is skipped; a torn last line ends the journal.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import structlog

from imdsd.files import write_atomically
from imdsd.fleet.records import Layout, Mirror

log = structlog.get_logger("imdsd.etcd")
CACHE_NAME = "fleet-inventory.json"
JOURNAL_NAME = "fleet-inventory.journal"
CACHE_MODE, DIRECTORY_MODE = 0o640, 0o750
Records = dict[str, tuple[int, bytes]]


class Cache:
    """The last applied records, in the state directory (kept for this prefix and host only)."""

    def __init__(self, directory: Path, layout: Layout) -> None:
        self.path, self.layout = directory / CACHE_NAME, layout
        self.journal = directory / JOURNAL_NAME
        self._whole_bytes: int | None = None  # the whole file's size, once written or read

    def load(self) -> tuple[Records, int, datetime] | None:
        """(records, revision, when saved), or None when there is none for this layout."""
        try:
            raw = self.path.read_bytes()
            data = json.loads(raw)
            if data["prefix"] != self.layout.prefix or data["host"] != self.layout.host:
                return None
            records = {k: (int(c), base64.b64decode(v)) for k, (c, v) in data["records"].items()}
            revision, saved = int(data["revision"]), datetime.fromisoformat(data["saved_at"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("fleet inventory cache unreadable; ignored", path=str(self.path),
                        error=exc.__class__.__name__)  # fmt: skip
            return None
        self._whole_bytes = len(raw)
        for line in self._journal_lines():
            try:
                entry = json.loads(line)
                if int(entry["revision"]) < revision:
                    continue  # older than the whole file: written before it (a line of its
                    # revision may be newer: a transaction on both prefixes is two lines)
                changes = {k: None if r is None else (int(r[0]), base64.b64decode(r[1]))
                           for k, r in entry["records"].items()}  # fmt: skip
                saved_at = datetime.fromisoformat(entry["saved_at"])
            except (ValueError, KeyError, TypeError, IndexError):
                break  # a torn or foreign line: what came before it stands
            for key, record in changes.items():
                if record is None:
                    records.pop(key, None)
                else:
                    records[key] = record
            revision, saved = int(entry["revision"]), saved_at
        return records, revision, saved

    def save(self, mirror: Mirror, now: datetime, keys: Iterable[str] | None = None) -> None:
        """Write what changed (in a worker thread, while nothing changes the mirror): the
        records at `keys` as one journal line, or (keys None: a full load) every record as
        the whole file. The whole file is written too when the journal has outgrown it."""
        self.path.parent.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        if keys is None or self._whole_bytes is None or self._journal_bytes() > self._whole_bytes:
            return self._save_whole(mirror, now)
        records = {key: mirror.raw.get(key) for key in keys}
        parts = [f'{{"revision": {int(mirror.revision)}, "saved_at": "{now.isoformat()}", '
                 '"records": {', *_encoded(records.items()), "}}\n"]  # fmt: skip
        try:
            descriptor = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, CACHE_MODE)
            with os.fdopen(descriptor, "ab") as out:  # a crash may tear it: load stops there
                out.write("".join(parts).encode())
        except OSError:
            self._whole_bytes = None  # a torn line would hide every later one: whole next time
            raise

    def _save_whole(self, mirror: Mirror, now: datetime) -> None:
        """Every record, encoded record by record: one json.dumps of 20,000 records is one C
        call holding the GIL for ~20 ms, a stall of the guest loop; small calls let the loop in
        between (the JSON document is the same). The journal then starts over."""
        head = {"prefix": self.layout.prefix, "host": self.layout.host, "saved_at": now.isoformat(),
                "revision": mirror.revision}  # fmt: skip
        parts = [json.dumps(head)[:-1], ', "records": {', *_encoded(mirror.raw.items()), "}}"]
        data = "".join(parts).encode()
        self._whole_bytes = None  # until it is written: a journal line on the old one is wrong
        write_atomically(self.path, data, CACHE_MODE)
        self._whole_bytes = len(data)
        with contextlib.suppress(FileNotFoundError):  # its lines are older than the whole now
            self.journal.unlink()

    def _journal_bytes(self) -> int:
        try:
            return self.journal.stat().st_size
        except FileNotFoundError:
            return 0

    def _journal_lines(self) -> list[bytes]:
        try:
            data = self.journal.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        return lines[:-1]  # the last is empty, or torn (no newline yet)


def _encoded(records: Iterable[tuple[str, tuple[int, bytes] | None]]) -> Iterable[str]:
    """`"key": [created, base64]` (or null: deleted) per record, comma-separated."""
    for n, (key, record) in enumerate(records):
        value = (
            "null"
            if record is None
            else json.dumps([record[0], base64.b64encode(record[1]).decode()])
        )
        yield f"{', ' if n else ''}{json.dumps(key)}: {value}"
