"""Converters: each turns a TOML value into a typed one, or raises ValueError (the Section
that called it then reports the key path, the value and what is allowed)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
import sys
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from imdsd.config.reader import Listener, parse_duration
from imdsd.model import Role

S = TypeVar("S", bound=str)


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
    out = tuple(canonical_address(v) for v in value)
    if len(set(out)) != len(out):
        raise ValueError(value)
    return out


def canonical_address(value: str) -> str:
    """An IP address in its canonical form (ValueError if it is none). A dotted quad already
    canonical, as nearly every configured address is, is checked by the C library's round trip
    (~1 us; the ipaddress module takes ~8 us, 80 ms of a 10,000-instance start)."""
    try:
        if socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, value)) == value:
            return value
    except (OSError, ValueError):  # not a dotted quad (ValueError: an embedded NUL)
        pass
    return str(ipaddress.ip_address(value))


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


DEVICE = re.compile(r"[A-Za-z0-9_.@:-]{1,15}")  # a Linux device name (IFNAMSIZ, no / or space)
NETNS = re.compile(r"[A-Za-z0-9_.@:+-]{1,255}")  # a name under /run/netns, never a path


def device_name(value: Any) -> str:
    if not isinstance(value, str) or not DEVICE.fullmatch(value) or value in (".", ".."):
        raise ValueError(value)
    return value


def netns_name(value: Any) -> str:
    if not isinstance(value, str) or not NETNS.fullmatch(value) or value in (".", ".."):
        raise ValueError(value)
    return value


def device_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(set(value)) != len(value):
        raise ValueError(value)
    return tuple(device_name(v) for v in value)


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
