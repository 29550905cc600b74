"""The warm-restart vault: what a restart must not lose, sealed with AES-GCM.

Sessions, the IMDSv2 token key, and each instance's token subject (its incarnation) and launch
time, so that after an upgrade or a SIGKILL the sessions that are still good are served at once
with no upstream call, guests' tokens still verify, and pendingTime does not move (DESIGN
invariant 8). One sealed row per value in an SQLite file (rows.py, database.py), so a seal
writes what changed and nothing else; the loop that serves the guests only takes references
to what changed, a worker thread seals and writes them (sealer.py, invariant 9). Sessions are
sealed with a digest of the configuration that issued them (`issuing()`): a start under another
one takes over the token key and incarnations but not the sessions, which are issued anew. The
vault's key lives apart from the data: its own 0600 file (generated on first use) or a systemd
credential (store.py). Nothing is written in clear. Never imports aiohttp.
"""

from __future__ import annotations

from imdsd.vault.rows import Snapshot
from imdsd.vault.sealer import VAULT_SECONDS, restore, sealing
from imdsd.vault.store import FILE_NAME, KEY_NAME, Vault, issuing, vault_key

__all__ = ["FILE_NAME", "KEY_NAME", "VAULT_SECONDS", "Snapshot", "Vault", "issuing", "restore",
           "sealing", "vault_key"]  # fmt: skip
