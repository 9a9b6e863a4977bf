"""DMARC aggregate reports: results recorded by the filter, a daily report queued through the store."""
from __future__ import annotations

import email
import gzip
import json
import xml.etree.ElementTree as ET
from email.policy import default
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from exmta.dns import AuthDNS
from exmta.filters.dmarc_reports import DMARCReportService, build_report, rua_addresses
from exmta.plugins import FILTER_GROUP, _entry_points
from exmta.routing.dns import DNSResolver
from exmta.send.dkim_sign import sign_message
from exmta.testing import FilterHarness, MessageView
from exmta.testing.memstore import MemoryStore
from support import authzones, knot
from support.authzones import message

pytestmark = pytest.mark.integration

MIDNIGHT = 1_796_083_200.0  # 2026-11-30 00:00 UTC


def record_traffic(knot_server: knot.KnotServer, data: Path, clock: Clock, keys: authzones.Keys) -> None:
    cfg = {"dns_servers": [f"127.0.0.1:{knot_server.port}"], "report_log": True, "reports": True}
    factory = _entry_points(FILTER_GROUP)["dmarc"].load()
    h = FilterHarness(factory, None, clock=clock)
    h.env.data_dir = str(data)
    h.filter = factory.from_config("dmarc", cfg, h.env)
    h.chain.filters = (h.filter,)
    sends = [("192.0.2.10", "alice@example.test", sign_message(message(), [keys.rsa]))] * 3 + [
        ("198.51.100.7", "alice@example.test", message()),
        ("198.51.100.7", "a@ext.test", message(from_="a@ext.test")),
        ("198.51.100.7", "a@tagonly.test", message(from_="a@tagonly.test")),
    ]
    for ip, sender, msg in sends:
        h.run("data", h.session(ip), h.transaction(sender, "bob@dest.test"), MessageView(msg))


