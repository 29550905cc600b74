"""Invariant 6 for the vault: a SIGKILL at any instant of a seal leaves a vault that opens and
holds one seal whole (the last committed one), never a mix of two."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imdsd.config.backend import BackendConfig
from imdsd.vault import Vault

pytestmark = pytest.mark.slow  # eight writer processes, killed at random instants

ROWS = 300
KEY = b"c" * 32
# The writer: takes over what the last one left (exit 3 if it cannot), then seals every
# session again and again, each seal a new generation, every seventh as a whole new file.
WRITER = f"""
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from imdsd.config.backend import BackendConfig
from imdsd.model import Session
from imdsd.vault import FILE_NAME, Vault
from imdsd.vault.rows import SESSION, TOKENS, session_row

directory, start = Path(sys.argv[1]), datetime(2026, 1, 1, tzinfo=UTC)
vault = Vault(directory, {KEY!r}, BackendConfig())
if vault.load() is None and (directory / FILE_NAME).exists():
    sys.exit(3)
print("writing", flush=True)
generation = 0
while True:
    generation += 1
    rows = {{TOKENS: {KEY!r}}}
    for n in range({ROWS}):
        session = Session(access_key_id=f"ASIA{{generation:08d}}{{n:08d}}",
                          secret_access_key="s" * 40, token="t" * 500, issued_at=start,
                          expiration=start + timedelta(hours=6))
        rows[SESSION + f"i-{{n:017x}}"] = session_row("arn:aws:iam::1:role/r", session,
                                                      vault.issuing)
    vault.commit(rows, whole=generation % 7 == 1)
"""


def test_a_writer_killed_mid_seal_leaves_a_vault_that_opens(tmp_path: Path) -> None:
    """A process sealing 300 sessions as fast as it can (in place, and every seventh time as a
    new file renamed over) is SIGKILLed at random instants, eight times, each run taking over
    what the last one left: every time the vault opens, with all 300 sessions of one and the
    same seal."""
    rng = random.Random(20)
    for _ in range(8):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)],
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert writer.stdout is not None
            while writer.stdout.readline() not in ("writing\n", ""):  # after its log lines
                pass
            time.sleep(rng.uniform(0.05, 0.4))
            writer.send_signal(signal.SIGKILL)
        finally:
            writer.kill()
            assert writer.wait(10) == -signal.SIGKILL  # not 3: the previous run's file opened
            writer.stdout.close()  # type: ignore[union-attr]
        taken = Vault(tmp_path, KEY, BackendConfig()).load()
        assert taken is not None and len(taken.sessions) == ROWS
        generations = {s.access_key_id[4:12] for _, s in taken.sessions.values()}
        assert len(generations) == 1, generations
