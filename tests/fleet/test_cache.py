"""The fleet inventory cache (fleet/cache.py): what is saved is loaded back exactly, whatever
the keys and values etcd held (the file is written record by record)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory

from hypothesis import given
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
