"""TLS-RPT report details: whole UTC days (RFC 8460 4.1), IPs and reason text in the failure details (4.4)."""
from __future__ import annotations

import email
import email.policy
import gzip
import json
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer, task

from exmta.testing.memstore import MemoryStore
from exmta.tlspolicy.report import TLSReportService, TLSResultLog

DAY = 86400
D = 1_765_000_000 - 1_765_000_000 % DAY  # 2025-12-06T00:00:00Z


def service(log: TLSResultLog, clock: task.Clock, store: MemoryStore) -> TLSReportService:
    return TLSReportService(log, store, clock, None, lambda fn, *a: defer.maybeDeferred(fn, *a),
                            lambda name: ["v=TLSRPTv1; rua=mailto:rpt@r.test"], "exmta.test", "postmaster@exmta.test",
                            "postmaster@exmta.test")


def reports(store: MemoryStore) -> list[tuple[Any, dict[str, Any]]]:
    out = []
    for qid in store.queue_ids():
        msg = email.message_from_bytes(store.content(qid), policy=email.policy.default)
        [part] = [p for p in msg.iter_attachments() if p.get_content_type() == "application/tlsrpt+gzip"]
        out.append((part.get_filename(), json.loads(gzip.decompress(part.get_content()))))
    return out


@pytest_twisted.inlineCallbacks
def test_the_daily_report_covers_the_utc_day_before(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(D + 10 * 3600)
    log = TLSResultLog(str(tmp_path / "r.jsonl"), clock)
    log.record("r.test", "no-policy-found", (), "mx.r.test", None, "")
    clock.advance(10 * 3600)
    log.record("r.test", "no-policy-found", (), "mx.r.test", "starttls-not-supported", "mx.r.test did not offer "
               "STARTTLS", sending_ip="192.0.2.1", receiving_ip="198.51.100.7")
    clock.advance(4 * 3600 + 60)  # the daily run, a minute after midnight
    store = MemoryStore(clock)
    assert (yield defer.Deferred.fromCoroutine(service(log, clock, store).send_reports())) == 1
    [(filename, report)] = reports(store)
    assert report["date-range"] == {"start-datetime": "2025-12-06T00:00:00Z", "end-datetime": "2025-12-06T23:59:59Z"}
    assert filename.startswith(f"exmta.test!r.test!{D}!{D + DAY - 1}!")
    [policy] = report["policies"]
    assert policy["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 1}
    assert policy["failure-details"] == [{
        "result-type": "starttls-not-supported", "failed-session-count": 1, "sending-mta-ip": "192.0.2.1",
        "receiving-mx-hostname": "mx.r.test", "receiving-ip": "198.51.100.7",
        "failure-reason-code": "mx.r.test did not offer STARTTLS"}]


@pytest_twisted.inlineCallbacks
def test_results_of_today_sent_early_cover_until_now(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(D + 3600)
    log = TLSResultLog(str(tmp_path / "r.jsonl"), clock, sending_ip="203.0.113.5")
    log.record("r.test", "sts", ("version: STSv1",), "mx.r.test", "certificate-expired", "expired")
    clock.advance(60)
    store = MemoryStore(clock)
    yield defer.Deferred.fromCoroutine(service(log, clock, store).send_reports())
    [(_name, report)] = reports(store)
    assert report["date-range"] == {"start-datetime": "2025-12-06T01:00:00Z", "end-datetime": "2025-12-06T01:01:00Z"}
    assert report["policies"][0]["failure-details"][0]["sending-mta-ip"] == "203.0.113.5"  # the configured one
