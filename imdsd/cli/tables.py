"""What the admin and fleet verbs print for people: left-aligned tables and records."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """Left-aligned columns, two spaces apart; '-' for nothing."""
    cells = [[str(h) for h in header]] + [
        ["-" if c is None else str(c) for c in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def instances_table(rows: list[dict[str, Any]], last: str = "source") -> str:
    """Instances, a line each; the last column is `last` (the admin's source, the fleet's host)."""
    header: tuple[str, ...] = ("INSTANCE", "ADDRESSES", "PROFILE", "TOKENS", "HOPS", "ENDPOINT",
                               last.upper())  # fmt: skip
    if any(r.get("host_interface") or r.get("host_netns") for r in rows):
        header = (*header[:2], "ARRIVES", *header[2:])  # only on a host that needs it
    lines = []
    for r in rows:
        o = r["metadata_options"]
        where = [r.get("host_interface") or r.get("host_netns") or "host"][: len(header) - 7]
        lines.append((r["id"], ",".join(r["addresses"]) or "(its device)", *where, r["profile"],
                      o["http_tokens"], o["hop_limit"], o["http_endpoint"], r[last]))  # fmt: skip
    return table(lines, header)


def profiles_table(rows: list[dict[str, Any]]) -> str:
    return table([(r["name"], r["role_arn"], r["id"]) for r in rows], ("PROFILE", "ROLE", "ID"))


def sessions_table(rows: list[dict[str, Any]]) -> str:
    header = ("INSTANCE", "PROFILE", "KEY", "EXPIRES", "NEXT REFRESH", "STATE", "LAST ERROR")
    lines = []
    for r in rows:
        error = (r["last_error"] or {}).get("code")
        lines.append((r["instance"], r["profile"], r["access_key"], r["expires"],
                      r["next_refresh"], r["state"], error))  # fmt: skip
    return table(lines, header)


def record(data: dict[str, Any]) -> str:
    """One record, a line per field."""
    return "\n".join(
        f"{k}: {json.dumps(v) if isinstance(v, dict | list) else v}" for k, v in data.items()
    )
