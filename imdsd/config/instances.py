"""[[instances]]: the VMs this host serves ([[instance_profiles]] and [[associations]] are in
profiles.py). Each becomes a model value with EC2-like defaults; cross-checks (duplicate ids,
an address two instances claim) are reported like every other problem.
`instance_from()` is the same parser for the admin API's `instances add`.

Only the config file may name a file of the host (`user_data_file`): it is root's to write.
Every other source of instances (the admin API, the state file, etcd records) is refused that
key, or whoever can write one could make the daemon read a key of the host and serve it to a VM.
"""

from __future__ import annotations

import base64
import functools
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any, get_args

from imdsd.config.converters import (
    address_list,
    choice,
    device_name,
    int_in,
    matching,
    netns_name,
    nonempty,
    one_of,
    zone_of,
)
from imdsd.config.devices import (
    block_devices,
    interface_table,
    network_interfaces,
    public_keys,
)
from imdsd.config.reader import Reader, Section, show
from imdsd.config.userdata import USER_DATA_KEYS, user_data
from imdsd.errors import ConfigError
from imdsd.model import (
    INSTANCE_ID,
    HttpEndpoint,
    HttpTokens,
    Instance,
    MetadataOptions,
)

REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d+")
_MAC = re.compile(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}")
_ACCOUNT = re.compile(r"\d{12}")
_AMI = re.compile(r"ami-[0-9a-f]{8,17}")
_INSTANCE_TYPE = re.compile(r"[a-z0-9-]+\.[a-z0-9]+")


def instance_from(data: dict[str, Any], *, current: Instance | None = None) -> Instance:
    """One instance from a table shaped like an [[instances]] entry (the admin API's `add`).
    With `current`, the table holds only metadata options to change on that instance."""
    reader = Reader()
    if current is not None:
        options = {**asdict(current.options), **data}
        section = Section(reader, options, "metadata_options")
        result: Instance | None = replace(current, options=options_in(section))
    else:
        result = instance_in(Section(reader, data, "instance"))  # no host files
    if reader.problems or result is None:
        raise ConfigError(reader.problems)
    return result


def instance_in(t: Section, *, host_files: bool = False) -> Instance | None:
    """One [[instances]]-shaped table (an admin call, a state file or etcd record); None after
    problems. `user_data_file` is refused unless `host_files` (the config file's tables)."""
    t.reject_unknown(INSTANCE_KEYS)
    return _instance(t, host_files=host_files)


def options_in(t: Section) -> MetadataOptions:
    """A metadata_options-shaped table (also a state file record)."""
    t.reject_unknown(OPTION_KEYS)
    return _options(t)


def instance_table(instance: Instance) -> dict[str, Any]:
    """The [[instances]] table that instance_in() reads back as the same instance."""
    table: dict[str, Any] = {"id": instance.id, "addresses": list(instance.addresses)}
    table |= {key: getattr(instance, key) for key in PLACEMENT_KEYS}
    table["metadata_options"] = asdict(instance.options)
    if instance.user_data is not None:
        table["user_data_base64"] = base64.b64encode(instance.user_data).decode()
    if instance.tags:
        table["tags"] = dict(instance.tags)
    if instance.network_interfaces is not None:
        table["network_interfaces"] = [interface_table(n) for n in instance.network_interfaces]
    if instance.public_keys:
        table["public_keys"] = list(instance.public_keys)
    if instance.block_devices:
        table["block_device_mapping"] = dict(instance.block_devices)
    return {k: v for k, v in table.items() if v is not None}


def instances(entries: list[Section]) -> tuple[Instance, ...]:
    out: dict[str, Instance] = {}
    owner: dict[tuple[str | None, str], str] = {}  # (scope, address or "*" for all) -> its id
    for t in entries:
        instance = _instance(t, host_files=True)  # the config file: root's to write
        if instance is None:
            continue
        if instance.id in out:
            t.problem("id", show(instance.id), "an id no other instance has")
            continue
        for claim in claims(instance):
            other = owner.get(claim) or owner.get((claim[0], "*"))
            if other is None and claim[1] == "*":
                other = next((i for (s, _), i in owner.items() if s == claim[0]), None)
            if other is not None:
                where = f" on {instance.scope}" if instance.scope else ""
                shown = show(claim[1]) if claim[1] != "*" else f"every address{where}"
                allowed = f"addresses no other instance claims{where} ({other} has this one)"
                t.problem("addresses", shown, allowed)
                break
            owner[claim] = instance.id
        out[instance.id] = instance
    return tuple(out.values())


