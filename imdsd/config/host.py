"""[imds], [state], [admin], [metrics] and [log]: where this host listens, keeps its state and
answers its operator, and how it logs."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from imdsd.config.converters import (
    boolean,
    choice,
    device_list,
    file_path,
    listener_list,
    one_of,
    optional_listener,
)
from imdsd.config.reader import Listener, Reader, Section, show
from imdsd.model import Instance

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
PRODUCTION_LISTENER = "169.254.169.254:80"
DEFAULT_METRICS = "127.0.0.1:9169"


@dataclass(frozen=True, slots=True, kw_only=True)
class ImdsConfig:
    """The guest-facing listener(s). Bound to devices (SO_BINDTODEVICE), once per device, when
    an instance names a host_interface, guest_devices is set, or bind_to_devices says so."""

    listeners: tuple[Listener, ...]
    guest_devices: tuple[str, ...] = ()  # devices of the guests known by address alone
    bind_to_devices: bool = False  # device-bound even before an instance names a device


@dataclass(frozen=True, slots=True, kw_only=True)
class HostConfig:
    """Where this host keeps its state, its admin socket and its metrics listener."""

    state_directory: Path = Path("/var/lib/imdsd")
    admin_socket: Path = Path("/run/imdsd/admin.sock")
    metrics: Listener | None = None  # None: no metrics listener
    warm_restart: bool = True  # keep sessions, token key and incarnations sealed across restarts
    keep_tokens: bool = True  # with warm_restart: guests' IMDSv2 tokens survive a restart
    vault_key: Path | None = None  # None: vault.key in the state directory


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    """Log level and format (auto: JSON unless stdout is a terminal)."""

    level: LogLevel = "info"
    format: LogFormat = "auto"


def parse_imds(t: Section) -> ImdsConfig:
    allowed = 'a non-empty list of "host:port" strings, IPv6 hosts in brackets ("[::1]:80")'
    default = listener_list([PRODUCTION_LISTENER])
    devices = 'a list of device names ("virbr0"; 1-15 of letters, digits and - _ . @ :)'
    return ImdsConfig(
        listeners=t.take("listeners", listener_list, default, allowed),
        guest_devices=t.take("guest_devices", device_list, (), devices),
        bind_to_devices=t.take("bind_to_devices", boolean, False, "true or false"),
    )


def devices_bound(imds: ImdsConfig, instances: Iterable[Instance]) -> bool:
    """Whether the guest listeners are bound to devices (one socket per device and address):
    forced by bind_to_devices or guest_devices, or because an instance names a host_interface
    (the kernel refuses a device-less socket beside device-bound ones on one address)."""
    return (
        imds.bind_to_devices
        or bool(imds.guest_devices)
        or any(i.host_interface is not None for i in instances)
    )


def check_scopes(reader: Reader, imds: ImdsConfig, instances: tuple[Instance, ...]) -> None:
    """A configuration the kernel can serve: with device-bound listeners, the guests known by
    address alone must be reached on devices of their own (guest_devices), never on a
    device-less socket; and a device is either one instance's scope or guest_devices'."""
    if not devices_bound(imds, instances):
        return
    scoped = {i.host_interface: i.id for i in instances if i.host_interface is not None}
    plain = next((i.id for i in instances if i.scope is None), None)
    if plain is not None and not imds.guest_devices:
        reason = f"{next(iter(scoped.values()))} names a host_interface" if scoped else (
            "bind_to_devices is set"
        )  # fmt: skip
        allowed = (
            f"the devices that {plain} and the other instances without host_interface send"
            f" from: {reason}, so the listeners are bound to devices, and the kernel refuses"
            " a device-less one beside them on the same address"
        )
        reader.problem("imds.guest_devices", "nothing", allowed)
    for device in imds.guest_devices:
        if device in scoped:
            allowed = f"devices no instance names as host_interface ({scoped[device]} does)"
            reader.problem("imds.guest_devices", show(device), allowed)


def check_listeners(reader: Reader, imds: ImdsConfig, host: HostConfig) -> None:
    """No two listeners may want the same socket (the second bind would fail at start), and the
    metrics listener is never a guest listener (guests would read the host's metrics)."""
    seen: list[Listener] = []
    for listener in imds.listeners:
        other = next((s for s in seen if _overlap(s, listener)), None)
        if other is not None:
            reader.problem("imds.listeners", show(str(listener)),
                           f"listeners that do not overlap ({other} is listed too)")  # fmt: skip
        seen.append(listener)
    if host.metrics is not None:
        other = next((s for s in seen if _overlap(s, host.metrics)), None)
        if other is not None:
            allowed = f"an address no guest listener uses (imds.listeners has {other})"
            reader.problem("metrics.listen", show(str(host.metrics)), allowed)


def _overlap(a: Listener, b: Listener) -> bool:
    """Same port (not 0) and the same address, or a wildcard of the same family."""
    if a.port != b.port or a.port == 0:
        return False
    x, y = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    return x.version == y.version and (x == y or x.is_unspecified or y.is_unspecified)


def parse_host(doc: Section) -> HostConfig:
    d = HostConfig()
    path = "an absolute path, or one relative to the directory imdsd runs in"
    metrics = doc.table("metrics", ("listen",)).take(
        "listen",
        optional_listener,
        optional_listener(DEFAULT_METRICS),
        '"host:port" (loopback advised), or "" for none',
    )
    state = doc.table("state", ("directory", "warm_restart", "keep_tokens", "key_file"))
    return HostConfig(
        state_directory=state.take("directory", file_path, d.state_directory, path),
        warm_restart=state.take("warm_restart", boolean, d.warm_restart, "true or false"),
        keep_tokens=state.take("keep_tokens", boolean, d.keep_tokens, "true or false"),
        vault_key=state.take("key_file", file_path, None, path),
        admin_socket=doc.table("admin", ("socket",)).take(
            "socket", file_path, d.admin_socket, path
        ),
        metrics=metrics,
    )


def parse_log(t: Section) -> LogConfig:
    levels: tuple[LogLevel, ...] = get_args(LogLevel)
    formats: tuple[LogFormat, ...] = get_args(LogFormat)
    return LogConfig(
        level=t.take("level", choice(levels), "info", one_of(levels)),
        format=t.take("format", choice(formats), "auto", one_of(formats)),
    )
