"""The leaves a booting guest configures itself from: network/interfaces/macs/<mac>/ (EC2's
keys, one file per key, lists one value per line), public-keys/ and block-device-mapping/.

Ids the operator left out are derived like EC2's shapes (eni-, subnet-, vpc-, sg- and 17 hex
digits), stable: the same instance, MAC and CIDRs always give the same ids.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re

from imdsd.imds import render
from imdsd.model import Instance, NetworkInterface

ROOT_DEVICE = "/dev/vda"  # a virtio disk, where neither ami nor root is configured
_KEY_NAME = re.compile(r"[A-Za-z0-9@._+-]{1,255}")


def network(instance: Instance, account: str) -> dict[str, bytes]:
    """network/interfaces/macs/<mac>/<key> for each interface."""
    leaves: dict[str, bytes] = {}
    domain = "ec2.internal" if instance.region == "us-east-1" else (
        f"{instance.region}.compute.internal"
    )  # fmt: skip
    for interface in instance.interfaces:
        base = f"meta-data/network/interfaces/macs/{interface.mac}/"
        for key, value in _interface(instance, interface, account, domain).items():
            leaves[base + key] = value.encode()
    return leaves


def _interface(
    instance: Instance, n: NetworkInterface, account: str, domain: str
) -> dict[str, str]:
    keys = {
        "device-number": str(n.device_number),
        "interface-id": n.interface_id or "eni-" + _hex(instance.id, n.mac),
        "mac": n.mac,
        "owner-id": account,
    }
    if n.addresses:
        primary = n.addresses[0]
        subnet = n.subnet or str(ipaddress.ip_network(f"{primary}/24", strict=False))
        vpc = n.vpc_cidr or subnet
        vpc_id = n.vpc_id or "vpc-" + _hex(account, vpc)
        hostname = instance.private_dns_name if primary == instance.local_ipv4 else (
            f"ip-{primary.replace('.', '-')}.{domain}"
        )  # fmt: skip
        keys |= {
            "local-hostname": hostname,
            "local-ipv4s": "\n".join(n.addresses),
            "security-group-ids": "\n".join("sg-" + _hex(vpc_id, g) for g in n.security_groups),
            "security-groups": "\n".join(n.security_groups),
            "subnet-id": n.subnet_id or "subnet-" + _hex(account, subnet),
            "subnet-ipv4-cidr-block": subnet,
            "vpc-id": vpc_id,
            "vpc-ipv4-cidr-block": vpc,
            "vpc-ipv4-cidr-blocks": vpc,
        }
    if n.ipv6:
        v6 = n.ipv6_subnet or str(ipaddress.ip_network(f"{n.ipv6[0]}/64", strict=False))
        keys |= {"ipv6s": "\n".join(n.ipv6), "subnet-ipv6-cidr-blocks": v6}
    return keys


def public_keys(instance: Instance) -> tuple[dict[str, bytes], bytes | None]:
    """(public-keys/N/openssh-key leaves, the public-keys/ listing "N=name" or None)."""
    leaves: dict[str, bytes] = {}
    names = []
    for index, key in enumerate(instance.public_keys):
        leaves[f"meta-data/public-keys/{index}/openssh-key"] = key.encode()
        names.append(f"{index}={key_name(key, index)}")
    return leaves, render.listing(names) if names else None


def key_name(key: str, index: int) -> str:
    """The name public-keys/ lists a key under: its comment where that is a plain name (as
    EC2's key pair names are), else key-N."""
    parts = key.split(maxsplit=2)
    comment = parts[2].strip() if len(parts) == 3 else ""
    return comment if _KEY_NAME.fullmatch(comment) else f"key-{index}"


def block_devices(instance: Instance) -> dict[str, bytes]:
    """block-device-mapping/<name>: ami and root always (the root disk), then what is set."""
    mapping = {"ami": ROOT_DEVICE, "root": ROOT_DEVICE} | dict(instance.block_devices)
    return {f"meta-data/block-device-mapping/{k}": v.encode() for k, v in mapping.items()}


def _hex(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:17]