def claims(instance: Instance) -> list[tuple[str | None, str]]:
    """What identifies the instance: (scope, address) each, or (its device, "*") for a VM that
    is its whole device. Two instances may share an address only in different scopes."""
    if not instance.addresses:
        return [(instance.scope, "*")]
    return [(instance.scope, address) for address in instance.addresses]


# Validators made once: a 10,000-instance file runs them 10,000 times each.
_ID_OK, _REGION_OK = matching(INSTANCE_ID), matching(REGION)
_TYPE_OK, _AMI_OK = matching(_INSTANCE_TYPE), matching(_AMI)
_MAC_OK, _ACCOUNT_OK = matching(_MAC), matching(_ACCOUNT)


@functools.cache
def _zone(region: str) -> tuple[Callable[[Any], str], str, str]:
    """The region's zone validator, its default zone (one shared string) and what is allowed."""
    return zone_of(region), sys.intern(f"{region}a"), f'a zone of the region, like "{region}a"'


def _instance(t: Section, *, host_files: bool) -> Instance | None:
    iid = t.require("id", _ID_OK, '"i-" followed by 8 or 17 lowercase hex digits')
    device = t.take("host_interface", device_name, None, _DEVICE_ALLOWED)
    netns = t.take("host_netns", netns_name, None, _NETNS_ALLOWED)
    if device is not None and netns is not None:
        t.problem("host_netns", show(netns), "one of host_interface or host_netns, not both")
    allowed = "a non-empty list of IPv4 or IPv6 addresses, each at most once"
    if device is None or "addresses" in t.data:  # a routed tap's VM may be its whole device
        addresses = t.require("addresses", address_list, allowed)
    else:
        addresses = ()
    region = t.take("region", _REGION_OK, "us-east-1", 'a region name like "eu-west-1"')
    fields: dict[str, Any] = {
        "availability_zone": t.take("availability_zone", *_zone(region)),
        "instance_type": t.take(
            "instance_type", _TYPE_OK, "t3.micro", 'an instance type like "m5.large"'
        ),
        "ami_id": t.take("ami_id", _AMI_OK, None, '"ami-" followed by 8 or 17 hex digits'),
        "hostname": t.take("hostname", nonempty, None, "a non-empty string"),
        "mac": t.take("mac", _MAC_OK, None, 'a lowercase MAC like "02:00:00:00:00:01"'),
        "account_id": t.take("account_id", _ACCOUNT_OK, None, "12 digits"),
        "host_interface": device,
        "host_netns": netns,
    }
    options = _options(t.table("metadata_options", OPTION_KEYS))
    fields["user_data"] = user_data(t, host_files=host_files)
    no_tags: tuple[tuple[str, str], ...] = ()
    fields["tags"] = t.take("tags", _tags, no_tags, TAGS_ALLOWED)
    fields["public_keys"] = public_keys(t)
    fields["block_devices"] = block_devices(t)
    fields["network_interfaces"] = nics = network_interfaces(t)
    if nics and fields["mac"] and fields["mac"] != nics[0].mac:
        t.problem("mac", show(fields["mac"]), f"device 0's MAC ({nics[0].mac}), or no mac")
    if addresses == () and not (nics and nics[0].addresses):
        t.problem("addresses", "nothing (the key is missing)", _WHOLE_DEVICE_ALLOWED)
        return None
    if iid is None or addresses is None:
        return None
    return _filled_instance(iid, addresses, region, options, fields)


