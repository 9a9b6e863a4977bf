"""DMARC aggregate reports (RFC 7489 section 7.2 and appendix C), sent daily through exmta's own queue.

The DMARC filter appends one JSON line per evaluated message to
``<data>/dmarc/results.jsonl`` (``report_log = true``). Once a day (UTC
midnight, on the injected clock) :class:`DMARCReportService` takes that
file aside, groups its rows by policy domain, and for each domain that
asked for reports (``rua=mailto:...``) queues one message with the gzipped
XML report through ``store.submit`` (null sender, ``kind="dsn"``: a report
is never bounced). A report address outside the policy domain's
organisational domain is used only when it agrees to receive them (RFC
7489 7.1: ``<domain>._report._dmarc.<rua domain>`` TXT ``v=DMARC1``). A
file whose reports could not be queued is kept and retried the next day; so
are the rows of a domain whose agreement record could not be looked up (a
temporary DNS error is not a "no", and it is logged).

Enabled by ``reports = true`` in the ``[filters.NAME]`` table of a
``plugin = "dmarc"`` filter (with ``report_log = true``); ``report_from``
(default ``postmaster@<hostname>``) and ``report_org`` (default the
hostname) name the reporter.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import xml.etree.ElementTree as ET
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Iterable

from twisted.logger import Logger

from exmta.dns import OversizeAnswer, TempDNSError
from exmta.model import Envelope, Recipient
from exmta.reports.daily import DailyReportService, report_headers

__all__ = ["DMARCReportService", "add_report_service", "build_report", "group_rows", "report_message", "rua_addresses"]

log = Logger()


def _rows(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line after a crash
            if isinstance(row, dict) and row.get("policy_domain") and isinstance(row.get("policy"), dict):
                rows.append(row)
    return rows


def _write_rows(path: str, rows: list[dict[str, Any]]) -> None:
    """Replace the file at ``path`` with ``rows`` (a temp file renamed over it)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def group_rows(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by policy domain (where the DMARC record was found)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(str(row["policy_domain"]).lower(), []).append(row)
    return out


def _sub(parent: ET.Element, tag: str, text: Any = None) -> ET.Element:
    el = ET.SubElement(parent, tag)
    if text is not None:
        el.text = str(text)
    return el


def build_report(domain: str, rows: list[dict[str, Any]], begin: int, end: int, org: str, email: str,
                 report_id: str) -> bytes:
    """The aggregate report XML (RFC 7489 appendix C) for one policy domain."""
    root = ET.Element("feedback")
    meta = _sub(root, "report_metadata")
    _sub(meta, "org_name", org)
    _sub(meta, "email", email)
    _sub(meta, "report_id", report_id)
    dr = _sub(meta, "date_range")
    _sub(dr, "begin", begin)
    _sub(dr, "end", end)
    policy = rows[-1]["policy"]
    pp = _sub(root, "policy_published")
    _sub(pp, "domain", domain)
    _sub(pp, "adkim", policy.get("adkim", "r"))
    _sub(pp, "aspf", policy.get("aspf", "r"))
    _sub(pp, "p", policy.get("p", "none"))
    _sub(pp, "sp", policy.get("sp", policy.get("p", "none")))
    _sub(pp, "pct", policy.get("pct", "100"))
    counts: Counter[str] = Counter()
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = json.dumps([row.get("source_ip"), row.get("disposition"), row.get("dkim_aligned"),
                          row.get("spf_aligned"), row.get("header_from"), row.get("envelope_from"),
                          row.get("spf"), row.get("dkim")], sort_keys=True)
        counts[key] += 1
        first.setdefault(key, row)
    for key, count in counts.items():
        row = first[key]
        rec = _sub(root, "record")
        r = _sub(rec, "row")
        _sub(r, "source_ip", row.get("source_ip", ""))
        _sub(r, "count", count)
        pe = _sub(r, "policy_evaluated")
        _sub(pe, "disposition", row.get("disposition", "none"))
        _sub(pe, "dkim", "pass" if row.get("dkim_aligned") else "fail")
        _sub(pe, "spf", "pass" if row.get("spf_aligned") else "fail")
        ids = _sub(rec, "identifiers")
        _sub(ids, "header_from", row.get("header_from", ""))
        if row.get("envelope_from"):
            _sub(ids, "envelope_from", row["envelope_from"])
        ar = _sub(rec, "auth_results")
        for d in row.get("dkim") or ():
            el = _sub(ar, "dkim")
            _sub(el, "domain", d.get("domain", ""))
            if d.get("selector"):
                _sub(el, "selector", d["selector"])
            _sub(el, "result", d.get("result", "none"))
        spf = row.get("spf") or {"domain": row.get("envelope_from", ""), "result": "none", "scope": "mailfrom"}
        el = _sub(ar, "spf")
        _sub(el, "domain", spf.get("domain", ""))
        _sub(el, "scope", "helo" if spf.get("scope") == "helo" else "mfrom")
        _sub(el, "result", spf.get("result", "none"))
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8")


def rua_addresses(policy: dict[str, str]) -> list[str]:
    """The mailto: addresses of ``rua`` (the optional ``!size`` suffix removed)."""
    out = []
    for uri in policy.get("rua", "").split(","):
        uri = uri.strip()
        if uri.lower().startswith("mailto:"):
            addr = uri[7:].split("!", 1)[0].strip()
            if "@" in addr and "\r" not in addr and "\n" not in addr:
                out.append(addr)
    return out


def report_message(domain: str, org: str, sender: str, to: list[str], xml: bytes, begin: int, end: int,
                   report_id: str, now: float) -> bytes:
    """The report mail (RFC 7489 7.2.1.1): gzip attachment ``receiver!domain!begin!end.xml.gz``."""
    msg = report_headers(domain, org, sender, to, report_id, now)
    msg.set_content(f"DMARC aggregate report for {domain} from {org}, "
                    f"{datetime.fromtimestamp(begin, timezone.utc):%Y-%m-%d %H:%M} to "
                    f"{datetime.fromtimestamp(end, timezone.utc):%Y-%m-%d %H:%M} UTC.\n")
    data = gzip.compress(xml, mtime=0)
    msg.add_attachment(data, maintype="application", subtype="gzip",
                       filename=f"{org}!{domain}!{begin}!{end}.xml.gz")
    return msg.as_bytes()


class DMARCReportService(DailyReportService):
    """Sends the reports once a day (see the module docstring)."""

    what = "DMARC aggregate reports"

    def __init__(self, results_path: str, store: Any, clock: Any, run: Any, dns: Any, org: str, sender: str) -> None:
        super().__init__(clock)
        self.results_path = results_path
        self.store = store
        self.run = run            # (fn, *args) -> Deferred: the thread pool
        self.dns = dns            # AuthDNS for the external destination check
        self.org = org
        self.sender = sender

    def _take_files(self, now: float) -> list[str]:
        return self.take_files(self.results_path, now)

    async def send_reports(self) -> int:
        """Queue the reports for everything recorded so far; returns how many messages were queued."""
        now = self.clock.seconds()
        files = await self.run(self._take_files, now)
        queued = 0
        for path in files:
            rows = await self.run(_rows, path)
            kept: list[dict[str, Any]] = []
            try:
                queued += await self._send_file(rows, now, kept)
                if kept:  # domains whose report address could not be checked now: the next run tries again
                    await self.run(_write_rows, path, kept)
                    continue
            except Exception:
                log.failure("DMARC reports from {path} not queued; kept for the next run", path=path)
                continue
            await self.run(os.remove, path)
        return queued

    async def _send_file(self, rows: list[dict[str, Any]], now: float, kept: list[dict[str, Any]]) -> int:
        """Queue the report of each domain in ``rows``; the rows of a domain whose report address
        could not be checked (a temporary DNS error) go to ``kept``."""
        queued = 0
        for domain, drows in sorted(group_rows(rows).items()):
            begin = int(min(r.get("time", now) for r in drows))
            end = int(now)
            targets = []
            check_later = False
            for addr in rua_addresses(drows[-1]["policy"]):
                check = f"{domain}._report._dmarc.{addr.rpartition('@')[2]}"
                try:
                    authorised = await self.run(self._authorised, domain, addr)
                except TempDNSError as e:
                    log.warn("DMARC report for {domain}: cannot check {check} now ({error}); kept for the next run",
                             domain=domain, check=check, error=str(e))
                    check_later = True
                    break
                if authorised:
                    targets.append(addr)
                else:
                    log.warn("DMARC report for {domain} not sent to {rua}: no {check} record",
                             domain=domain, rua=addr, check=check)
            if check_later:
                kept.extend(drows)
                continue
            if not targets:
                continue
            report_id = hashlib.sha256(f"{self.org}|{domain}|{begin}|{end}".encode()).hexdigest()[:24]
            xml = build_report(domain, drows, begin, end, self.org, self.sender, report_id)
            content = report_message(domain, self.org, self.sender, targets, xml, begin, end, report_id, now)
            content = content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            envelope = Envelope(sender="", recipients=[Recipient(t) for t in targets], kind="dsn",
                                received_at=now, size=len(content))
            queue_id = await self.store.submit(content, envelope)
            log.info("DMARC aggregate report for {domain} ({rows} messages) queued as {queue_id} for {rua}",
                     domain=domain, rows=len(drows), queue_id=queue_id, rua=", ".join(targets))
            queued += 1
        return queued

    def _authorised(self, domain: str, addr: str) -> bool:
        """RFC 7489 7.1: a report address in another organisational domain must agree (blocking)."""
        from exmta.filters.psl import org_domain

        rua_domain = addr.rpartition("@")[2].lower().rstrip(".")
        if org_domain(rua_domain) == org_domain(domain):
            return True
        try:
            records = self.dns.txt(f"{domain}._report._dmarc.{rua_domain}") or []
        except OversizeAnswer:
            return False  # not a v=DMARC1 agreement; TempDNSError (and a bug) go to the caller: not "no"
        return any(r.decode("ascii", "replace").replace(" ", "").lower().startswith("v=dmarc1") for r in records)


def add_report_service(parent: Any, config: Any, store: Any, reactor: Any, pool: Any, data_dir: str) -> None:
    """Add a DMARCReportService under ``parent`` for the first dmarc filter with ``reports = true``."""
    from types import SimpleNamespace

    from twisted.internet.threads import deferToThreadPool

    from exmta.dns import auth_dns_from_config

    for name, table in config.filters.items():
        if table.get("plugin") == "dmarc" and table.get("reports") is True and table.get("report_log") is True:
            env = SimpleNamespace(reactor=reactor, threadpool=pool)
            dns_keys = {k: table[k] for k in ("dns_servers", "dns_timeout") if k in table}
            service = DMARCReportService(
                os.path.join(data_dir, "dmarc", "results.jsonl"), store, reactor,
                lambda fn, *a: deferToThreadPool(reactor, pool, fn, *a),
                auth_dns_from_config(dns_keys, env), str(table.get("report_org", config.hostname)),
                str(table.get("report_from", f"postmaster@{config.hostname}")))
            service.setName(f"dmarc-reports.{name}")
            service.setServiceParent(parent)
            return

