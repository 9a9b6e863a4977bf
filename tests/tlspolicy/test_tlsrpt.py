"""TLS-RPT (RFC 8460): the report against the RFC's schema; mailto through the queue and an HTTPS POST."""
from __future__ import annotations

import email
import email.policy
import gzip
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.web import resource, server

from exmta.model import Envelope
from exmta.testing.memstore import MemoryStore
from exmta.tlspolicy.report import TLSReportService, TLSResultLog, build_report, parse_rua
from support import knot
from support.tlscerts import TestPKI

# RFC 8460 section 4.4 (JSON report schema) and 4.3 (result types), written out as a JSON Schema
RESULT_TYPES = ["starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
                "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid", "dane-required",
                "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"]
SCHEMA = {
    "type": "object",
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string"},
        "date-range": {"type": "object", "required": ["start-datetime", "end-datetime"],
                       "properties": {"start-datetime": {"type": "string", "format": "date-time"},
                                      "end-datetime": {"type": "string", "format": "date-time"}}},
        "contact-info": {"type": "string"},
        "report-id": {"type": "string"},
        "policies": {"type": "array", "items": {
            "type": "object", "required": ["policy", "summary"],
            "properties": {
                "policy": {"type": "object", "required": ["policy-type", "policy-domain"], "properties": {
                    "policy-type": {"enum": ["tlsa", "sts", "no-policy-found"]},
                    "policy-string": {"type": "array", "items": {"type": "string"}},
                    "policy-domain": {"type": "string"},
                    "mx-host": {"type": "array", "items": {"type": "string"}}}},
                "summary": {"type": "object", "required": ["total-successful-session-count",
                                                           "total-failure-session-count"],
                            "properties": {"total-successful-session-count": {"type": "integer", "minimum": 0},
                                           "total-failure-session-count": {"type": "integer", "minimum": 0}}},
                "failure-details": {"type": "array", "items": {
                    "type": "object", "required": ["result-type", "failed-session-count"],
                    "properties": {"result-type": {"enum": RESULT_TYPES},
                                   "sending-mta-ip": {"type": "string"},
                                   "receiving-mx-hostname": {"type": "string"},
                                   "receiving-mx-helo": {"type": "string"},
                                   "receiving-ip": {"type": "string"},
                                   "failed-session-count": {"type": "integer", "minimum": 1},
                                   "additional-information": {"type": "string"},
                                   "failure-reason-code": {"type": "string"}}}},
            }}},
    },
}


def record_some(log: TLSResultLog, clock: task.Clock) -> None:
    sts = ["version: STSv1", "mode: enforce", "mx: mx.rpt.test", "max_age: 86400"]
    for _ in range(3):
        log.record("rpt.test", "sts", sts, "mx.rpt.test", None, "", mx_patterns=["mx.rpt.test"])
        clock.advance(60)
    log.record("rpt.test", "sts", sts, "mx.rpt.test", "certificate-host-mismatch",
               "certificate names (wrong.example) do not match mx.rpt.test", mx_patterns=["mx.rpt.test"])
    log.record("rpt.test", "tlsa", ["3 1 1 abcd"], "mx2.rpt.test", "validation-failure", "no TLSA record matches")
    log.record("rpt.test", "sts", (), "", "sts-policy-fetch-error", "policy host down")
    log.record("other.test", "sts", ["version: STSv1"], "mx.other.test", None, "")


