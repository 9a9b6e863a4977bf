"""TLS-RPT "no-policy-found" end to end: Knot DNS zones, aiosmtpd MX hosts, the daily report by mail.

Domains under ``nopol.test`` publish a TLSRPT record but neither MTA-STS nor
TLSA; their MX hosts share one port on different loopback addresses:
127.0.0.2 STARTTLS with a good certificate, 127.0.0.3 a certificate for
``wrong.example``, 127.0.0.4 no STARTTLS, 127.0.0.5 STARTTLS that demands a
client certificate (the handshake fails), 127.0.0.6 an expired certificate.
Every session is recorded and reported with policy type ``no-policy-found``;
``silent.nopol.test`` (no TLSRPT record) is not recorded at all, and a TLSRPT
lookup that never answers does not hold up delivery.
"""
from __future__ import annotations

import email
import email.policy
import gzip
import importlib.util
import io
import json
import ssl
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.python.threadpool import ThreadPool

from exmta.config.schema import SendConnectorConfig
from exmta.model import DeliveryRequest, Envelope, MailParams, Outcome, Recipient
from exmta.routing.dns import DNSResolver
from exmta.send.smtp import SMTPSendConnector
from exmta.smtp.client import ClientTimeouts
from exmta.testing.memstore import MemoryStore
from exmta.tlspolicy.config import TLSPolicyConfig
from exmta.tlspolicy.engine import TLSPolicyEngine
from exmta.tlspolicy.report import TLSReportService, TLSResultLog
from support import knot
from support.procs import free_port
from support.sinks import SmtpSink
from support.tlscerts import TestPKI

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not knot.available(), reason="knotd is not installed")]


