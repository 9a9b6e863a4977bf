"""DANE (RFC 7672) end to end: Knot signs dane.test, unbound validates it, aiosmtpd MX hosts answer.

127.0.0.2 presents a certificate for every ``mx.<d>.dane.test`` (the "good"
key), 127.0.0.3 presents ``mx.ta.dane.test`` with its CA in the chain (for
DANE-TA), 127.0.0.4 offers no STARTTLS.  The TLSA record of
``_25._tcp.mx.bogus`` is changed after signing: unbound answers SERVFAIL.
"""
from __future__ import annotations

import hashlib
import io
import ssl
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.python.threadpool import ThreadPool

from exmta.config.schema import SendConnectorConfig
from exmta.model import DeliveryRequest, Envelope, MailParams, Outcome, Recipient
from exmta.routing.dns import DNSResolver
from exmta.send.smtp import SMTPSendConnector
from exmta.smtp.client import ClientTimeouts
from exmta.tlspolicy.config import TLSPolicyConfig
from exmta.tlspolicy.engine import TLSPolicyEngine
from support import dnssec
from support.policyhost import PolicyHost, policy
from support.procs import free_port
from support.sinks import SmtpSink
from support.tlscerts import TestPKI

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not dnssec.available(), reason="knotd, keymgr or unbound not installed")]

DOMAINS = ["good", "wrong", "roll", "full", "exact", "ta", "unusable", "unusablenotls", "bogus", "both", "plain"]


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class World:
    def __init__(self, tmp: Path) -> None:
        self.pki = TestPKI(tmp / "pki")
        good = self.pki.server(*[f"mx.{d}.dane.test" for d in DOMAINS], file="mx-good")
        other = self.pki.server("wrong.example", file="mx-other")
        ta = self.pki.server("mx.ta.dane.test", file="mx-ta")
        ta_chain = tmp / "pki" / "mx-ta-chain.pem"
        ta_chain.write_bytes(ta.cert.read_bytes() + self.pki.ca_file.read_bytes())
        g, o = _cert(good.cert), _cert(other.cert)
        h_good, h_other = hashlib.sha256(spki(g)).hexdigest(), hashlib.sha256(spki(o)).hexdigest()
        ca = x509.load_pem_x509_certificate(self.pki.ca_file.read_bytes())
        mx = {"ta": 3, "unusablenotls": 4, "plain": 4}
        tlsa = {
            "good": [f"3 1 1 {h_good}"], "wrong": [f"3 1 1 {h_other}"],
            "roll": [f"3 1 1 {h_other}", f"3 1 1 {h_good}"],
            "full": [f"3 0 2 {hashlib.sha512(g.public_bytes(serialization.Encoding.DER)).hexdigest()}"],
            "exact": [f"3 1 0 {spki(g).hex()}"],
            "ta": [f"2 0 1 {hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()}"],
            "unusable": [f"1 1 1 {h_good}"], "unusablenotls": [f"0 0 1 {h_good}"],
            "bogus": [f"3 1 1 {h_good}"], "both": [f"3 1 1 {h_good}"], "plain": [],
        }
        lines = []
        for d in DOMAINS:
            lines += [f"{d} MX 10 mx.{d}", f"mx.{d} A 127.0.0.{mx.get(d, 2)}"]
            lines += [f"_25._tcp.mx.{d} TLSA {t}" for t in tlsa[d]]
        lines += ['_mta-sts.both TXT "v=STSv1; id=1"', "mta-sts.both A 127.0.0.1"]
        self.zone = dnssec.SignedZone(tmp, "dane.test", "\n".join(lines) + "\n",
                                      tamper={"_25._tcp.mx.bogus": f"3 1 1 {'00' * 32}"}).start()
        self.unbound = dnssec.Unbound(tmp, self.zone).start()
        self.port = free_port("127.0.0.2")
        self.sinks = {
            2: SmtpSink(host="127.0.0.2", port=self.port, tls_context=_server(good.cert, good.key)).start(),
            3: SmtpSink(host="127.0.0.3", port=self.port, tls_context=_server(ta_chain, ta.key)).start(),
            4: SmtpSink(host="127.0.0.4", port=self.port).start(),
        }
        self.host = PolicyHost(self.pki, ["mta-sts.both.dane.test"])
        self.host.policies["mta-sts.both.dane.test"] = (200, "text/plain", policy("enforce", "nothing.example"))
        self.pool = ThreadPool(minthreads=0, maxthreads=4, name="dane-test")
        self.pool.start()
        self.tmp = tmp
        self.reports: list[tuple[str, str, str | None]] = []

    def record(self, domain: str, kind: str, strings: Any, host: str, failure: str | None, text: str,
               **kw: Any) -> None:
        self.reports.append((domain, kind, failure))

    def stop(self) -> None:
        for s in self.sinks.values():
            s.stop()
        self.unbound.stop()
        self.zone.stop()
        self.pool.stop()


