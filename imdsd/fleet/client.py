"""An etcd client for one endpoint of the fleet's list: aetcd, over TLS when the URLs say so.

aetcd (asyncio, gRPC) opens only plaintext channels; `connect()` is overridden to open a TLS
channel (and present a client certificate) with grpc's own credentials. Everything else is
aetcd's, but for `snapshot()` (several prefixes read at one revision) and its watcher, paced
(PacedWatcher). Keepalive pings make a vanished etcd a broken stream within seconds, not hours.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aetcd
import grpc
from aetcd import exceptions, rpc, utils
from aetcd import watcher as aetcd_watcher

from imdsd.config.inventory import Endpoint, EtcdConfig, read_client_files

# etcd's default --grpc-keepalive-min-time is 5 s: ping no more often than that.
CHANNEL_OPTIONS = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.initial_reconnect_backoff_ms": 200,
}
CALL_TIMEOUT_SECONDS = 5
RESPONSE_STEP = 50  # watch events aetcd hands over per turn of the loop (~0.3 ms)


class ResponseEnd:
    """What follows the last event of each watch response (one etcd revision at least): the
    events of one response are applied as one change."""


RESPONSE_END = ResponseEnd()


class PacedWatcher(aetcd_watcher.Watcher):  # type: ignore[misc]
    """aetcd's watcher, handing a response's events over RESPONSE_STEP a turn of the loop (a
    transaction of 1,000 changes was one 6 ms turn inside aetcd), each response's followed by
    RESPONSE_END, since the consumer can no longer tell a response's end by the queue running
    dry."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handed = 0

    async def _process_callback(self, callback: Any, event_or_error: Any) -> None:
        await super()._process_callback(callback, event_or_error)
        self._handed += 1
        if self._handed % RESPONSE_STEP == 0:
            await asyncio.sleep(0)

    async def _handle_response(self, response: Any) -> None:
        await super()._handle_response(response)
        callback = self._callbacks.get(response.watch_id)
        if callback is not None and response.events and response.compact_revision == 0:
            await self._process_callback(callback, RESPONSE_END)


class Client(aetcd.Client):  # type: ignore[misc]
    """aetcd's client, with TLS when `credentials` is given."""

    _watcher: Any  # aetcd's, made by its connect()

    def __init__(self, endpoint: Endpoint, *, credentials: grpc.ChannelCredentials | None,
                 user: str | None, password: str | None) -> None:  # fmt: skip
        super().__init__(endpoint.host, endpoint.port, username=user, password=password,
                         timeout=CALL_TIMEOUT_SECONDS, options=dict(CHANNEL_OPTIONS))  # fmt: skip
        self._credentials = credentials

    async def connect(self) -> None:
        if self._credentials is None or self._connected.is_set():
            await super().connect()
            self._pace_watcher()
            return
        secure = self._credentials
        plain = rpc.insecure_channel
        try:  # aetcd builds the channel with rpc.insecure_channel: hand it the TLS one instead
            rpc.insecure_channel = lambda target, options=(): rpc.secure_channel(
                target, secure, options=options
            )
            await super().connect()
        finally:
            rpc.insecure_channel = plain
        self._pace_watcher()

    def _pace_watcher(self) -> None:
        """The watcher aetcd's connect() made, made again as a PacedWatcher (before any watch
        can use it: a watch connects first)."""
        if self._watcher is not None and not isinstance(self._watcher, PacedWatcher):
            self._watcher = PacedWatcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                         metadata=self.metadata)  # fmt: skip

    async def snapshot(self, *prefixes: str) -> tuple[int, list[Any]]:
        """Every key-value under each prefix, all as of one revision: (that revision, the kvs).
        One Txn of Range requests, so no write lands between the reads (aetcd's get_prefix
        cannot read at a given revision, and its transaction() drops the header revision)."""
        await self.connect()
        keys = [p.encode() for p in prefixes]
        ranges = [self._build_get_range_request(k, utils.prefix_range_end(k)) for k in keys]
        request = rpc.TxnRequest(success=[rpc.RequestOp(request_range=r) for r in ranges])
        try:
            response = await self.kvstub.Txn(request, timeout=self._timeout, metadata=self.metadata)
        except rpc.AioRpcError as exc:
            exceptions._handle_exception(exc)  # aetcd's own mapping to its errors; always raises
        kvs = [kv for r in response.responses for kv in r.response_range.kvs]
        return int(response.header.revision), kvs


def open_client(config: EtcdConfig, attempt: int = 0) -> Client:
    """A client for the endpoint this attempt should try (the list in turn). Reads the TLS and
    password files now: UnreadableFiles (naming each key) when one cannot be read."""
    endpoint = config.endpoints[attempt % len(config.endpoints)]
    files = read_client_files(config)
    credentials = None
    if endpoint.tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=files.ca, private_key=files.key, certificate_chain=files.cert
        )
    return Client(endpoint, credentials=credentials, user=config.user, password=files.password)