def test_daily_reports_are_queued(knot_server: knot.KnotServer, keys: authzones.Keys, tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(MIDNIGHT - 7200)
    record_traffic(knot_server, tmp_path, clock, keys)
    results = tmp_path / "dmarc" / "results.jsonl"
    assert len(results.read_text().splitlines()) == 6
    store = MemoryStore(clock)
    dns = AuthDNS(DNSResolver(None, None, knot_server.nameservers, timeout=3.0))
    service = DMARCReportService(str(results), store, clock, maybeDeferred, dns, "mx.dest.test",
                                 "postmaster@mx.dest.test")
    service.startService()
    clock.advance(7200 + 59)
    assert store.queue_ids() == []  # a minute after midnight, not before
    clock.advance(1)
    ids = store.queue_ids()
    assert len(ids) == 2  # example.test and ext.test ask for reports; tagonly.test does not
    envelopes = {tuple(r.address for r in store.envelope(q).recipients): store.envelope(q) for q in ids}
    assert set(envelopes) == {("dmarc-rua@example.test",), ("agg@other.test",)}  # third.test did not agree
    assert all(e.sender == "" and e.kind == "dsn" for e in envelopes.values())
    q = next(q for q in ids if store.envelope(q).recipients[0].address == "dmarc-rua@example.test")
    msg = email.message_from_bytes(store.content(q), policy=default)
    assert msg["Subject"].startswith("Report Domain: example.test Submitter: mx.dest.test Report-ID: <")
    [part] = [p for p in msg.iter_attachments()]
    assert part.get_content_type() == "application/gzip"
    begin, end = int(MIDNIGHT - 7200), int(MIDNIGHT + 60)
    assert part.get_filename() == f"mx.dest.test!example.test!{begin}!{end}.xml.gz"
    root = ET.fromstring(gzip.decompress(part.get_content()))
    assert root.tag == "feedback"
    assert root.findtext("report_metadata/org_name") == "mx.dest.test"
    assert root.findtext("report_metadata/date_range/begin") == str(begin)
    assert root.findtext("policy_published/p") == "reject" and root.findtext("policy_published/sp") == "quarantine"
    rows = {r.findtext("row/source_ip"): r for r in root.findall("record")}
    good, bad = rows["192.0.2.10"], rows["198.51.100.7"]
    assert good.findtext("row/count") == "3" and good.findtext("row/policy_evaluated/dkim") == "pass"
    assert good.findtext("auth_results/dkim/selector") == "sel1"
    assert good.findtext("auth_results/spf/scope") == "mfrom"
    assert bad.findtext("row/count") == "1" and bad.findtext("row/policy_evaluated/disposition") == "reject"
    assert bad.findtext("auth_results/spf/result") == "fail"
    assert not results.exists() and not list((tmp_path / "dmarc").glob("*.sending"))
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_failed_submit_keeps_the_file(knot_server: knot.KnotServer, keys: authzones.Keys, tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(MIDNIGHT - 60)
    record_traffic(knot_server, tmp_path, clock, keys)

    class Down:
        def submit(self, content: bytes, envelope: Any) -> Any:
            raise OSError("disk full")

    dns = AuthDNS(DNSResolver(None, None, knot_server.nameservers, timeout=3.0))
    service = DMARCReportService(str(tmp_path / "dmarc" / "results.jsonl"), Down(), clock, maybeDeferred, dns,
                                 "mx.dest.test", "postmaster@mx.dest.test")
    service.startService()
    clock.advance(120)
    kept = list((tmp_path / "dmarc").glob("results-*.jsonl.sending"))
    assert len(kept) == 1 and len(kept[0].read_text().splitlines()) == 6
    store = MemoryStore(clock)
    service.store = store
    clock.advance(86400)
    assert len(store.queue_ids()) == 2 and not list((tmp_path / "dmarc").glob("*.sending"))
    service.stopService()


def test_rua_parsing_and_xml_escaping() -> None:
    assert rua_addresses({"rua": "mailto:a@x.test!10m, https://x.test/r ,mailto:b@y.test"}) == ["a@x.test", "b@y.test"]
    row = {"source_ip": "192.0.2.1", "header_from": "x<y>.test", "disposition": "none", "policy": {"p": "none"},
           "dkim": [], "spf": None, "envelope_from": ""}
    xml = build_report("x.test", [row], 1, 2, "org & co", "r@x.test", "id1")
    root = ET.fromstring(xml)
    assert root.findtext("report_metadata/org_name") == "org & co"
    assert root.findtext("record/identifiers/header_from") == "x<y>.test"
    assert root.findtext("record/auth_results/spf/result") == "none"


def test_reports_need_report_log() -> None:
    factory = _entry_points(FILTER_GROUP)["dmarc"].load()
    with pytest.raises(ValueError, match="report_log"):
        FilterHarness(factory, {"reports": True})
    with pytest.raises(ValueError, match="report_from"):
        FilterHarness(factory, {"report_log": True, "reports": True, "report_from": "nobody"})


def test_service_tree_gets_the_reporter_only_when_asked(tmp_path: Path) -> None:
    from twisted.application.service import MultiService

    from exmta.config.schema import Config
    from exmta.filters.dmarc_reports import add_report_service

    clock = Clock()
    for table, expected in (({"plugin": "dmarc", "report_log": True}, []),
                            ({"plugin": "dmarc", "report_log": True, "reports": True}, ["dmarc-reports.d"])):
        top = MultiService()
        add_report_service(top, Config(hostname="mx.dest.test", filters={"d": table}), MemoryStore(clock), clock,
                           None, str(tmp_path))
        assert [s.name for s in top] == expected


class FlakyAgreementDNS:
    """The real resolver, except that report-agreement lookups time out (issue 10 item 12)."""

    def __init__(self, real: AuthDNS) -> None:
        self.real = real
        self.failing = True

    def txt(self, name: str) -> Any:
        from exmta.dns import TempDNSError

        if self.failing and "._report._dmarc." in name:
            raise TempDNSError(f"{name}: timeout")
        return self.real.txt(name)


def test_temporary_dns_error_keeps_the_report_for_the_next_run(
        knot_server: knot.KnotServer, keys: authzones.Keys, tmp_path: Path) -> None:
    from twisted.logger import globalLogPublisher

    clock = Clock()
    clock.advance(MIDNIGHT - 60)
    record_traffic(knot_server, tmp_path, clock, keys)
    store = MemoryStore(clock)
    dns = FlakyAgreementDNS(AuthDNS(DNSResolver(None, None, knot_server.nameservers, timeout=3.0)))
    service = DMARCReportService(str(tmp_path / "dmarc" / "results.jsonl"), store, clock, maybeDeferred, dns,
                                 "mx.dest.test", "postmaster@mx.dest.test")
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        service.startService()
        clock.advance(120)
    finally:
        globalLogPublisher.removeObserver(events.append)
    # example.test's own address needs no lookup: sent; ext.test's outside address could not be checked
    assert [store.envelope(q).recipients[0].address for q in store.queue_ids()] == ["dmarc-rua@example.test"]
    [kept] = list((tmp_path / "dmarc").glob("results-*.jsonl.sending"))
    assert {json.loads(line)["policy_domain"] for line in kept.read_text().splitlines()} == {"ext.test"}
    assert any("cannot check ext.test._report._dmarc.other.test now" in (e.get("log_format") or "").format(**e)
               for e in events if e.get("log_format", "").startswith("DMARC report for"))
    dns.failing = False
    clock.advance(86400)
    addresses = sorted(store.envelope(q).recipients[0].address for q in store.queue_ids())
    assert addresses == ["agg@other.test", "dmarc-rua@example.test"]
    assert not list((tmp_path / "dmarc").glob("*.sending"))
    service.stopService()
