"""[[instances]]' guest-facing devices and keys: `network_interfaces`, `block_device_mapping`
and `public_keys`, what cloud-init sets a booting guest up from (its network config by MAC,
its instance-store disks, the default user's SSH keys).

Every problem names its key path (`instances[0].network_interfaces[1].subnet`,
`instances[0].public_keys[2]`). The key parser (cryptography) is imported only when an
instance has keys: reading a config without them stays cheap for the CLI.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from imdsd.config.converters import int_in, matching
from imdsd.config.reader import Section, keys_of, show
from imdsd.model import NetworkInterface

INTERFACE_KEYS = keys_of(NetworkInterface)
PUBLIC_KEYS_ALLOWED = (
    'a list of OpenSSH public keys, one line each ("ssh-ed25519 AAAA... name"; ssh-rsa, '
    "ecdsa-sha2-nistp256/384/521 and ssh-ed25519 are read)"
)
BLOCK_DEVICES_ALLOWED = (
    'a table of EC2 device names ("ami", "root", "ephemeral0".."ephemeral23", "swap", '
    '"ebs1"..) to device paths ("/dev/vdb") or names ("sdb")'
)
_MAC = re.compile(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}")
_MAC_OK = matching(_MAC)
_ENI_OK = matching(re.compile(r"eni-[0-9a-f]{8,17}"))
_SUBNET_ID_OK = matching(re.compile(r"subnet-[0-9a-f]{8,17}"))
_VPC_ID_OK = matching(re.compile(r"vpc-[0-9a-f]{8,17}"))
_GROUP = re.compile(r"[\w .:/()#,@\[\]+=&;{}!$*-]{1,255}", re.ASCII)
_DEVICE_NAME = re.compile(r"ami|root|swap|ephemeral(?:[0-9]|1[0-9]|2[0-3])|ebs[0-9]{1,3}")
_DEVICE_PATH = re.compile(r"(?:/dev/)?[a-z][a-z0-9]{1,15}")


def network_interfaces(t: Section) -> tuple[NetworkInterface, ...] | None:
    """`network_interfaces`, or None where the instance gives none (one is derived from its
    `mac` and `addresses`)."""
    if "network_interfaces" not in t.data:
        return None
    out: list[NetworkInterface] = []
    for index, e in enumerate(t.tables("network_interfaces", INTERFACE_KEYS)):
        interface = _interface(e, index)
        if interface is None:
            continue
        if any(o.mac == interface.mac for o in out):
            e.problem("mac", show(interface.mac), "a MAC no other interface of the instance has")
        elif any(o.device_number == interface.device_number for o in out):
            e.problem("device_number", str(interface.device_number), "a number no other has")
        else:
            out.append(interface)
    if not out and "network_interfaces" in t.data:
        t.problem("network_interfaces", "no interface", "at least one interface (device 0)")
        return None
    if out and min(o.device_number for o in out) != 0:
        t.problem("network_interfaces", "no device_number 0", "device 0, the primary interface")
    return tuple(sorted(out, key=lambda o: o.device_number))


def _interface(e: Section, index: int) -> NetworkInterface | None:
    mac = e.require("mac", _MAC_OK, 'a lowercase MAC like "02:00:00:00:00:01"')
    number = e.take("device_number", int_in(0, 31), index, "an integer from 0 to 31")
    ipv4 = e.take("addresses", _addresses(4), (), "a list of IPv4 addresses, each at most once")
    ipv6 = e.take("ipv6", _addresses(6), (), "a list of IPv6 addresses, each at most once")
    subnet = e.take("subnet", _network(4), None, 'an IPv4 CIDR like "10.0.0.0/24"')
    ipv6_subnet = e.take("ipv6_subnet", _network(6), None, 'an IPv6 CIDR like "fd00::/64"')
    vpc = e.take("vpc_cidr", _network(4), None, 'an IPv4 CIDR like "10.0.0.0/16"')
    default_groups: tuple[str, ...] = ("default",)
    groups = e.take("security_groups", _groups, default_groups, "a non-empty list of group names")
    ids = {
        "interface_id": e.take("interface_id", _ENI_OK, None, '"eni-" and 8 or 17 hex digits'),
        "subnet_id": e.take("subnet_id", _SUBNET_ID_OK, None, '"subnet-" and 8 or 17 hex'),
        "vpc_id": e.take("vpc_id", _VPC_ID_OK, None, '"vpc-" and 8 or 17 hex digits'),
    }
    if mac is None:
        return None
    _inside(e, "addresses", ipv4, subnet)
    _inside(e, "ipv6", ipv6, ipv6_subnet)
    if (
        subnet is not None
        and vpc is not None
        and not ipaddress.ip_network(subnet).subnet_of(
            ipaddress.ip_network(vpc)  # type: ignore[arg-type]
        )
    ):
        e.problem("vpc_cidr", show(vpc), f"a CIDR that holds the subnet {subnet}")
    return NetworkInterface(mac=mac, device_number=number, addresses=ipv4, subnet=subnet,
                            ipv6=ipv6, ipv6_subnet=ipv6_subnet, vpc_cidr=vpc,
                            security_groups=groups, **ids)  # fmt: skip


def _inside(e: Section, key: str, addresses: tuple[str, ...], cidr: str | None) -> None:
    if cidr is None:
        return
    network = ipaddress.ip_network(cidr)
    for address in addresses:
        if ipaddress.ip_address(address) not in network:
            e.problem(key, show(address), f"addresses inside the subnet {cidr}")


def _addresses(version: int) -> Any:
    def convert(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(value)
        out = tuple(str(ipaddress.ip_address(v)) for v in value)
        if len(set(out)) != len(out) or any(
            ipaddress.ip_address(a).version != version for a in out
        ):
            raise ValueError(value)
        return out

    return convert


def _network(version: int) -> Any:
    def convert(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(value)
        network = ipaddress.ip_network(value, strict=True)
        if network.version != version:
            raise ValueError(value)
        return str(network)

    return convert


def _groups(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(value)
    if not all(isinstance(v, str) and _GROUP.fullmatch(v) for v in value):
        raise ValueError(value)
    return tuple(value)


def block_devices(t: Section) -> tuple[tuple[str, str], ...]:
    """`block_device_mapping`: EC2 device name -> the guest's device (ami and root default to
    /dev/vda, a virtio disk; cloud-init mounts the ephemeralN it finds here)."""
    value = t.data.get("block_device_mapping", {})
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and _DEVICE_NAME.fullmatch(k) and isinstance(v, str)
        and _DEVICE_PATH.fullmatch(v)
        for k, v in value.items()
    ):  # fmt: skip
        t.problem("block_device_mapping", show(value), BLOCK_DEVICES_ALLOWED)
        return ()
    return tuple(sorted(value.items()))


def public_keys(t: Section) -> tuple[str, ...]:
    """`public_keys`: each must parse as an OpenSSH public key (one line, a known type)."""
    value = t.data.get("public_keys", [])
    if not isinstance(value, list):
        t.problem("public_keys", show(value), PUBLIC_KEYS_ALLOWED)
        return ()
    if not value:
        return ()
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    keys: list[str] = []
    for index, key in enumerate(value):
        where = f"{t.where('public_keys')}[{index}]"
        try:
            if not isinstance(key, str) or "\n" in key.strip() or len(key) > 16384:
                raise ValueError(key)
            load_ssh_public_key(key.strip().encode())
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            shown = "(not a string)" if not isinstance(key, str) else _shown_key(key, exc)
            t.reader.problem(where, shown, PUBLIC_KEYS_ALLOWED)
            continue
        keys.append(key.strip())
    return tuple(keys)


def _shown_key(key: str, exc: Exception) -> str:
    """A refused key, shortened: its type and the start of its data (a public key, not a
    secret, but a line must stay a line)."""
    head = " ".join(key.split()[:2])
    return show(head[:40] + ("..." if len(head) > 40 else "")) + f" ({exc.__class__.__name__})"


def interface_table(interface: NetworkInterface) -> dict[str, Any]:
    """A network interface as its table (defaults left out, so they stay derived)."""
    default = NetworkInterface(mac=interface.mac)
    table = {k: getattr(interface, k) for k in INTERFACE_KEYS}
    table = {k: v for k, v in table.items()
             if v != getattr(default, k) or k in ("mac", "device_number")}  # fmt: skip
    return {k: list(v) if isinstance(v, tuple) else v for k, v in table.items()}
