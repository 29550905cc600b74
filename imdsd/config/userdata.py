"""[[instances]]' user data: `user_data` (text), `user_data_base64`, or, in the config file
alone, `user_data_file` (a capped, non-blocking read of a regular file: files.read_regular).
Only the config file may name a file of the host: it is root's to write; every other source of
instances (the admin API, the state file, etcd records) is refused that key."""

from __future__ import annotations

import base64
from typing import Any

from imdsd.config.reader import Section, show
from imdsd.files import read_regular
from imdsd.model import USER_DATA_MAX_BYTES

_USER_DATA = {  # key -> (converter, what is allowed); user_data_file is files.read_regular's
    "user_data": (lambda v: v.encode() if isinstance(v, str) else _no(v), "a string"),
    "user_data_base64": (lambda v: base64.b64decode(v, validate=True), "base64 of the bytes"),
}
USER_DATA_KEYS = (*_USER_DATA, "user_data_file")
USER_DATA_FILE_ALLOWED = (
    f"a regular file of at most {USER_DATA_MAX_BYTES} bytes that imdsd can read"
)
HOST_FILE_REFUSED = (
    "user_data or user_data_base64 (only the config file may name a file of the host)"
)


def user_data(t: Section, *, host_files: bool) -> bytes | None:
    """At most one of user_data (text), user_data_base64, user_data_file; EC2's 16 KB limit."""
    if "user_data_file" in t.data and not host_files:
        t.problem("user_data_file", show(t.data["user_data_file"]), HOST_FILE_REFUSED)
        return None
    given = [key for key in USER_DATA_KEYS if key in t.data]
    if len(given) > 1:
        t.problem(given[1], "a second source of user data", f"only one ({given[0]} is set)")
        return None
    if not given:
        return None
    if given[0] == "user_data_file":
        return _user_data_file(t, t.data["user_data_file"])
    convert, allowed = _USER_DATA[given[0]]
    data: bytes | None = t.take(given[0], convert, None, allowed, secret=True)
    if data is not None and len(data) > USER_DATA_MAX_BYTES:
        t.problem(
            given[0], f"{len(data)} bytes", f"at most {USER_DATA_MAX_BYTES} bytes (EC2's limit)"
        )
        return None
    return data


def _user_data_file(t: Section, path: Any) -> bytes | None:
    try:
        return read_regular(path, USER_DATA_MAX_BYTES)
    except ValueError as exc:
        t.problem("user_data_file", f"{show(path)} ({exc})", USER_DATA_FILE_ALLOWED)
        return None


def _no(value: Any) -> bytes:
    raise ValueError(value)
