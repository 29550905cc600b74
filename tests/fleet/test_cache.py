"""The fleet inventory cache (fleet/cache.py): what is saved is loaded back exactly, whatever
the keys and values etcd held (the file is written record by record)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory

from hypothesis import given, settings
from hypothesis import strategies as st

from imdsd.fleet.cache import Cache
from imdsd.fleet.records import Layout, Mirror

LAYOUT = Layout("/imdsd", "h1")
records = st.dictionaries(
    st.text(min_size=1, max_size=40), st.tuples(st.integers(1, 2**40), st.binary(max_size=64)),
    max_size=20,
)  # fmt: skip


@given(records, st.integers(0, 2**40))
def test_saved_records_load_back_exactly(raw: dict[str, tuple[int, bytes]], revision: int) -> None:
    """Every key (any text, quotes and non-ASCII included), create revision and value bytes,
    the revision and the time saved come back as they were; none at all is an empty cache."""
    mirror = Mirror(LAYOUT)
    mirror.raw.update(raw)
    mirror.revision = revision
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    with TemporaryDirectory() as directory:
        cache = Cache(Path(directory), LAYOUT)
        cache.save(mirror, now)
        assert cache.load() == (raw, revision, now)


batches = st.lists(
    st.dictionaries(st.text(min_size=1, max_size=12),
                    st.one_of(st.none(), st.tuples(st.integers(1, 2**40), st.binary(max_size=48))),
                    min_size=1, max_size=6),
    max_size=12,
)  # fmt: skip


@settings(deadline=None)  # each example fsyncs whole files: the disk's time, not ours
@given(records, batches)
def test_a_batch_saved_as_a_journal_line_loads_back_exactly(
    raw: dict[str, tuple[int, bytes]], changes: list[dict[str, tuple[int, bytes] | None]]
) -> None:
    """After a full load saved whole, each watch batch is saved as its own changes (puts and
    deletes), the journal compacted into the whole file whenever it outgrows it: at every
    point, loading gives exactly the mirror's records, revision and time saved."""
    mirror = Mirror(LAYOUT)
    mirror.raw.update(raw)
    mirror.revision = 1
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    with TemporaryDirectory() as directory:
        cache = Cache(Path(directory), LAYOUT)
        cache.save(mirror, now)
        for n, batch in enumerate(changes, 2):
            for key, record in batch.items():
                if record is None:
                    mirror.raw.pop(key, None)
                else:
                    mirror.raw[key] = record
            mirror.revision, now = n, now + timedelta(seconds=n)
            cache.save(mirror, now, batch.keys())
            assert Cache(Path(directory), LAYOUT).load() == (mirror.raw, n, now)


def test_a_batch_of_one_writes_one_short_line_at_20000_records(tmp_path: Path) -> None:
    """The cost of caching a batch is the batch's: at 20,000 records, one changed record is
    one journal line of under 200 bytes, and the whole file (~1.3 MB) is not rewritten."""
    mirror = Mirror(LAYOUT)
    for n in range(20_000):
        mirror.raw[f"/imdsd/hosts/h1/instances/i-{n:017x}"] = (
            n + 1,
            b'{"addresses": ["10.0.0.1"]}',
        )
    mirror.revision = 20_000
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    cache = Cache(tmp_path, LAYOUT)
    cache.save(mirror, now)
    whole = cache.path.stat()
    key = "/imdsd/hosts/h1/instances/i-00000000000000007"
    mirror.raw[key], mirror.revision = (20_001, b'{"addresses": ["10.0.0.2"]}'), 20_001
    cache.save(mirror, now, {key})
    assert cache.path.stat().st_mtime_ns == whole.st_mtime_ns and whole.st_size > 1_000_000
    assert 0 < cache.journal.stat().st_size < 200
    loaded = Cache(tmp_path, LAYOUT).load()
    assert loaded is not None and loaded[0][key] == mirror.raw[key] and loaded[1] == 20_001


