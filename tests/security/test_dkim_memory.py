"""Issue 11 item 5: DKIM and ARC verification stream the body instead of holding the message.

Before: each filter read the whole message (up to 64 MiB) into memory on the
reactor thread, and dkimpy made canonicalized copies of it; 40 concurrent
30 MiB messages peaked at 2.2 GB. Now the body is hashed in chunks on the
filter pool, once per message for DKIM and ARC together.
"""
from __future__ import annotations

import hashlib
import io
import random
import tracemalloc
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.canonicalization import Relaxed, Simple
from twisted.internet.defer import Deferred

from exmta.filters.authres import AuthState
from exmta.filters.base import MessageView
from exmta.filters.bodyhash import body_digest
from exmta.filters.dkim_verify import body_hashes, dkim_results

BODY_MIB = 12


def test_streamed_canonicalization_matches_dkimpy(monkeypatch: pytest.MonkeyPatch) -> None:
    import exmta.filters.bodyhash as bodyhash

    monkeypatch.setattr(bodyhash, "CHUNK", 7)  # lines cut across many chunk boundaries
    rng = random.Random(11)
    pieces = [b"a", b" ", b"\t", b"\r\n", b"\r\n", b"\r", b"b  c", b"\xff"]
    for _ in range(2000):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        for name, canon in ((b"simple", Simple), (b"relaxed", Relaxed)):
            for limit in (None, 0, 3, 12):
                want = canon.canonicalize_body(body)
                want = want if limit is None else want[:limit]
                assert body_digest(io.BytesIO(body), name, b"rsa-sha256", limit) == hashlib.sha256(want).digest()


class InlineDNS:
    """AuthDNS's interface for dkimpy, with the key of the test in memory; checks run inline."""

    timeout = 5.0

    def __init__(self, records: dict[bytes, bytes]) -> None:
        self.records = records

    def dkim_txt(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        key = name if isinstance(name, bytes) else name.encode()
        return self.records.get(key.rstrip(b".") + b".")

    def run(self, fn, *args):  # noqa: ANN001
        from twisted.internet.defer import maybeDeferred

        return maybeDeferred(fn, *args)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, InlineDNS]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    import base64

    dns = InlineDNS({b"sel._domainkey.example.test.": b"v=DKIM1; k=rsa; p=" + base64.b64encode(pub)})
    line = b"0123456789 abcdefghij  klmnopqrstuvwxyz\t\r\n"
    body = line * (BODY_MIB * 1024 * 1024 // len(line))
    head = b"From: a@example.test\r\nTo: b@example.net\r\nSubject: big\r\n"
    sigs = b""
    for canon in (b"relaxed/relaxed", b"simple/simple"):
        sigs += dkim.sign(head + b"\r\n" + body, b"sel", b"example.test", pem, canonicalize=tuple(canon.split(b"/")),
                          include_headers=[b"from", b"to", b"subject"])
    path = tmp_path_factory.mktemp("dkim") / "message.eml"
    path.write_bytes(sigs + head + b"\r\n" + body)
    return path, dns


def _view(path: Path) -> MessageView:
    return MessageView(lambda: open(path, "rb"), size=path.stat().st_size)


def test_a_30_mib_message_verifies_in_little_memory(signed: tuple[Path, InlineDNS]) -> None:
    path, dns = signed
    state = AuthState()
    view = _view(path)
    tracemalloc.start()
    try:
        results: list = []
        Deferred.fromCoroutine(dkim_results(dns, state, view)).addCallback(results.append)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    [found] = results
    assert [r.result for r in found] == ["pass", "pass"], found
    assert peak < 4 * 1024 * 1024, f"peak {peak} octets for a {BODY_MIB} MiB message"
    assert body_hashes(state, view).passes == 2  # one read of the body per canonicalization


def test_a_changed_body_fails(signed: tuple[Path, InlineDNS], tmp_path: Path) -> None:
    path, dns = signed
    data = path.read_bytes()
    changed = tmp_path / "changed.eml"
    changed.write_bytes(data[:-10] + b"X" + data[-9:])
    results: list = []
    Deferred.fromCoroutine(dkim_results(dns, AuthState(), _view(changed))).addCallback(results.append)
    assert [(r.result, r.reason) for r in results[0]] == [("fail", "body hash mismatch")] * 2