def _server(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("dane"))
    try:
        yield w
    finally:
        w.stop()


def request(domain: str) -> DeliveryRequest:
    body = f"From: a@exmta.test\r\nTo: b@{domain}\r\nSubject: dane\r\n\r\nhello\r\n".encode()
    rcpt = Recipient(f"b@{domain}")
    env = Envelope("a@exmta.test", [rcpt], params=MailParams(), queue_id="Q", size=len(body))
    return DeliveryRequest("Q", env, (rcpt,), lambda: io.BytesIO(body))


def count(world: World, sink: int, domain: str) -> int:
    return sum(1 for m in world.sinks[sink].messages if any(r.endswith("@" + domain) for r in m.rcpt_tos))


@pytest_twisted.inlineCallbacks
def test_dane_matrix(world: World) -> None:
    from twisted.internet import reactor

    world.host.listen(reactor)
    try:
        resolver = DNSResolver(reactor, world.pool, world.unbound.nameservers, timeout=3.0)
        cfg = TLSPolicyConfig(dane=True, dane_resolvers=(f"127.0.0.1:{world.unbound.port}",),
                              ca_file=str(world.pki.ca_file), cache_dir=str(world.tmp / "cache"),
                              https_port=world.host.port_number, txt_recheck=0.0)
        engine = TLSPolicyEngine(cfg, reactor, reactor, world.pool, resolver, reporter=world)
        sc = SendConnectorConfig(name="internet", port=world.port, tls="opportunistic", connect_timeout=5.0)
        conn = SMTPSendConnector(sc, reactor, reactor, resolver, "exmta.test", timeouts=ClientTimeouts.uniform(5.0))
        conn.tls_policy = engine
        results = {}
        for d in DOMAINS:
            [results[d]] = yield conn.deliver(request(f"{d}.dane.test"))
        yield conn.close()
    finally:
        yield world.host.stop()
    delivered = {d for d, r in results.items() if r.outcome is Outcome.DELIVERED}
    assert delivered == {"good", "roll", "full", "exact", "ta", "unusable", "both", "plain"}, results
    for d in ("good", "roll", "full", "exact", "ta", "unusable", "both"):
        assert results[d].tls, d  # TLS whenever TLSA records exist
    assert results["plain"].tls is None  # no TLSA, no STARTTLS offered: the connector's opportunistic TLS
    for d in ("wrong", "unusablenotls", "bogus"):
        r = results[d]
        assert r.outcome is Outcome.DEFERRED and r.reply.code == 451 and r.reply.status == "4.7.5", r
    assert count(world, 2, "wrong.dane.test") == 0 and count(world, 4, "unusablenotls.dane.test") == 0
    assert count(world, 2, "bogus.dane.test") == 0
    assert "no TLSA record matches" in results["wrong"].reply.text
    assert "STARTTLS" in results["unusablenotls"].reply.text
    assert "DNSSEC" in results["bogus"].reply.text
    # DANE took precedence over the MTA-STS policy whose mx patterns would have refused the host
    assert ("both.dane.test", "tlsa", None) in world.reports
    assert ("mta-sts.both.dane.test", "/.well-known/mta-sts.txt") in world.host.requests
    assert engine.sts is not None and engine.sts._memory["both.dane.test"].mode == "enforce"
    assert ("wrong.dane.test", "tlsa", "validation-failure") in world.reports
    assert ("bogus.dane.test", "tlsa", "dnssec-invalid") in world.reports
    # records that are all unusable: delivered over unauthenticated TLS, reported (RFC 8460 4.3.2.1)
    assert ("unusable.dane.test", "tlsa", "tlsa-invalid") in world.reports


@pytest_twisted.inlineCallbacks
def test_validating_resolver_statuses(world: World) -> None:
    from exmta.tlspolicy.dane import ValidatingResolver

    v = ValidatingResolver(None, None, world.unbound.nameservers)
    good = yield v.query("_25._tcp.mx.good.dane.test", "TLSA")
    bogus = yield v.query("_25._tcp.mx.bogus.dane.test", "TLSA")
    none = yield v.query("_25._tcp.mx.plain.dane.test", "TLSA")
    assert good.status == "secure" and len(good.tlsa) == 1 and good.tlsa[0].usable
    assert bogus.status == "bogus"
    assert none.status == "secure" and not none.records  # an authenticated denial: no DANE for this host
    # Knot itself is authoritative, not validating: its answers never carry AD
    plain = ValidatingResolver(None, None, [(world.zone.host, world.zone.port)])
    assert (yield plain.query("_25._tcp.mx.good.dane.test", "TLSA")).status == "insecure"