def test_report_fits_the_rfc_schema(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(1_765_000_000)
    log = TLSResultLog(str(tmp_path / "r.jsonl"), clock)
    record_some(log, clock)
    log.reopen()
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    report = build_report("rpt.test", [r for r in rows if r["policy_domain"] == "rpt.test"], 1_765_000_000,
                          1_765_086_399, "exmta.test", "postmaster@exmta.test", "id1")
    jsonschema.validate(report, SCHEMA, format_checker=jsonschema.FormatChecker())
    by_type = {(p["policy"]["policy-type"], tuple(p["policy"].get("policy-string", ()))): p for p in report["policies"]}
    sts = by_type[("sts", ("version: STSv1", "mode: enforce", "mx: mx.rpt.test", "max_age: 86400"))]
    assert sts["summary"] == {"total-successful-session-count": 3, "total-failure-session-count": 1}
    assert sts["policy"]["mx-host"] == ["mx.rpt.test"]
    assert sts["failure-details"][0]["result-type"] == "certificate-host-mismatch"
    assert by_type[("tlsa", ("3 1 1 abcd",))]["failure-details"][0]["receiving-mx-hostname"] == "mx2.rpt.test"
    assert report["date-range"] == {"start-datetime": "2025-12-06T05:46:40Z", "end-datetime": "2025-12-07T05:46:39Z"}


def test_rua_parsing() -> None:
    assert parse_rua(["v=TLSRPTv1; rua=mailto:a@b.test,https://r.test/x"]) == ["mailto:a@b.test", "https://r.test/x"]
    assert parse_rua(["v=TLSRPTv1;rua=mailto:a@b.test", "v=TLSRPTv1;rua=mailto:c@d.test"]) == []
    assert parse_rua(["v=spf1 -all"]) == [] and parse_rua(["v=TLSRPTv1; rua=ftp://x"]) == []


class _Collector(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[tuple[bytes, bytes]] = []

    def render_POST(self, request: Any) -> bytes:
        self.posts.append((request.getHeader(b"content-type") or b"", request.content.read()))
        return b"ok"


@pytest.mark.skipif(not knot.available(), reason="knotd is not installed")
@pytest_twisted.inlineCallbacks
def test_daily_reports_by_mail_and_https(tmp_path: Path) -> None:
    from twisted.internet import reactor, ssl

    from types import SimpleNamespace

    from exmta.dns import auth_dns_from_config

    pki = TestPKI(tmp_path / "pki")
    files = pki.server("127.0.0.1", file="collector")
    cert = ssl.PrivateCertificate.loadPEM(files.cert.read_bytes() + files.key.read_bytes())
    collector = _Collector()
    port = reactor.listenSSL(0, server.Site(collector), cert.options(), interface="127.0.0.1")
    url = f"https://127.0.0.1:{port.getHost().port}/tlsrpt"
    zone = f'_smtp._tls.rpt TXT "v=TLSRPTv1; rua=mailto:tlsrpt@rpt.test,{url}"\n'
    dns_server = knot.KnotServer(tmp_path, {"test": zone}).start()
    try:
        clock = task.Clock()
        clock.advance(1_765_000_000)
        log = TLSResultLog(str(tmp_path / "tlsrpt" / "results.jsonl"), clock)
        record_some(log, clock)
        dns = auth_dns_from_config({"dns_servers": [f"127.0.0.1:{dns_server.port}"]},
                                   SimpleNamespace(reactor=None, threadpool=None))
        store = MemoryStore(clock)
        service = TLSReportService(
            log, store, clock, reactor, lambda fn, *a: defer.maybeDeferred(fn, *a),
            lambda name: [t.decode() for t in dns.txt(name) or ()], "exmta.test", "postmaster@exmta.test",
            "tlsrpt-contact@exmta.test", ca_file=str(pki.ca_file))
        service.startService()
        [pending] = [c for c in clock.getDelayedCalls()]
        assert pending.getTime() % 86400 == 60  # a minute after UTC midnight
        sent = yield service.send_reports()
        service.stopService()
    finally:
        dns_server.stop()
        yield port.stopListening()
    assert sent == 1  # other.test publishes no TLSRPT record
    [qid] = store.queue_ids()
    env: Envelope = store.envelope(qid)
    assert env.sender == "" and env.kind == "dsn" and [r.address for r in env.recipients] == ["tlsrpt@rpt.test"]
    msg = email.message_from_bytes(store.content(qid), policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "rpt.test" and msg["TLS-Report-Submitter"] == "exmta.test"
    [part] = [p for p in msg.iter_attachments() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert part.get_filename().startswith("exmta.test!rpt.test!") and part.get_filename().endswith(".json.gz")
    report = json.loads(gzip.decompress(part.get_content()))
    jsonschema.validate(report, SCHEMA, format_checker=jsonschema.FormatChecker())
    assert report["contact-info"] == "tlsrpt-contact@exmta.test"
    [(ctype, body)] = collector.posts
    assert ctype == b"application/tlsrpt+gzip"
    assert json.loads(gzip.decompress(body)) == report
    assert not (tmp_path / "tlsrpt" / "results.jsonl").exists()  # taken aside and removed once sent
