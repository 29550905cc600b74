"""The identity document's signatures: made by the notary's worker thread before a guest asks,
kept across a restart, never another document's (invariant 9: signing never runs on the guest
loop when the guest does not outrun it)."""

from __future__ import annotations

import asyncio
import base64
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from imdsd.daemon import Daemon, running
from imdsd.imds.tree import SignatureLeaf, identity
from imdsd.signatures.cache import CACHE_FILE, SignatureCache
from tests.fakes import FakeClock
from tests.helpers import VM_A, VM_D, http, make_config

SIGNED = "/latest/dynamic/instance-identity/"
WAIT = 60.0  # seconds: generous for a loaded machine; an idle notary answers at once


def notary(daemon: Daemon) -> SignatureCache:
    cache = daemon.api.trees.notary
    assert isinstance(cache, SignatureCache)
    return cache


async def settled(cache: SignatureCache) -> None:
    await asyncio.sleep(0)  # what Daemon.apply() hands the notary on the next turn
    assert await asyncio.to_thread(cache.wait, WAIT), "the notary did not finish"


def verify(daemon: Daemon, document: bytes, signature: bytes) -> None:
    pem = notary(daemon).signer.certificates()[""]
    public = x509.load_pem_x509_certificate(pem).public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    raw = base64.b64decode(signature.replace(b"\n", b""))
    public.verify(raw, document, padding.PKCS1v15(), hashes.SHA256())


async def read(url: str, source: str, kind: str) -> bytes:
    reply = await http(url, SIGNED + kind, source=source)
    assert reply.status == 200, reply
    return reply.body


async def test_signatures_are_made_by_the_worker_before_the_first_read(
    daemon: Daemon, url: str
) -> None:
    """Invariant 9: every instance's document is signed by the notary's thread at start; a
    guest's first read of its signatures finds them ready (nothing signed for the request)."""
    cache = notary(daemon)
    await settled(cache)
    assert cache.made_by_worker == len(daemon.inventory.instances())
    document = await read(url, "127.0.0.2", "document")
    verify(daemon, document, await read(url, "127.0.0.2", "signature"))
    assert await read(url, "127.0.0.2", "pkcs7") == await read(url, "127.0.0.2", "rsa2048")
    assert cache.made_on_request == 0


async def test_a_new_association_is_signed_when_it_is_applied(daemon: Daemon, url: str) -> None:
    """An association gives an instance its role's account, so its document changes: the
    change is signed by the worker when applied, and the guest never sees the old signature."""
    cache = notary(daemon)
    await settled(cache)
    before = cache.made_by_worker
    inventory = daemon.inventory
    daemon.apply(await inventory.commit(lambda: inventory.associate(VM_D, "profile-b")))
    await settled(cache)
    assert cache.made_by_worker == before + 1
    document = await read(url, "127.0.0.5", "document")
    assert b'"accountId" : "222222222222"' in document
    verify(daemon, document, await read(url, "127.0.0.5", "signature"))
    assert cache.made_on_request == 0


async def test_a_restart_signs_nothing_for_unchanged_documents() -> None:
    """A warm restart keeps pendingTime, so every document is unchanged: the signatures kept
    in the state directory are served and nothing is signed again, in the worker or on the
    loop; the second run serves the very bytes the first one made."""
    config = make_config()
    async with running(config, FakeClock()) as daemon:
        cache = notary(daemon)
        await settled(cache)
        assert cache.made_by_worker == len(daemon.inventory.instances())
        first = await read(daemon.urls[0], "127.0.0.2", "pkcs7")
    assert (config.host.state_directory / CACHE_FILE).exists()
    async with running(config, FakeClock()) as daemon:
        cache = notary(daemon)
        await settled(cache)
        again = await read(daemon.urls[0], "127.0.0.2", "pkcs7")
        verify(daemon, await read(daemon.urls[0], "127.0.0.2", "document"),
               await read(daemon.urls[0], "127.0.0.2", "signature"))  # fmt: skip
        assert (cache.made_by_worker, cache.made_on_request) == (0, 0)
    assert again == first


