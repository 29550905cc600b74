"""The fleet inventory cache: the last applied records in the state directory, so a host
restarted while etcd is down serves its last known inventory (kept for one prefix and host)."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from pathlib import Path

import structlog

from imdsd.files import write_atomically
from imdsd.fleet.records import Layout, Mirror

log = structlog.get_logger("imdsd.etcd")
CACHE_NAME = "fleet-inventory.json"
CACHE_MODE, DIRECTORY_MODE = 0o640, 0o750


class Cache:
    """The last applied records, in the state directory (kept for this prefix and host only)."""

    def __init__(self, directory: Path, layout: Layout) -> None:
        self.path, self.layout = directory / CACHE_NAME, layout

    def load(self) -> tuple[dict[str, tuple[int, bytes]], int, datetime] | None:
        """(records, revision, when saved), or None when there is none for this layout."""
        try:
            data = json.loads(self.path.read_bytes())
            if data["prefix"] != self.layout.prefix or data["host"] != self.layout.host:
                return None
            records = {k: (int(c), base64.b64decode(v)) for k, (c, v) in data["records"].items()}
            return records, int(data["revision"]), datetime.fromisoformat(data["saved_at"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("fleet inventory cache unreadable; ignored", path=str(self.path),
                        error=exc.__class__.__name__)  # fmt: skip
            return None

    def save(self, mirror: Mirror, now: datetime) -> None:
        """Write the records (in a worker thread). Encoded record by record: one json.dumps of
        20,000 records is one C call holding the GIL for ~20 ms, a stall of the guest loop;
        small calls let the loop in between (the JSON document is the same)."""
        self.path.parent.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        head = {"prefix": self.layout.prefix, "host": self.layout.host, "saved_at": now.isoformat(),
                "revision": mirror.revision}  # fmt: skip
        parts = [json.dumps(head)[:-1], ', "records": {']
        for n, (key, (created, value)) in enumerate(mirror.raw.items()):
            record = json.dumps([created, base64.b64encode(value).decode()])
            parts.append(f"{', ' if n else ''}{json.dumps(key)}: {record}")
        parts.append("}}")
        write_atomically(self.path, "".join(parts).encode(), CACHE_MODE)
