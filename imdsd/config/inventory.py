"""`[inventory]`: where this host learns its instances, profiles and associations.

`source = "file"` (the default): the config file's tables plus the admin socket's changes.
`source = "etcd"`: the fleet's records in etcd (`[inventory.etcd]`), watched. Only values and
their validation live here; nothing imports the etcd client.
"""

from __future__ import annotations

import errno
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlsplit

from imdsd.config.converters import choice, file_path, matching, one_of
from imdsd.config.reader import Section, show
from imdsd.errors import Problem, UnreadableFiles

InventorySource = Literal["file", "etcd"]
INVENTORY_KEYS = ("source", "etcd")
ETCD_KEYS = ("endpoints", "prefix", "host", "ca_file", "cert_file", "key_file", "user",
             "password_file")  # fmt: skip
CLIENT_FILES = {  # the files the etcd client reads at each connect, and what each must hold
    "ca_file": "a file imdsd can read: the PEM CA of etcd's server certificate",
    "cert_file": "a file imdsd can read: the PEM client certificate",
    "key_file": "a file imdsd can read: the PEM private key of the client certificate",
    "password_file": "a file imdsd can read: the etcd user's password, UTF-8",
}
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
PREFIX = re.compile(r"(?:/[A-Za-z0-9._-]+)+")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One etcd client URL: http:// or https://, host and port."""

    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


DEFAULT_ENDPOINTS = (Endpoint("127.0.0.1", 2379, tls=False),)


@dataclass(frozen=True, slots=True, kw_only=True)
class EtcdConfig:
    """How to reach the fleet's etcd, and which part of it is this host's."""

    endpoints: tuple[Endpoint, ...] = DEFAULT_ENDPOINTS
    prefix: str = "/imdsd"
    host: str = ""  # "" until parsed: the machine's hostname
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    user: str | None = None
    password_file: Path | None = None  # read at connect time; never kept in the config


@dataclass(frozen=True, slots=True, kw_only=True)
class InventoryConfig:
    source: InventorySource = "file"
    etcd: EtcdConfig = field(default_factory=EtcdConfig)


def endpoint(value: object) -> Endpoint:
    """An etcd client URL; ValueError otherwise."""
    if not isinstance(value, str):
        raise TypeError(value)
    url = urlsplit(value)
    if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
        raise ValueError(value)
    return Endpoint(url.hostname, url.port or 2379, tls=url.scheme == "https")


def endpoints(value: object) -> tuple[Endpoint, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(value)
    return tuple(endpoint(v) for v in value)


def parse_inventory(t: Section) -> InventoryConfig:
    """The [inventory] table (unknown keys already reported by the caller)."""
    sources: tuple[InventorySource, ...] = get_args(InventorySource)
    source: InventorySource = t.take("source", choice(sources), "file", one_of(sources))
    e = t.table("etcd", ETCD_KEYS)
    path = "a path to a readable file"
    etcd = EtcdConfig(
        endpoints=e.take(
            "endpoints",
            endpoints,
            DEFAULT_ENDPOINTS,
            'a non-empty list of URLs like "https://10.0.0.5:2379"',
        ),
        prefix=e.take(
            "prefix",
            matching(PREFIX),
            "/imdsd",
            'a key prefix like "/imdsd": "/"-separated names, no trailing "/"',
        ),
        host=e.take(
            "host",
            matching(HOST_NAME),
            socket.gethostname(),
            "a host name: 1-253 of A-Z a-z 0-9 . _ -",
        ),
        ca_file=e.take("ca_file", file_path, None, path),
        cert_file=e.take("cert_file", file_path, None, path),
        key_file=e.take("key_file", file_path, None, path),
        user=e.take("user", matching(HOST_NAME), None, "an etcd user name"),
        password_file=e.take("password_file", file_path, None, path),
    )
    if (etcd.cert_file is None) != (etcd.key_file is None):
        e.problem("key_file" if etcd.key_file is None else "cert_file", "nothing",
                  "cert_file and key_file together (a client certificate and its key)")  # fmt: skip
    if (etcd.user is None) != (etcd.password_file is None):
        e.problem("password_file" if etcd.password_file is None else "user", "nothing",
                  "user and password_file together")  # fmt: skip
    tls = {x.tls for x in etcd.endpoints}
    if len(tls) > 1:
        e.problem("endpoints", show([str(x) for x in etcd.endpoints]),
                  "all https:// or all http://")  # fmt: skip
    elif etcd.ca_file and tls == {False}:
        e.problem("endpoints", show([str(x) for x in etcd.endpoints]),
                  "https:// URLs when ca_file is set")  # fmt: skip
    return InventoryConfig(source=source, etcd=etcd)


@dataclass(frozen=True, slots=True)
class ClientFiles:
    """What the etcd client reads from files, read at once; secrets stay out of any repr."""

    ca: bytes | None = field(default=None, repr=False)
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)


def read_client_files(config: EtcdConfig) -> ClientFiles:
    """The TLS files (for https:// endpoints) and the password file, read now (check-config, and
    the follower at each connect); UnreadableFiles naming every one that cannot be read."""
    tls = any(e.tls for e in config.endpoints)
    read: dict[str, bytes] = {}
    failures: list[tuple[str, Path, OSError | ValueError]] = []
    for key in CLIENT_FILES:
        path: Path | None = getattr(config, key)
        if path is None or (key != "password_file" and not tls):
            continue
        try:
            read[key] = data = path.read_bytes()
            if key == "password_file":
                data.decode("utf-8")
        except (OSError, ValueError) as exc:
            failures.append((key, path, exc))
    if failures:
        raise _unreadable(failures)
    password = read.get("password_file")
    return ClientFiles(
        ca=read.get("ca_file"),
        cert=read.get("cert_file"),
        key=read.get("key_file"),
        password=password.decode().strip() if password is not None else None,
    )


def _unreadable(failures: list[tuple[str, Path, OSError | ValueError]]) -> UnreadableFiles:
    problems = [Problem(f"inventory.etcd.{key}", f"{path} ({_reason(exc, full=True)})",
                        CLIENT_FILES[key]) for key, path, exc in failures]  # fmt: skip
    return UnreadableFiles(
        problems, tuple((f"inventory.etcd.{k}", _reason(e)) for k, _, e in failures)
    )


def _reason(exc: OSError | ValueError, *, full: bool = False) -> str:
    """ENOENT (or "ENOENT: No such file or directory"); "not UTF-8" for a password that is not."""
    if not isinstance(exc, OSError):
        return "not UTF-8"
    name = errno.errorcode.get(exc.errno or 0, exc.__class__.__name__)
    return f"{name}: {exc.strerror}" if full and exc.strerror else name