def _schema() -> dict[str, Any]:
    """The RFC 8460 report schema written out in test_tlsrpt.py (one copy for both tests)."""
    spec = importlib.util.spec_from_file_location("_tlsrpt_schema", Path(__file__).with_name("test_tlsrpt.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.SCHEMA)


MX_OF = {"ok": 2, "plain": 4, "needcert": 5, "wrongname": 3, "old": 6, "silent": 2, "slow": 2}
REPORTING = ["ok", "plain", "needcert", "wrongname", "old", "slow"]


def zone() -> str:
    lines = []
    for d, mx in MX_OF.items():
        lines += [f"{d} MX 10 mx.{d}", f"mx.{d} A 127.0.0.{mx}"]
        if d in REPORTING:
            lines.append(f'_smtp._tls.{d} TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{d}.nopol.test"')
    return "\n".join(lines) + "\n"


def server_context(files: Any, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(files.cert), str(files.key))
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(client_ca))
    return ctx


def request(domain: str) -> DeliveryRequest:
    body = f"From: a@exmta.test\r\nTo: b@{domain}\r\nSubject: rpt {domain}\r\n\r\nhello\r\n".encode()
    rcpt = Recipient(f"b@{domain}")
    env = Envelope("a@exmta.test", [rcpt], params=MailParams(), queue_id="Q", size=len(body))
    return DeliveryRequest("Q", env, (rcpt,), lambda: io.BytesIO(body))


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@defer.inlineCallbacks
def wait_for_lines(path: Path, n: int) -> Any:
    """Results are written once the TLSRPT answer is in (a pool thread): poll, bounded."""
    from twisted.internet import reactor

    deadline = time.monotonic() + 30
    while lines(path) < n:
        assert time.monotonic() < deadline, f"{lines(path)} of {n} results written: {path.read_text().splitlines()}"
        yield task.deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.inlineCallbacks
def test_sessions_to_domains_with_only_tlsrpt_are_reported_as_no_policy_found(tmp_path: Path) -> None:
    from twisted.internet import reactor
    from twisted.internet import ssl as tssl

    from exmta.dns import auth_dns_from_config

    pki = TestPKI(tmp_path / "pki")
    good = pki.server(*[f"mx.{d}.nopol.test" for d in MX_OF], file="mx-good")
    port = free_port("127.0.0.2")
    sinks = {
        2: SmtpSink(host="127.0.0.2", port=port, tls_context=server_context(good)),
        3: SmtpSink(host="127.0.0.3", port=port,
                    tls_context=server_context(pki.server("wrong.example", file="mx-wrong"))),
        4: SmtpSink(host="127.0.0.4", port=port),
        5: SmtpSink(host="127.0.0.5", port=port, tls_context=server_context(good, client_ca=pki.ca_file)),
        6: SmtpSink(host="127.0.0.6", port=port,
                    tls_context=server_context(pki.server("mx.old.nopol.test", file="mx-old", expired=True))),
    }
    dns_server = knot.KnotServer(tmp_path, {"nopol.test": zone()})
    pool = ThreadPool(minthreads=0, maxthreads=4, name="nopolicy-test")
    results_path = tmp_path / "tlsrpt" / "results.jsonl"
    started: list[Any] = []
    try:
        dns_server.start()
        started.append(dns_server)
        for sink in sinks.values():
            sink.start()
            started.append(sink)
        pool.start()
        resolver = DNSResolver(reactor, pool, dns_server.nameservers, timeout=3.0)
        results = TLSResultLog(str(results_path), reactor)
        # MTA-STS on (the domains publish none), DANE off, TLS-RPT on
        cfg = TLSPolicyConfig(ca_file=str(pki.ca_file), cache_dir=str(tmp_path / "cache"), tls_rpt=True)
        engine = TLSPolicyEngine(cfg, reactor, reactor, pool, resolver, reporter=results)
        timeouts = ClientTimeouts.uniform(5.0)
        opp = SMTPSendConnector(SendConnectorConfig(name="opp", port=port, tls="opportunistic", connect_timeout=5.0),
                                reactor, reactor, resolver, "exmta.test", timeouts=timeouts)
        ca = tssl.Certificate.loadPEM(pki.ca_file.read_bytes())
        strict = SMTPSendConnector(
            SendConnectorConfig(name="strict", port=port, tls="mandatory", connect_timeout=5.0),
            reactor, reactor, resolver, "exmta.test", timeouts=timeouts,
            tls_context=lambda host: tssl.optionsForClientTLS(host, trustRoot=ca))
        opp.tls_policy = strict.tls_policy = engine
        got: dict[str, list[Any]] = {}

        @defer.inlineCallbacks
        def send(conn: SMTPSendConnector, d: str, close: bool = True) -> Any:
            [r] = yield conn.deliver(request(f"{d}.nopol.test"))
            got.setdefault(d, []).append(r)
            if close:
                yield conn.close()  # a new session for the next message

        yield send(opp, "ok", close=False)
        yield send(opp, "ok")  # the same session again: counted once
        for d in ("ok", "plain", "needcert", "wrongname", "silent"):
            yield send(opp, d)
        for d in ("wrongname", "old", "ok"):
            yield send(strict, d)
        yield wait_for_lines(results_path, 8)

        # a TLSRPT lookup that never answers: delivery goes on; the result is written once it does
        hanging: defer.Deferred[list[str] | None] = defer.Deferred()
        real_lookup = engine.reporting_domains.lookup
        engine.reporting_domains.lookup = lambda name: hanging
        yield send(opp, "slow")
        engine.reporting_domains.lookup = real_lookup
        assert lines(results_path) == 8
        hanging.callback(["v=TLSRPTv1; rua=mailto:tlsrpt@slow.nopol.test"])
        yield wait_for_lines(results_path, 9)

        # the daily report, by mail through the queue
        dns = auth_dns_from_config({"dns_servers": [f"127.0.0.1:{dns_server.port}"]},
                                   SimpleNamespace(reactor=None, threadpool=None))
        store = MemoryStore(reactor)
        service = TLSReportService(
            results, store, reactor, reactor, lambda fn, *a: defer.maybeDeferred(fn, *a),
            lambda name: [t.decode() for t in dns.txt(name) or ()], "exmta.test", "postmaster@exmta.test",
            "postmaster@exmta.test")
        sent = yield service.send_reports()
    finally:
        for thing in reversed(started):
            thing.stop()
        if pool.started:
            pool.stop()

    outcome = {d: [r.outcome for r in rs] for d, rs in got.items()}
    assert outcome == {
        "ok": [Outcome.DELIVERED] * 4, "plain": [Outcome.DELIVERED], "silent": [Outcome.DELIVERED],
        "needcert": [Outcome.DELIVERED],  # the handshake failed: opportunistic TLS falls back to clear text
        "wrongname": [Outcome.DELIVERED, Outcome.DEFERRED],  # unverified under opportunistic, refused when mandatory
        "old": [Outcome.DEFERRED], "slow": [Outcome.DELIVERED]}, got
    assert got["needcert"][0].tls is None and got["ok"][0].tls
    assert sum(1 for m in sinks[2].messages if m.rcpt_tos == ["b@ok.nopol.test"]) == 4

    assert sent == len(REPORTING)
    reports = {}
    for qid in store.queue_ids():
        msg = email.message_from_bytes(store.content(qid), policy=email.policy.default)
        [part] = [p for p in msg.iter_attachments() if p.get_content_type() == "application/tlsrpt+gzip"]
        report = json.loads(gzip.decompress(part.get_content()))
        jsonschema.validate(report, _schema(), format_checker=jsonschema.FormatChecker())
        reports[msg["TLS-Report-Domain"]] = report
        assert [r.address for r in store.envelope(qid).recipients] == [f"tlsrpt@{msg['TLS-Report-Domain']}"]
    assert sorted(reports) == sorted(f"{d}.nopol.test" for d in REPORTING)  # nothing for silent.nopol.test

    def summary(d: str) -> tuple[int, int, list[tuple[str, str, int]]]:
        [policy] = reports[f"{d}.nopol.test"]["policies"]
        assert policy["policy"] == {"policy-type": "no-policy-found", "policy-domain": f"{d}.nopol.test"}
        s = policy["summary"]
        details = [(f["result-type"], f["receiving-mx-hostname"], f["failed-session-count"])
                   for f in policy.get("failure-details", ())]
        for f in policy.get("failure-details", ()):
            assert f["sending-mta-ip"] == "127.0.0.1", f
            assert f["receiving-ip"] == f"127.0.0.{MX_OF[d]}" and f["failure-reason-code"], f
        return s["total-successful-session-count"], s["total-failure-session-count"], details

    assert summary("ok") == (3, 0, [])
    assert summary("plain") == (0, 1, [("starttls-not-supported", "mx.plain.nopol.test", 1)])
    assert summary("needcert") == (0, 1, [("validation-failure", "mx.needcert.nopol.test", 1)])
    assert summary("wrongname") == (1, 1, [("certificate-host-mismatch", "mx.wrongname.nopol.test", 1)])
    assert summary("old") == (0, 1, [("certificate-expired", "mx.old.nopol.test", 1)])
    assert summary("slow") == (1, 0, [])
