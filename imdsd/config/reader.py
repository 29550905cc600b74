"""The validation toolkit behind config.py: a table reader that collects every problem with
its key path, and converters that turn TOML values into typed ones or raise ValueError.

Knows nothing of imdsd's sections (config.py does); imports only model and errors.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from imdsd.errors import Problem
from imdsd.model import Role

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


def one_of(choices: tuple[str, ...]) -> str:
    return " or ".join(f'"{c}"' for c in choices)


def listed(names: Iterable[str], what: str) -> str:
    return f"one of the configured {what}: " + (", ".join(sorted(names)) or "(none configured)")


def choice(choices: tuple[S, ...]) -> Callable[[Any], S]:
    """One of `choices`; typed as theirs, so a tuple of a Literal's values gives that Literal:
    `kinds: tuple[BackendKind, ...] = get_args(BackendKind)` (get_args alone gives Any)."""

    def convert(value: Any) -> S:
        if value not in choices:
            raise ValueError(value)
        return choices[choices.index(value)]  # the one shared string, not the parser's copy

    return convert


def matching(pattern: re.Pattern[str]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise ValueError(value)
        return value

    return convert


def int_in(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(value)
        return value

    return convert


def nonempty(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(value)
    return value


def fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(value)
    return float(value)


def positive_duration(value: Any) -> timedelta:
    result = parse_duration(value)
    if not result:
        raise ValueError(value)
    return result


def aes_key(value: Any) -> bytes:
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError) as exc:
        raise ValueError("not base64") from exc
    if len(key) not in (16, 24, 32):
        raise ValueError("wrong length")
    return key


def role_arn(value: Any) -> Role:
    if not isinstance(value, str):
        raise TypeError(value)
    return Role.from_arn(value)


def listener_address(value: Any) -> Listener:
    if not isinstance(value, str):
        raise TypeError(value)
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(value)
    bracketed = host.startswith("[") and host.endswith("]")
    address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    if (address.version == 6) != bracketed:
        raise ValueError(value)
    return Listener(host=str(address), port=int(port))


def listener_list(value: Any) -> tuple[Listener, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(value)
    return tuple(listener_address(v) for v in value)


def address_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(value)
    out = tuple(str(ipaddress.ip_address(v)) for v in value)
    if len(set(out)) != len(out):
        raise ValueError(value)
    return out


def zone_of(region: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(re.escape(region) + r"[a-z]", value):
            raise ValueError(value)
        return sys.intern(value)  # a few zones shared by thousands of instances

    return convert


def duration_in(low: timedelta, high: timedelta) -> Callable[[Any], timedelta]:
    def convert(value: Any) -> timedelta:
        result = parse_duration(value)
        if not low <= result <= high:
            raise ValueError(value)
        return result

    return convert


def http_url(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/?#]+(?:/[^\s?#]*)?", value):
        raise ValueError(value)
    return value.rstrip("/") + "/"


def choices_list(allowed: tuple[S, ...]) -> Callable[[Any], tuple[S, ...]]:
    def convert(value: Any) -> tuple[S, ...]:
        if not isinstance(value, list) or not all(v in allowed for v in value):
            raise ValueError(value)
        return tuple(dict.fromkeys(value))

    return convert


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(value)
    return value


def file_path(value: Any) -> Path:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ValueError(value)
    return Path(value)


def optional_listener(value: Any) -> Listener | None:
    """A "host:port" listener, or None for an empty string (the feature turned off)."""
    if value == "":
        return None
    return listener_address(value)