def test_a_torn_line_and_a_stale_journal_are_not_applied(tmp_path: Path) -> None:
    """A crash mid-append leaves a torn last line: the journal stands up to it. A crash
    between writing the whole file and removing the journal leaves lines older than the whole
    file: they are skipped, never replayed over newer records."""
    mirror = Mirror(LAYOUT)
    mirror.raw.update({"a": (1, b"1"), "b": (2, b"2")})
    mirror.revision = 5
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    cache = Cache(tmp_path, LAYOUT)
    cache.save(mirror, now)
    mirror.raw["a"], mirror.revision = (6, b"one"), 6
    cache.save(mirror, now, {"a"})
    with cache.journal.open("ab") as out:
        out.write(b'{"revision": 7, "saved_at": "2026-11-30T12:00:00+00:00", "records": {"b": nu')
    assert Cache(tmp_path, LAYOUT).load() == ({"a": (6, b"one"), "b": (2, b"2")}, 6, now)
    stale = cache.journal.read_bytes()
    mirror.raw["a"], mirror.revision = (8, b"newer"), 8
    cache.save(mirror, now)  # whole; the journal is removed ...
    cache.journal.write_bytes(stale)  # ... or was not, before a crash
    assert Cache(tmp_path, LAYOUT).load() == ({"a": (8, b"newer"), "b": (2, b"2")}, 8, now)


def test_a_failed_append_makes_the_next_save_whole(tmp_path: Path) -> None:
    """The disk refuses a journal line part-way (here the kernel's file size limit, EFBIG: a
    real short write, as a full disk gives): the save fails, and the next batch writes the
    whole file rather than a line after the torn one, which load() would never reach. The
    batch after the failure, and the one that failed, are both in what loads."""
    script = r"""
import resource, signal, sys
from datetime import UTC, datetime
from pathlib import Path
from imdsd.fleet.cache import Cache
from imdsd.fleet.records import Layout, Mirror
directory = Path(sys.argv[1])
layout = Layout("/imdsd", "h1")
mirror, cache = Mirror(layout), Cache(directory, layout)
mirror.raw.update({f"k{n}": (n, b"x" * 64) for n in range(50)})
mirror.revision, now = 1, datetime(2026, 11, 30, tzinfo=UTC)
cache.save(mirror, now)
mirror.raw["k1"], mirror.revision = (2, b"two"), 2
cache.save(mirror, now, {"k1"})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = cache.journal.stat().st_size + 40
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
mirror.raw["k2"], mirror.revision = (3, b"y" * 200), 3
try:
    cache.save(mirror, now, {"k2"})
except OSError:
    print("refused")
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
mirror.raw["k3"], mirror.revision = (4, b"four"), 4
cache.save(mirror, now, {"k3"})
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert done.stdout.strip() == "refused", done.stderr
    loaded = Cache(tmp_path, LAYOUT).load()
    assert loaded is not None
    records, revision, _ = loaded
    assert revision == 4 and records["k1"] == (2, b"two") and records["k2"] == (3, b"y" * 200)
    assert records["k3"] == (4, b"four")


def test_a_line_of_the_whole_files_revision_is_applied(tmp_path: Path) -> None:
    """A transaction on both watched prefixes comes as two watch responses, two changes of one
    revision: when the first one's save writes the whole file, the second one's journal line
    has the whole file's revision, and is applied, not taken for an old line."""
    mirror = Mirror(LAYOUT)
    mirror.raw.update({"/imdsd/profiles/web": (1, b"p1")})
    mirror.revision = 9
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    cache = Cache(tmp_path, LAYOUT)
    cache.save(mirror, now)  # the first response's change, written whole
    mirror.raw["/imdsd/hosts/h1/associations/i-1"] = (9, b'{"profile": "web"}')
    cache.save(mirror, now, {"/imdsd/hosts/h1/associations/i-1"})
    assert Cache(tmp_path, LAYOUT).load() == (mirror.raw, 9, now)
