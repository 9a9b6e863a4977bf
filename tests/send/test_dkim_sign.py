"""Outbound DKIM signing: key generation, the signer on a real SMTP send connector, verification via Knot."""
from __future__ import annotations

import io
import re
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from exmta.config.schema import SendConnectorConfig, SmartHost
from exmta.dns import AuthDNS
from exmta.filters.dkim_verify import verify_all
from exmta.model import DeliveryRequest, Envelope, Outcome, Recipient
from exmta.routing.dns import DNSResolver
from exmta.send.dkim_sign import (
    DKIMKey, DKIMSigner, author_domain, generate_key, load_key, record_text, sign_message, txt_record,
)
from exmta.send.smtp import SMTPSendConnector
from exmta.smtp.client import ClientTimeouts
from support import authzones, knot
from support.authzones import message

pytestmark = pytest.mark.integration


def verify(knot_server: knot.KnotServer, msg: bytes) -> list[Any]:
    return verify_all(AuthDNS(DNSResolver(None, None, knot_server.nameservers, timeout=3.0)), msg)


def test_generate_rsa_and_ed25519_records() -> None:
    priv, pub = generate_key("rsa-sha256", 2048)
    assert priv.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    line = txt_record("s2026", "example.test", "rsa-sha256", pub)
    assert line.startswith('s2026._domainkey.example.test. IN TXT ( "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A')
    strings = re.findall(r'"([^"]*)"', line)
    assert all(len(s) <= 250 for s in strings) and "".join(strings) == record_text("rsa-sha256", pub)
    priv, pub = generate_key("ed25519-sha256")
    assert len(pub) == 44  # 32 octets in base64
    assert txt_record("ed", "example.test", "ed25519-sha256", pub) == \
        f'ed._domainkey.example.test. IN TXT ( "v=DKIM1; k=ed25519; p={pub.decode()}" )'
    with pytest.raises(ValueError):
        generate_key("rsa-sha1")
    with pytest.raises(ValueError):
        generate_key("rsa-sha256", 512)


def test_signature_headers_from_oversigned_relaxed(keys: authzones.Keys) -> None:
    signed = sign_message(message(), [keys.rsa, keys.ed])
    sigs = [s for s in re.split(rb"\r\n(?=\S)", signed.split(b"\r\n\r\n")[0]) if s.startswith(b"DKIM-Signature")]
    assert len(sigs) == 2
    for sig in sigs:
        unfolded = re.sub(rb"\s+", b"", sig)
        assert b"c=relaxed/relaxed" in unfolded
        h = re.search(rb"h=([^;]+)", unfolded).group(1).lower().split(b":")
        assert h.count(b"from") == 2 and b"subject" in h and b"date" in h and b"message-id" in h
    assert b"a=rsa-sha256" in re.sub(rb"\s+", b"", sigs[0]) and b"a=ed25519-sha256" in re.sub(rb"\s+", b"", sigs[1])


def test_author_domain() -> None:
    assert author_domain(message(from_="A <a@Sub.Example.Test>"), "x@other.test") == "sub.example.test"
    assert author_domain(b"Subject: none\r\n\r\nb\r\n", "bounce@other.test") == "other.test"
    assert author_domain(b"From: a@x.test\r\nFrom: b@y.test\r\n\r\nb\r\n", "s@z.test") == "z.test"


def test_load_key_refuses_garbage(tmp_path: Any) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"not a key")
    with pytest.raises(ValueError, match="not a usable rsa-sha256 private key"):
        load_key("example.test", "s", "rsa-sha256", str(bad))
    with pytest.raises(ValueError, match="algorithm"):
        load_key("example.test", "s", "dsa", str(bad))


def request(content: bytes, sender: str = "alice@example.test") -> DeliveryRequest:
    rcpt = Recipient("bob@dest.test")
    return DeliveryRequest("Q1", Envelope(sender, [rcpt], size=len(content)), (rcpt,), lambda: io.BytesIO(content))


def test_signer_leaves_other_domains_alone(keys: authzones.Keys) -> None:
    signer = DKIMSigner([keys.rsa])
    out = signer.prepare(request(message(from_="a@unsigned.test"), "a@unsigned.test"))
    results: list[Any] = []
    Deferred.fromCoroutine(out).addBoth(results.append)
    assert results[0].open_content().read() == message(from_="a@unsigned.test")


@pytest_twisted.inlineCallbacks
def test_send_connector_signs_last_and_the_receiver_verifies(smtp_sink: Any, knot_server: knot.KnotServer,
                                                             keys: authzones.Keys) -> Any:
    from twisted.internet import reactor
    from twisted.python.threadpool import ThreadPool

    pool = ThreadPool(minthreads=0, maxthreads=2, name="dkim-sign-test")
    pool.start()
    try:
        cfg = SendConnectorConfig(name="out", smarthosts=(SmartHost("127.0.0.1", smtp_sink.port),), tls="none",
                                  dkim_sign=True)
        conn = SMTPSendConnector(cfg, reactor, reactor, None, "mx.example.test",
                                 timeouts=ClientTimeouts.uniform(10.0))
        conn.signer = DKIMSigner([keys.rsa, keys.ed], reactor, pool)
        original = message(body="Grüße, 8-bit\r\n".encode())
        results = yield conn.deliver(request(original))
        yield conn.close()
    finally:
        pool.stop()
    assert [r.outcome for r in results] == [Outcome.DELIVERED]
    [received] = smtp_sink.messages
    data = received.content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;") and data.endswith(original)
    assert [(r.result, r.selector) for r in verify(knot_server, data)] == [("pass", "sel1"), ("pass", "ed")]


def test_key_from_keygen_signs_and_verifies(knot_server: knot.KnotServer, keys: authzones.Keys, tmp_path: Any) -> None:
    path = tmp_path / "sel1.pem"
    path.write_bytes(keys.rsa.private)
    key = load_key("Example.Test.", "sel1", "rsa-sha256", str(path))
    assert key == DKIMKey("example.test", "sel1", "rsa-sha256", keys.rsa.private)
    assert verify(knot_server, sign_message(message(), [key]))[0].result == "pass"
