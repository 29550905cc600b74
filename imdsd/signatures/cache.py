"""Each instance's identity signatures, made off the guest loop and kept across restarts.

One worker thread signs each instance's document when the instance appears or its document
changes (RSA costs ~2 ms a signature, two per document), so a booting guest finds them ready;
they are appended to a file in the state directory and read back at start, so a restart signs
nothing for documents that did not change. The document and its signatures are public (no
secret is written); a record is keyed by a digest of the document and the signing certificate,
so a changed document or key is never answered with old signatures. A guest that asks before the
worker got to its document is answered with signatures made then, in a thread.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from imdsd.files import write_atomically
from imdsd.signatures import DIGEST, Signatures, Signer, unpacked

log = structlog.get_logger("imdsd.signatures")
CACHE_FILE = "identity-signatures"
_MAGIC = b"imdsd identity signatures 1\n"
_RECORD = struct.Struct(">HHI")  # the id's length, the entry's, CRC-32 of both
SAVE_DELAY = 0.2  # seconds of quiet before what was made is written: one write per burst
COMPACT_SLACK = 64  # stale records tolerated beyond as many as there are current ones
LOAD_WAIT = 2.0  # a request's longest wait for the kept file being read at start
CLOSE_WAIT = 5.0
ON_REQUEST_THREADS = 2
# Bulk work (10,000 documents rendered, digested and maybe signed; the kept file read back)
# runs PACE_WORK, then rests PACE_REST: while it holds the GIL the guest loop waits at each of
# its system calls, so the loop gets at least half of it (a warm start's first request took
# 8-16 ms while the kept file was read unpaced, 6-7 ms with the read out of the way).
PACE_WORK, PACE_REST = 0.002, 0.002
HOLD_POLL = 0.01  # seconds: how soon a hurried document is signed while bulk signing is held
Documents = Callable[[], Iterable[tuple[str, bytes, str]]]  # -> (instance id, document, region)


class SignatureCache:
    """Each instance's signatures, packed (~0.9 KB), made by one worker thread and appended to
    a file in the state directory; the file is read back at start and rewritten when it holds
    more stale records than current ones. The guest loop never waits: what is not ready is
    made in a thread while the request awaits it."""

    def __init__(self, signer: Signer, directory: Path | None) -> None:
        self.signer, self._path = signer, directory / CACHE_FILE if directory else None
        self._entries: dict[str, bytes] = {}  # instance id -> what Signer.signed() made
        self._live: set[str] = set()  # the instances whose signatures are worth keeping
        self._jobs: queue.SimpleQueue[Documents | None] = queue.SimpleQueue()
        self._urgent: collections.deque[tuple[str, bytes, str]] = collections.deque()
        self._lock = threading.Lock()  # _entries and _live against the worker; _pending
        self._pending, self._idle, self._loaded = 0, threading.Event(), threading.Event()
        self._unsaved: list[str] = []  # ids whose entry is not in the file yet
        self._records, self._rewrite, self._closing = 0, True, False
        self._thread: threading.Thread | None = None
        # Requests the notary has not served yet sign here: threads of their own, so neither
        # they nor a wait for the kept file take the default executor's (an upstream's
        # signing, the vault, state saves) from the rest of the daemon.
        self._on_request = ThreadPoolExecutor(ON_REQUEST_THREADS, "signatures on request")
        self._idle.set()
        self._resumed = threading.Event()  # bulk signing may run (start-up's priming is done)
        self.made_by_worker = self.made_on_request = 0  # signatures made, by whom (tests, bench)

    def start(self, *, held: bool = False) -> None:
        """Read the kept file, then sign what prepare() asked for: call after the first
        prepare(), which names the instances whose kept signatures are still wanted. `held`:
        documents are signed in bulk only after resume() (a cold start's 10,000 signatures
        would take half the CPU priming needs), a guest's hurried one at once all the same."""
        if not held:
            self._resumed.set()
        self._thread = threading.Thread(target=self._run, name="identity signatures", daemon=True)
        self._thread.start()

    def resume(self) -> None:
        """Bulk signing may run now."""
        self._resumed.set()

    def close(self) -> None:
        """Stop after the signature in hand, and write down what was made."""
        self._closing = True
        self._jobs.put(None)
        self._on_request.shutdown(wait=False, cancel_futures=True)
        if self._thread is not None:
            self._thread.join(CLOSE_WAIT)

    def prepare(self, instance_ids: Iterable[str], documents: Documents) -> None:
        """Have these instances' documents signed by the worker; `documents` runs there."""
        with self._lock:
            self._live.update(instance_ids)
        self._put(documents)

    def hurry(self, instance_id: str, document: bytes, region: str) -> None:
        """A guest has started reading its tree: its document goes first in line."""
        self._urgent.append((instance_id, document, region))
        self._put(_NOTHING)

    def forget(self, instance_ids: Iterable[str]) -> None:
        with self._lock:
            for instance_id in instance_ids:
                self._live.discard(instance_id)
                self._entries.pop(instance_id, None)

    async def signatures(self, instance_id: str, document: bytes, region: str) -> Signatures:
        """The document's signatures: the worker's, or made now in a thread if it has not got
        to them (never another document's: the digest of the document and certificate must
        match). Nothing here blocks the loop: a request at start-up waits for the kept file in
        that thread, not on the loop (invariant 9)."""
        entry = self._current(instance_id, document, region) if self._loaded.is_set() else None
        if entry is None:
            loop = asyncio.get_running_loop()
            entry = await loop.run_in_executor(self._on_request, self._made_now, instance_id,
                                               document, region)  # fmt: skip
        return unpacked(entry, document)

    def _current(self, instance_id: str, document: bytes, region: str) -> bytes | None:
        entry = self._entries.get(instance_id)
        if entry is None or entry[:DIGEST] != self.signer.digest(document, region):
            return None
        return entry

    def _made_now(self, instance_id: str, document: bytes, region: str) -> bytes:
        """In a request's thread: the kept file read first (at most LOAD_WAIT), then the
        worker's entry if it made one meanwhile, else signed here."""
        if self._thread is not None:
            self._loaded.wait(LOAD_WAIT)
        entry = self._current(instance_id, document, region)
        if entry is None:
            entry = self.signer.signed(document, region)
            with self._lock:
                self.made_on_request += 1
            if self._keep(instance_id, entry):  # kept only while the instance is (forget())
                self._put(_NOTHING)  # the worker writes it down
        return entry

    def wait(self, timeout: float) -> bool:
        """Whether all that was asked is made and written within `timeout` seconds."""
        return self._idle.wait(timeout)

    def _put(self, job: Documents) -> None:
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self._jobs.put(job)

    def _run(self) -> None:
        started = time.monotonic()
        self._load()
        first = True
        while True:
            try:
                job = self._jobs.get(timeout=SAVE_DELAY if self._unsaved else None)
            except queue.Empty:  # a quiet moment: write down the burst
                self._settle(0)
                continue
            if job is None:
                break
            while not self._resumed.wait(HOLD_POLL) and not self._closing:
                self._make_urgent()  # held: only what a guest hurried
            try:
                pace = _Pace()
                for instance_id, document, region in job():
                    self._make_urgent()
                    if self._closing:
                        break
                    self._make(instance_id, document, region)
                    pace()
                self._make_urgent()
            except Exception as exc:  # a key that fails: each request then signs (and fails)
                log.error("identity signing failed", error=exc.__class__.__name__, exc_info=exc)
            if first:  # start-up's: every instance's document
                log.info("identity signatures ready", signed=self.made_by_worker,
                         kept=len(self._entries) - self.made_by_worker,
                         seconds=round(time.monotonic() - started, 3))  # fmt: skip
                first = False
            del job  # its snapshot of the inventory
            self._settle(1)
        self._save()

    def _make_urgent(self) -> None:
        while self._urgent and not self._closing:
            self._make(*self._urgent.popleft())

    def _make(self, instance_id: str, document: bytes, region: str) -> None:
        if instance_id not in self._live:
            return  # gone before its turn
        entry = self._entries.get(instance_id)
        if entry is not None and entry[:DIGEST] == self.signer.digest(document, region):
            return
        if self._keep(instance_id, self.signer.signed(document, region)):
            self.made_by_worker += 1

    def _keep(self, instance_id: str, entry: bytes) -> bool:
        with self._lock:
            if instance_id not in self._live:
                return False
            self._entries[instance_id] = entry
            self._unsaved.append(instance_id)
            return True

    def _settle(self, done: int) -> None:
        if self._pending == done and self._unsaved:
            self._save()  # nothing else asked for: write down what was made
        with self._lock:
            self._pending -= done
            if self._pending == 0 and not self._unsaved:
                self._idle.set()

    def _load(self) -> None:
        kept: dict[str, bytes] = {}
        if self._path is not None:
            try:
                kept, self._records, whole = _read(self._path, _Pace())
                self._rewrite = not whole
            except OSError:
                pass  # none yet: written at the first save
        with self._lock:
            for instance_id, entry in kept.items():
                if instance_id in self._live:
                    self._entries.setdefault(instance_id, entry)
        self._loaded.set()

    def _save(self) -> None:
        """Append what was made; start the file over when it holds more stale records than
        current ones (atomically, then appended to: a crash between costs some signing
        again, never a wrong signature). Record by record: no second copy of ~9 MB of
        signatures (10,000 instances), which the allocator would keep."""
        with self._lock:
            ids, self._unsaved = self._unsaved, []
            rewrite = self._rewrite or (
                self._records + len(ids) > 2 * len(self._entries) + COMPACT_SLACK
            )
            entries = list(self._entries.items()) if rewrite else [
                (i, self._entries[i]) for i in ids if i in self._entries
            ]  # fmt: skip
        if self._path is None or not entries:
            return
        try:
            if rewrite:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(self._path, _MAGIC, 0o644)
                self._records, self._rewrite = 0, False
            with self._path.open("ab") as out:  # a torn tail fails its CRC: signed again
                for instance_id, entry in entries:
                    out.write(_record(instance_id, entry))
            self._records += len(entries)
        except OSError as exc:
            log.warning("identity signatures not kept", path=str(self._path), error=exc.strerror)


