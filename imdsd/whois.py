"""Who is who: which instance a connection belongs to, by where it arrived (its scope: the
host's own namespace, a host device, a named namespace) and its source address there.

Two instances may share an address only in different scopes; an instance with no addresses
on a device is that whole device (every source address on it, IPv6 link-local included). The
request path does one dict lookup here (two on a scoped listener). Never imports aiohttp.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from imdsd.model import Instance

WHOLE = "*"  # the claim of an instance that is its whole device


def claims(instance: Instance) -> list[tuple[str | None, str]]:
    """What identifies the instance: (scope, address) each, or (scope, "*") for a VM that is
    its whole device."""
    if not instance.addresses:
        return [(instance.scope, WHOLE)]
    return [(instance.scope, address) for address in instance.addresses]


class Directory:
    """Scope -> address -> instance, made once per inventory change (values are immutable),
    or changed claim by claim for a managed inventory's patch."""

    def __init__(self, instances: Iterable[Instance]) -> None:
        self._scopes: dict[str | None, dict[str, Instance]] = {None: {}}
        self._host = self._scopes[None]  # the common case, one lookup away
        for instance in instances:
            self.add(instance)

    def add(self, instance: Instance) -> None:
        """Claim what identifies `instance` (a later claim of the same address wins)."""
        table = self._scopes.setdefault(instance.scope, {})
        for _, address in claims(instance):
            table[address] = instance

    def discard(self, instance: Instance) -> None:
        """Release what `instance` claims (only where it is still the claimant)."""
        table = self._scopes.get(instance.scope, {})
        for _, address in claims(instance):
            if table.get(address) is instance:
                del table[address]

    def instance_at(self, address: str, scope: str | None = None) -> Instance | None:
        """The instance a socket peer address in `scope` belongs to (IPv4-mapped IPv6
        unwrapped; a link-local zone ignored); None for a stranger."""
        table = self._host if scope is None else self._scopes.get(scope)
        if table is None:
            return None
        found = table.get(address)
        if found is None and ("%" in address or address.startswith("::ffff:")):
            plain = ipaddress.ip_address(address.partition("%")[0])
            mapped = getattr(plain, "ipv4_mapped", None)
            found = table.get(str(mapped or plain))
        return found if found is not None else table.get(WHOLE)

    def owner(self, instance: Instance) -> tuple[str, Instance] | None:
        """(the address, the instance) that already claims what `instance` would: the same
        address in its scope, or any of them when either is a whole device."""
        table = self._scopes.get(instance.scope, {})
        for _, address in claims(instance):
            other = table.get(address) or table.get(WHOLE)
            if other is None and address == WHOLE and table:
                other = next(iter(table.values()))
            if other is not None and other.id != instance.id:
                return address, other
        return None

    def scopes(self) -> set[str]:
        """Every scope an instance names (the devices and namespaces to listen on)."""
        return {scope for scope, table in self._scopes.items() if scope is not None and table}
