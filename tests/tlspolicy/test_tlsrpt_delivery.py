"""RFC 8460 5.3: our TLS reports are delivered despite TLS failures, and their sessions are not reported.

``broken.rpt.test`` publishes an MTA-STS ``enforce`` policy and a TLSRPT
record, but its MX (127.0.0.3) presents a certificate for ``wrong.example``:
its mail waits (4.7.5), while the TLS report to ``tlsrpt@broken.rpt.test``,
queued by the report service, goes out over the unverified TLS, on a
connection that is never reused for the protected mail.  Knot DNS, a local
HTTPS policy host and aiosmtpd MX hosts on loopback.
"""
from __future__ import annotations

import email
import email.policy
import io
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.python.threadpool import ThreadPool

from exmta.config.schema import SendConnectorConfig
from exmta.model import DeliveryRequest, Envelope, MailParams, Outcome, Recipient
from exmta.routing.dns import DNSResolver
from exmta.send.smtp import SMTPSendConnector
from exmta.smtp.client import ClientTimeouts
from exmta.testing.memstore import MemoryStore
from exmta.tlspolicy.config import TLSPolicyConfig
from exmta.tlspolicy.engine import TLSPolicyEngine
from exmta.tlspolicy.report import REPORT_ENVID, TLSReportService, TLSResultLog, is_tls_report
from support import knot
from support.policyhost import PolicyHost, policy
from support.procs import free_port
from support.sinks import SmtpSink
from support.tlscerts import TestPKI

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not knot.available(), reason="knotd is not installed")]

ZONE = """broken MX 10 mx.broken
mx.broken A 127.0.0.3
mta-sts.broken A 127.0.0.1
_mta-sts.broken TXT "v=STSv1; id=1"
_smtp._tls.broken TXT "v=TLSRPTv1; rua=mailto:tlsrpt@broken.rpt.test"
"""


def test_only_our_own_dsn_kind_envelopes_count_as_tls_reports() -> None:
    ours = Envelope("", [Recipient("a@b.test")], params=MailParams(envid=REPORT_ENVID + "x"), kind="dsn")
    assert is_tls_report(ours)
    received = Envelope("x@evil.test", [Recipient("a@b.test")], params=MailParams(envid=REPORT_ENVID + "x"))
    assert not is_tls_report(received)  # a client's ENVID is no way around a policy
    assert not is_tls_report(Envelope("", [Recipient("a@b.test")], kind="dsn"))  # a bounce


def request(env: Envelope, body: bytes) -> DeliveryRequest:
    return DeliveryRequest(env.queue_id or "Q", env, tuple(env.recipients), lambda: io.BytesIO(body))


@pytest_twisted.inlineCallbacks
def test_a_tls_report_reaches_a_domain_whose_tls_is_broken(tmp_path: Path) -> None:
    from twisted.internet import reactor

    pki = TestPKI(tmp_path / "pki")
    wrong = pki.server("wrong.example", file="mx-wrong")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(wrong.cert), str(wrong.key))
    port = free_port("127.0.0.3")
    sink = SmtpSink(host="127.0.0.3", port=port, tls_context=ctx)
    dns_server = knot.KnotServer(tmp_path, {"rpt.test": ZONE})
    host = PolicyHost(pki, ["mta-sts.broken.rpt.test"])
    host.policies["mta-sts.broken.rpt.test"] = (200, "text/plain", policy("enforce", "mx.broken.rpt.test"))
    pool = ThreadPool(minthreads=0, maxthreads=4, name="tlsrpt-delivery")
    results_path = tmp_path / "tlsrpt" / "results.jsonl"
    started: list[Any] = []
    try:
        dns_server.start()
        started.append(dns_server)
        sink.start()
        started.append(sink)
        pool.start()
        host.listen(reactor)
        resolver = DNSResolver(reactor, pool, dns_server.nameservers, timeout=3.0)
        results = TLSResultLog(str(results_path), reactor)
        cfg = TLSPolicyConfig(ca_file=str(pki.ca_file), cache_dir=str(tmp_path / "cache"),
                              https_port=host.port_number, tls_rpt=True)
        engine = TLSPolicyEngine(cfg, reactor, reactor, pool, resolver, reporter=results)
        conn = SMTPSendConnector(SendConnectorConfig(name="internet", port=port, tls="opportunistic",
                                                     connect_timeout=5.0),
                                 reactor, reactor, resolver, "exmta.test", timeouts=ClientTimeouts.uniform(5.0))
        conn.tls_policy = engine
        body = b"From: a@exmta.test\r\nTo: b@broken.rpt.test\r\nSubject: x\r\n\r\nhello\r\n"
        mail = Envelope("a@exmta.test", [Recipient("b@broken.rpt.test")], params=MailParams(), queue_id="M1")
        [first] = yield conn.deliver(request(mail, body))
        assert results_path.read_text()  # the certificate check records at once

        # the daily run queues the report (the failure above) to tlsrpt@broken.rpt.test
        from types import SimpleNamespace

        from exmta.dns import auth_dns_from_config

        dns = auth_dns_from_config({"dns_servers": [f"127.0.0.1:{dns_server.port}"]},
                                   SimpleNamespace(reactor=None, threadpool=None))
        store = MemoryStore(reactor)
        service = TLSReportService(
            results, store, reactor, reactor, lambda fn, *a: defer.maybeDeferred(fn, *a),
            lambda name: [t.decode() for t in dns.txt(name) or ()], "exmta.test", "postmaster@exmta.test",
            "postmaster@exmta.test")
        assert (yield service.send_reports()) == 1
        [qid] = store.queue_ids()
        report_env = store.envelope(qid)
        assert is_tls_report(report_env)
        [sent] = yield conn.deliver(request(report_env, store.content(qid)))
        # the report's connection is not pooled for the protected mail: that still waits
        [again] = yield conn.deliver(request(mail, body))
        yield conn.close()
        rows = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    finally:
        yield host.stop()
        for thing in reversed(started):
            thing.stop()
        if pool.started:
            pool.stop()

    assert first.outcome is Outcome.DEFERRED and first.reply.status == "4.7.5", first
    assert again.outcome is Outcome.DEFERRED and again.reply.status == "4.7.5", again
    assert sent.outcome is Outcome.DELIVERED and sent.tls, sent  # unverified TLS: the policy did not apply
    [msg] = [m for m in sink.messages if m.rcpt_tos == ["tlsrpt@broken.rpt.test"]]
    parsed = email.message_from_bytes(msg.content, policy=email.policy.default)
    assert parsed["TLS-Report-Domain"] == "broken.rpt.test"
    assert not [m for m in sink.messages if "b@broken.rpt.test" in m.rcpt_tos]
    # the report's own session is in no result; the second refusal is
    assert [(r["policy_type"], r["result"]) for r in rows] == [("sts", "certificate-host-mismatch")]