async def test_a_guest_that_outruns_the_worker_gets_signatures_made_then(daemon: Daemon) -> None:
    """A document the worker has not signed yet (here: never started) is signed for the
    request that asks, in a thread (invariant 9: not on the guest loop), not answered with
    nothing or with another document's signatures."""
    tree = daemon.api.trees
    instance = daemon.inventory.instance(VM_A)
    assert instance is not None
    idle = SignatureCache(notary(daemon).signer, None)
    built = type(tree)(idle).get(instance, None, daemon.inventory.launched_at(VM_A))
    assert isinstance(built.lookup(SIGNED + "signature"), SignatureLeaf)  # not fetched yet
    on_loop = threading.get_ident()
    signers: list[int] = []
    sign = idle.signer.signed

    def spied(document: bytes, region: str) -> bytes:
        signers.append(threading.get_ident())
        return sign(document, region)

    idle.signer.signed = spied  # type: ignore[method-assign]
    signature = await built.signature("signature")
    verify(daemon, built.document, signature)
    assert built.lookup(SIGNED + "signature") == signature  # fetched once, kept by the tree
    assert (idle.made_on_request, idle.made_by_worker) == (1, 0)
    assert signers and on_loop not in signers


class SlowToLoad(SignatureCache):
    """A notary whose kept file takes until `release` is set to read (a slow disk at start)."""

    release = threading.Event()

    def _load(self) -> None:
        self.release.wait(WAIT)
        super()._load()


async def test_a_read_while_the_kept_file_loads_never_blocks_the_loop() -> None:
    """Invariant 9: a guest asking for its signatures while the kept file is still being read
    at start waits off the loop (other guests are served meanwhile), then gets the kept
    signatures, not new ones."""
    config = make_config()
    async with running(config, FakeClock()) as daemon:
        await settled(notary(daemon))
        instance = daemon.inventory.instance(VM_A)
        assert instance is not None
        association = daemon.inventory.association(VM_A)
        document = identity(instance, association, daemon.inventory.launched_at(VM_A))
    slow = SlowToLoad(notary(daemon).signer, config.host.state_directory)
    slow.prepare([VM_A], lambda: ())
    slow.start()
    try:
        asking = asyncio.create_task(slow.signatures(VM_A, document, instance.region))
        ticks = 0
        for _ in range(20):  # the loop keeps turning while the request waits
            await asyncio.sleep(0.005)
            ticks += 1
        assert not asking.done() and ticks == 20
        slow.release.set()
        signed = await asyncio.wait_for(asking, WAIT)
    finally:
        slow.release.set()
        await asyncio.to_thread(slow.close)
    assert signed.signature and slow.made_on_request == 0


async def test_concurrent_reads_of_one_tree_sign_once(daemon: Daemon) -> None:
    """Three requests for a tree's signatures before the notary made them share one signing
    (in the notary's own request threads), and all get the same bytes."""
    instance = daemon.inventory.instance(VM_A)
    assert instance is not None
    idle = SignatureCache(notary(daemon).signer, None)
    try:
        built = type(daemon.api.trees)(idle).get(instance, None, daemon.inventory.launched_at(VM_A))
        answers = await asyncio.gather(*(built.signature("signature") for _ in range(3)))
        assert len(set(answers)) == 1 and idle.made_on_request == 1
    finally:
        idle.close()


async def test_an_instance_forgotten_while_signed_on_request_is_not_kept(daemon: Daemon) -> None:
    """An instance removed while its signatures are made for a request is not brought back:
    the request gets them, the notary keeps nothing for it (nor writes it down)."""
    instance = daemon.inventory.instance(VM_A)
    assert instance is not None
    idle = SignatureCache(notary(daemon).signer, None)
    try:
        idle.prepare([VM_A], lambda: ())
        idle.forget([VM_A])
        document = identity(instance, None, daemon.inventory.launched_at(VM_A))
        signed = await idle.signatures(VM_A, document, instance.region)
        assert signed.signature and VM_A not in idle._entries and VM_A not in idle._live
    finally:
        idle.close()
