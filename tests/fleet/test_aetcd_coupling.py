"""aetcd's internals that imdsd's etcd client (imdsd/fleet/client.py) relies on.

aetcd opens only plaintext channels: Client.connect() swaps aetcd's module global
`aetcd.rpc.insecure_channel` for one that opens a TLS channel, for the length of aetcd's own
connect(). That works only while aetcd's connect() builds its channel by looking that global
up at call time. snapshot() also uses aetcd's private `_build_get_range_request`, `_timeout`,
`_connected` and `exceptions._handle_exception`. pyproject.toml pins aetcd to the minor series
this suite proves; these tests exist so that an aetcd release which changes any of this fails
here, loudly, in `make test`: a TLS endpoint silently spoken to in plaintext is the failure
they guard against.

No etcd is needed: the client connects to a loopback listener that records the first bytes
it is sent, which tell a TLS ClientHello from HTTP/2's plaintext preface.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import aetcd
import grpc
import pytest
from aetcd import exceptions, rpc, utils

from imdsd.config.inventory import Endpoint
from imdsd.fleet.client import (
    CALL_TIMEOUT_SECONDS,
    RESPONSE_END,
    RESPONSE_STEP,
    Client,
    PacedWatcher,
)

HANG_GUARD_SECONDS = 10.0  # a broken coupling must fail, not hang
TLS_HANDSHAKE = b"\x16\x03"  # a TLS record of type handshake (the ClientHello), version 3.x
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


async def _first_bytes(credentials: grpc.ChannelCredentials | None) -> bytes:
    """What imdsd's Client, connected with these credentials, sends first on the wire."""
    first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(len(HTTP2_PREFACE))
        if not first.done():
            first.set_result(data)
        writer.close()

    listening = await asyncio.start_server(record, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    client = Client(Endpoint("127.0.0.1", port, tls=credentials is not None),
                    credentials=credentials, user=None, password=None)  # fmt: skip
    try:
        await client.connect()
        assert rpc.insecure_channel is grpc.aio.insecure_channel, "the swap outlived connect()"
        ready = asyncio.ensure_future(client.channel.channel_ready())  # gRPC connects lazily
        try:
            return await asyncio.wait_for(first, HANG_GUARD_SECONDS)
        finally:
            ready.cancel()
    finally:
        await client.close()
        listening.close()
        await listening.wait_closed()


async def test_tls_channel_is_built_through_the_swapped_module_global() -> None:
    """With credentials, the channel aetcd builds speaks TLS: aetcd's connect() still calls
    `aetcd.rpc.insecure_channel(target, options=...)` at call time, so imdsd's swap takes."""
    sent = await _first_bytes(grpc.ssl_channel_credentials())
    assert sent.startswith(TLS_HANDSHAKE), f"a TLS endpoint was sent {sent[:24]!r}"


async def test_plain_channel_without_credentials() -> None:
    """The control: without credentials the same probe sees HTTP/2's plaintext preface, so the
    TLS check above tells the two apart."""
    assert await _first_bytes(None) == HTTP2_PREFACE


def test_snapshot_private_names() -> None:
    """What Client.snapshot() borrows from aetcd's private side."""
    client = Client(
        Endpoint("127.0.0.1", 2379, tls=False), credentials=None, user=None, password=None
    )
    assert isinstance(client._connected, asyncio.Event)  # connect() checks it before swapping
    assert client._timeout == CALL_TIMEOUT_SECONDS
    assert client.metadata is None and client.kvstub is None  # set by connect()
    key = b"/imdsd/instances/"
    end = utils.prefix_range_end(key)
    request = client._build_get_range_request(key, end)
    assert isinstance(request, rpc.RangeRequest)
    assert (request.key, request.range_end) == (key, end)
    op = rpc.RequestOp(request_range=request)
    assert list(rpc.TxnRequest(success=[op]).success) == [op]
    refused = rpc.AioRpcError(grpc.StatusCode.UNAVAILABLE, details="etcd went away")
    with pytest.raises(aetcd.exceptions.ConnectionFailedError, match="etcd went away"):
        exceptions._handle_exception(refused)


async def test_the_paced_watcher_replaces_aetcds_and_paces_a_real_response() -> None:
    """Client.connect() swaps the watcher aetcd made for a PacedWatcher (aetcd's connect()
    still sets `_watcher`, and Watcher still has `_handle_response`, `_process_callback` and
    `_callbacks`). Over a real WatchResponse of 2 x RESPONSE_STEP + 1 events, the events
    reach the watch's callback in order, at most RESPONSE_STEP per turn of the loop, then
    RESPONSE_END once."""
    client = Client(
        Endpoint("127.0.0.1", 2379, tls=False), credentials=None, user=None, password=None
    )
    await client.connect()  # gRPC connects lazily: nothing is sent
    try:
        watcher = client._watcher
        assert isinstance(watcher, PacedWatcher)
        got: list[tuple[int, object]] = []
        turn = 0

        def tick() -> None:
            nonlocal turn
            turn += 1
            if not done.is_set():
                asyncio.get_running_loop().call_soon(tick)

        async def callback(event: object) -> None:
            got.append((turn, event))

        done = asyncio.Event()
        watcher._callbacks[7] = aetcd.watcher.WatcherCallback(callback)
        count = 2 * RESPONSE_STEP + 1
        events = [rpc.Event(type=rpc.Event.PUT, kv=rpc.KeyValue(key=b"k%d" % n, value=b"v"))
                  for n in range(count)]  # fmt: skip
        response = rpc.WatchResponse(watch_id=7, events=events)
        asyncio.get_running_loop().call_soon(tick)
        await watcher._handle_response(response)
        done.set()
        del watcher._callbacks[7]  # else close() delivers its end (None) to it too
    finally:
        await client.close()
    assert [e.kv.key for _, e in got[:-1]] == [b"k%d" % n for n in range(count)]  # type: ignore[attr-defined]
    assert got[-1][1] is RESPONSE_END
    per_turn = Counter(t for t, _ in got)
    assert max(per_turn.values()) <= RESPONSE_STEP and len(per_turn) >= 3
