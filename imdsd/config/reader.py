"""The reader behind the config sections: a table reader that collects every problem with
its key path (the converters it applies are in converters.py).

Knows nothing of imdsd's sections (the modules beside it do); imports only model and errors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any, TypeVar

from imdsd.errors import Problem

T = TypeVar("T")
S = TypeVar("S", bound=str)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


@dataclass(frozen=True, slots=True, kw_only=True)
class Listener:
    """One address the metadata API listens on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def show(value: object) -> str:
    """A config value as messages print it: TOML-ish, strings quoted."""
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def parse_duration(value: object) -> timedelta:
    """`90` (seconds), `"90s"`, `"30m"`, `"6h"`, `"1h30m"` -> timedelta; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return timedelta(seconds=value)
    if isinstance(value, str) and value and (m := _DURATION.fullmatch(value)):
        h, mi, s = (int(g or 0) for g in m.groups())
        return timedelta(hours=h, minutes=mi, seconds=s)
    raise ValueError(value)


def format_duration(value: timedelta) -> str:
    """timedelta -> the `1h30m` form that config accepts."""
    total = int(value.total_seconds())
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    text = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s else "")
    return text or "0s"


DURATION = 'a duration: seconds as an integer, or a string like "90s", "30m", "6h", "1h30m"'


class Reader:
    """Collects the problems found while walking the document."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def problem(self, path: str, value: str, allowed: str) -> None:
        self.problems.append(Problem(path, value, allowed))

    def root(self, data: dict[str, Any], known: tuple[str, ...]) -> Section:
        section = Section(self, data, "")
        section.reject_unknown(known)
        return section


class Section:
    """One table of the document and its key path; converts values, reporting bad ones."""

    def __init__(self, reader: Reader, data: dict[str, Any], path: str) -> None:
        self.reader, self.data, self.path = reader, data, path

    def where(self, key: str) -> str:
        """The key path, a key that is not bare TOML quoted (a message stays one line)."""
        shown = key if _BARE_KEY.fullmatch(key) else json.dumps(key)
        return f"{self.path}.{shown}" if self.path else shown

    def problem(self, key: str, value: str, allowed: str) -> None:
        self.reader.problem(self.where(key), value, allowed)

    def child(self, key: str) -> Section:
        """The sub-table at `key` (empty if it is not one), for problems inside it."""
        value = self.data.get(key)
        return Section(self.reader, value if isinstance(value, dict) else {}, self.where(key))

    def reject_unknown(self, known: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in known:
                self.problem(key, "an unknown key", ", ".join(known))

    def table(self, key: str, known: tuple[str, ...]) -> Section:
        """A sub-table (missing -> empty), with unknown keys reported."""
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            self.problem(key, show(value), "a table")
            value = {}
        section = Section(self.reader, value, self.where(key))
        section.reject_unknown(known)
        return section

    def keyed(self, key: str, known: tuple[str, ...] | None) -> dict[str, Section]:
        """A table of tables named by the operator ([key.NAME]), each with unknown keys
        reported (unless `known` is None: the caller's parser checks them); the names are the
        caller's to check."""
        value = self.data.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            self.problem(key, show(value), f"tables named [{self.where(key)}.NAME]")
            return {}
        where = self.where(key)
        sections = {name: Section(self.reader, v, f"{where}.{name}") for name, v in value.items()}
        for section in sections.values():
            if known is not None:
                section.reject_unknown(known)
        return sections

    def tables(self, key: str, known: tuple[str, ...]) -> list[Section]:
        """An array of tables ([[key]]), each with unknown keys reported."""
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.problem(key, show(value), f"an array of tables ([[{key}]])")
            return []
        sections = [Section(self.reader, v, f"{self.where(key)}[{i}]") for i, v in enumerate(value)]
        for section in sections:
            section.reject_unknown(known)
        return sections

    def take(
        self,
        key: str,
        convert: Callable[[Any], T],
        default: T,
        allowed: str,
        *,
        secret: bool = False,
    ) -> T:
        """data[key] converted, or default when absent; a bad value is recorded as a problem."""
        if key not in self.data:
            return default
        try:
            return convert(self.data[key])
        except (ValueError, TypeError, OverflowError):  # OverflowError: "99999999999h"
            self.problem(key, "(redacted)" if secret else show(self.data[key]), allowed)
            return default

    def require(self, key: str, convert: Callable[[Any], T], allowed: str) -> T | None:
        """Like take() for a key that must be present."""
        if key not in self.data:
            self.problem(key, "nothing (the key is missing)", allowed)
            return None
        return self.take(key, convert, None, allowed)


def keys_of(section: type) -> tuple[str, ...]:
    """A section's keys are its dataclass's fields: a key is added where it is declared."""
    return tuple(f.name for f in fields(section))