_DEVICE_ALLOWED = "a host device name (1-15 of letters, digits and - _ . @ :)"
_NETNS_ALLOWED = "a network namespace name under /run/netns (no path: no /, not . or ..)"
_WHOLE_DEVICE_ALLOWED = (
    "addresses, or network_interfaces with an IPv4 address on device 0 (its local-ipv4)"
)
TAGS_ALLOWED = (
    "a table of tag keys (1-128 of letters, digits and + - = . _ : @; not . .. or _index, as EC2"
    " requires for tags in instance metadata) to string values of at most 256 characters"
)
_TAG_KEY = re.compile(r"[A-Za-z0-9+=._:@-]{1,128}")


def _tags(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ValueError(value)
    for key, text in value.items():
        if not _TAG_KEY.fullmatch(key) or key in (".", "..", "_index"):
            raise ValueError(key)
        if not isinstance(text, str) or len(text) > 256:
            raise ValueError(text)
    return tuple(sorted(value.items()))


_TOKENS: tuple[HttpTokens, ...] = get_args(HttpTokens)
_ENDPOINT: tuple[HttpEndpoint, ...] = get_args(HttpEndpoint)
_TOKENS_OK, _ENDPOINT_OK, _HOPS_OK = choice(_TOKENS), choice(_ENDPOINT), int_in(1, 64)
_TOKENS_ALLOWED, _ENDPOINT_ALLOWED = one_of(_TOKENS), one_of(_ENDPOINT)


def _options(t: Section) -> MetadataOptions:
    d = MetadataOptions()
    return _shared_options(
        http_tokens=t.take("http_tokens", _TOKENS_OK, d.http_tokens, _TOKENS_ALLOWED),
        hop_limit=t.take("hop_limit", _HOPS_OK, d.hop_limit, "an integer from 1 to 64"),
        http_endpoint=t.take("http_endpoint", _ENDPOINT_OK, d.http_endpoint, _ENDPOINT_ALLOWED),
        instance_metadata_tags=t.take(
            "instance_metadata_tags", _ENDPOINT_OK, d.instance_metadata_tags, _ENDPOINT_ALLOWED
        ),
    )


_OPTIONS: dict[MetadataOptions, MetadataOptions] = {}


def _shared_options(**fields: Any) -> MetadataOptions:
    """One MetadataOptions object per distinct setting (a host has a few for thousands)."""
    options = MetadataOptions(**fields)
    return _OPTIONS.setdefault(options, options)


OPTION_KEYS = ("http_tokens", "hop_limit", "http_endpoint", "instance_metadata_tags")
PLACEMENT_KEYS = (
    "host_interface",
    "host_netns",
    "region",
    "availability_zone",
    "instance_type",
    "ami_id",
    "hostname",
    "mac",
    "account_id",
)
DEVICE_KEYS = ("network_interfaces", "public_keys", "block_device_mapping")
INSTANCE_KEYS = ("id", "addresses", *PLACEMENT_KEYS, "metadata_options", "tags", *DEVICE_KEYS,
                 *USER_DATA_KEYS)  # fmt: skip


def _filled_instance(
    iid: str,
    addresses: tuple[str, ...],
    region: str,
    options: MetadataOptions,
    fields: dict[str, Any],
) -> Instance:
    """The instance as configured; ami_id, hostname and mac left out stay None (the model
    derives EC2-like defaults from the id and address when they are read). local-ipv4 is
    device 0's primary address where interfaces are given, else the first IPv4 address."""
    ipv4 = next((a for a in addresses if "." in a), addresses[0] if addresses else "")
    nics = fields["network_interfaces"]
    if nics and nics[0].addresses:  # the guest's own view: device 0's primary address
        ipv4 = nics[0].addresses[0]
    return Instance(
        id=iid,
        addresses=addresses,
        region=region,
        availability_zone=fields["availability_zone"],
        instance_type=fields["instance_type"],
        ami_id=fields["ami_id"],
        hostname=fields["hostname"],
        local_ipv4=ipv4,
        mac=fields["mac"],
        account_id=fields["account_id"],
        options=options,
        user_data=fields["user_data"],
        tags=fields["tags"],
        network_interfaces=fields["network_interfaces"],
        public_keys=fields["public_keys"],
        block_devices=fields["block_devices"],
        host_interface=fields["host_interface"],
        host_netns=fields["host_netns"],
    )
