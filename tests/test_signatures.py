"""Identity document signing keys: per-region pairs, the default pair, and bad files; the
notary that signs off the loop and keeps its signatures in the state directory."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from imdsd.config import parse
from imdsd.errors import ConfigError
from imdsd.signatures import open_signer, wrapped
from imdsd.signatures.cache import CACHE_FILE, COMPACT_SLACK, SignatureCache
from tests.helpers import config_text


def pair(directory: Path, name: str) -> tuple[Path, Path, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))  # fmt: skip
    key_file, cert_file = directory / f"{name}.key", directory / f"{name}.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file, key


def identity(key: Path, cert: Path, region: tuple[Path, Path] | None = None) -> str:
    text = f'[identity]\nkey_file = "{key}"\ncertificate_file = "{cert}"\n'
    if region:
        text += f'[identity.regions.eu-west-1]\nkey_file = "{region[0]}"\ncertificate_file = "{region[1]}"\n'
    return text


def test_each_region_signs_with_its_own_key(tmp_path: Path) -> None:
    """[identity.regions.<region>] signs that region's documents; the default pair the rest;
    certificates() lists both for publishing."""
    dk, dc, default_key = pair(tmp_path, "default")
    rk, rc, region_key = pair(tmp_path, "eu")
    signer = open_signer(parse(config_text(identity(dk, dc, (rk, rc)))).signing, tmp_path / "state")
    document = b'{\n  "region" : "eu-west-1"\n}'
    for region, key in (("eu-west-1", region_key), ("us-east-1", default_key)):
        raw = base64.b64decode(signer.sign(document, region).signature.replace(b"\n", b""))
        key.public_key().verify(raw, document, padding.PKCS1v15(), hashes.SHA256())
    assert sorted(signer.certificates()) == ["", "eu-west-1"]
    assert not (tmp_path / "state").exists()  # configured keys: nothing generated


def test_a_certificate_of_another_key_is_refused(tmp_path: Path) -> None:
    """A key and a certificate that do not belong together are a config problem (exit 3)."""
    key, _, _ = pair(tmp_path, "one")
    _, cert, _ = pair(tmp_path, "two")
    with pytest.raises(
        ConfigError,
        match=r"identity\.key_file: got .*one\.key; allowed: an RSA key and the certificate of that key",
    ):
        open_signer(parse(config_text(identity(key, cert))).signing, tmp_path)


def test_a_region_needs_both_files() -> None:
    """A region table with a key and no certificate is a problem naming the region's path."""
    with pytest.raises(
        ConfigError,
        match=r"identity\.regions\.eu-west-1\.certificate_file: got nothing; allowed: both, or neither",
    ):
        parse(config_text('[identity.regions.eu-west-1]\nkey_file = "/k.pem"\n'))


def test_wrapping_is_76_characters() -> None:
    """EC2's base64 layout: 76-character lines, the last one shorter, no final newline."""
    text = wrapped(bytes(200))
    assert [len(line) for line in text.split(b"\n")] == [76, 76, 76, 40]  # 268 characters
    assert base64.b64decode(text.replace(b"\n", b"")) == bytes(200)


def test_a_first_start_generates_the_key_without_waiting(tmp_path: Path) -> None:
    """Without [identity] files, a first start returns at once with the key being generated
    in a thread; the first signature waits for it, verifies against the kept certificate,
    and a second start loads the same key (0600) instead of making another."""
    state = tmp_path / "state"
    config = parse(config_text()).signing
    signer = open_signer(config, state)
    document = b'{"instanceId" : "i-0123456789abcdef0"}'
    signed = signer.sign(document, "us-east-1")  # waits for the thread, if still running
    certificate = x509.load_pem_x509_certificate(signer.certificates()[""])
    public = certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    raw = base64.b64decode(signed.signature.replace(b"\n", b""))
    public.verify(raw, document, padding.PKCS1v15(), hashes.SHA256())
    again = open_signer(config, state)
    assert again.certificates()[""] == signer.certificates()[""]
    assert min(p.stat().st_mode & 0o777 for p in state.iterdir()) == 0o600


def documents(*items: tuple[str, bytes]) -> Callable[[], Iterable[tuple[str, bytes, str]]]:
    return lambda: [(instance_id, document, "us-east-1") for instance_id, document in items]