def _NOTHING() -> Iterable[tuple[str, bytes, str]]:
    return ()


def _record(instance_id: str, entry: bytes) -> bytes:
    body = instance_id.encode() + entry
    return _RECORD.pack(len(body) - len(entry), len(entry), zlib.crc32(body)) + body


class _Pace:
    """Called after each piece of bulk work: rests PACE_REST once PACE_WORK has passed."""

    def __init__(self) -> None:
        self._since = time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self._since >= PACE_WORK:  # the guest loop's turn
            time.sleep(PACE_REST)
            self._since = time.monotonic()


def _read(path: Path, pace: Callable[[], None]) -> tuple[dict[str, bytes], int, bool]:
    """(entries by instance id, the last record of an id winning; records; whether whole),
    read at once and parsed record by record (paced: ~9 MB at 10,000 instances)."""
    entries: dict[str, bytes] = {}
    count = 0
    data = memoryview(path.read_bytes())
    if data[: len(_MAGIC)] != _MAGIC:
        return entries, count, False
    at = len(_MAGIC)
    while at < len(data):
        if len(data) - at < _RECORD.size:
            return entries, count, False
        name, size, crc = _RECORD.unpack_from(data, at)
        at += _RECORD.size
        body = bytes(data[at : at + name + size])
        at += name + size
        if len(body) != name + size or zlib.crc32(body) != crc or size < DIGEST + 6:
            return entries, count, False
        entries[body[:name].decode(errors="replace")] = body[name:]
        count += 1
        pace()
    return entries, count, True