def kept(state: Path, *items: tuple[str, bytes]) -> SignatureCache:
    """A notary over `state` that has read its file and signed `items`."""
    signer = open_signer(parse(config_text()).signing, state)
    cache = SignatureCache(signer, state)
    cache.prepare([i for i, _ in items], documents(*items))
    cache.start()
    assert cache.wait(60)
    return cache


def test_the_notary_keeps_what_it_signed_across_a_restart(tmp_path: Path) -> None:
    """Signed once, kept: a notary on the same state signs a changed document again and
    nothing for unchanged ones (a record is good for as long as its document and key are)."""
    one, two = (b'{"instanceId" : "i-1"}', b'{"instanceId" : "i-2"}')
    first = kept(tmp_path, ("i-1", one), ("i-2", two))
    first.close()
    assert first.made_by_worker == 2
    changed = b'{"instanceId" : "i-1", "pendingTime" : "later"}'
    second = kept(tmp_path, ("i-1", changed))
    assert second.made_by_worker == 1  # the changed document; i-2 is gone
    assert asyncio.run(second.signatures("i-1", changed, "us-east-1")) != asyncio.run(
        first.signatures("i-1", one, "us-east-1")
    )
    second.close()
    third = kept(tmp_path, ("i-1", changed), ("i-2", two))
    assert third.made_by_worker == 0  # i-2's record is still in the file, and still its own
    third.close()


def test_a_torn_file_costs_only_its_tail(tmp_path: Path) -> None:
    """A crash in the middle of an append leaves a record that fails its CRC: what comes
    before it is kept, the rest is signed again, and the file is rewritten whole."""
    items = [(f"i-{n}", f'{{"instanceId" : "i-{n}"}}'.encode()) for n in range(3)]
    kept(tmp_path, *items).close()
    path = tmp_path / CACHE_FILE
    path.write_bytes(path.read_bytes()[:-10])
    again = kept(tmp_path, *items)
    assert again.made_by_worker == 1
    again.close()
    assert kept(tmp_path, *items).made_by_worker == 0
    path.write_bytes(b"not a signature file")
    assert kept(tmp_path, *items).made_by_worker == 3


def test_a_forgotten_instance_is_not_kept(tmp_path: Path) -> None:
    """An instance removed before the worker got to it is not signed, nor written down."""
    signer = open_signer(parse(config_text()).signing, tmp_path)
    cache = SignatureCache(signer, tmp_path)
    cache.prepare(["i-1"], documents(("i-1", b"{}")))
    cache.forget(["i-1"])
    cache.start()
    assert cache.wait(60)
    cache.close()
    assert cache.made_by_worker == 0
    assert kept(tmp_path, ("i-1", b"{}")).made_by_worker == 1


def test_stale_records_are_compacted(tmp_path: Path) -> None:
    """Documents that keep changing append records; past twice the current ones (and some
    slack), the file is rewritten with only the current ones."""
    signer = open_signer(parse(config_text()).signing, tmp_path)
    cache = SignatureCache(signer, tmp_path)
    cache.prepare([], documents())
    cache.start()
    for n in range(COMPACT_SLACK + 10):
        cache.prepare(["i-1"], documents(("i-1", f'{{"n" : {n}}}'.encode())))
        assert cache.wait(60)
    cache.close()
    path = tmp_path / CACHE_FILE
    assert path.stat().st_size < (COMPACT_SLACK + 2) * 2000
    again = kept(tmp_path, ("i-1", f'{{"n" : {COMPACT_SLACK + 9}}}'.encode()))
    assert again.made_by_worker == 0


def test_held_bulk_signing_waits_for_resume_but_a_hurried_document_does_not(
    tmp_path: Path,
) -> None:
    """A cold start holds the notary's bulk work until priming is done (resume), so the two
    do not split the CPU; a document a guest hurries meanwhile is signed at once."""
    signer = open_signer(parse(config_text()).signing, tmp_path)
    cache = SignatureCache(signer, tmp_path)
    items = [("i-1", b'{"instanceId" : "i-1"}'), ("i-2", b'{"instanceId" : "i-2"}')]
    cache.prepare(["i-1", "i-2"], documents(*items))
    cache.start(held=True)
    try:
        cache.hurry("i-2", items[1][1], "us-east-1")
        deadline = time.monotonic() + 60
        while cache.made_by_worker < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # time enough for the bulk job, were it not held
        assert cache.made_by_worker == 1
        cache.resume()
        assert cache.wait(60)
        assert cache.made_by_worker == 2
    finally:
        cache.close()
