"""TLS-RPT (RFC 8460): record each outbound TLS session result per policy domain; report daily.

:class:`TLSResultLog` is the engine's ``reporter``: one JSON line per
session (or policy failure) in ``<cache_dir>/tlsrpt/results.jsonl``.  Once
a day (a minute after UTC midnight, on the injected clock)
:class:`TLSReportService` takes that file aside, groups it by policy
domain, looks up ``_smtp._tls.<domain>`` (``v=TLSRPTv1; rua=...``) and
sends each domain the RFC 8460 section 4 JSON report, gzipped:

* ``mailto:`` through our own queue (``store.submit``, null sender,
  ``kind = "dsn"`` so that it never bounces), as the multipart/report of
  section 5.3 with the ``TLS-Report-Domain``/``TLS-Report-Submitter``
  headers; a send connector with ``dkim_sign = true`` signs it;
* ``https:`` as a POST of ``application/tlsrpt+gzip`` (section 5.4), the
  server's certificate validated.

A file whose reports could not all be handed over is kept for the next run.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from datetime import datetime, timezone
from typing import Any, Iterable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from exmta.model import Envelope, MailParams, Recipient
from exmta.reports.daily import DAY, DailyReportService, report_headers

__all__ = ["REPORT_ENVID", "TLSReportService", "TLSResultLog", "add_tls_report_service", "build_report",
           "is_tls_report", "parse_rua", "report_message"]

log = Logger()

#: the envelope id (RFC 3461 ENVID) of the report mails we queue: the send connector knows them by it
REPORT_ENVID = "exmta-tlsrpt."


def is_tls_report(envelope: Any) -> bool:
    """A TLS report we generated (kind "dsn": received mail never has it, whatever its ENVID)."""
    params = getattr(envelope, "params", None)
    envid = getattr(params, "envid", None) or ""
    return getattr(envelope, "kind", "") == "dsn" and envid.startswith(REPORT_ENVID)


class TLSResultLog:
    """Appends one JSON line per result (the engine calls :meth:`record`; never raises)."""

    def __init__(self, path: str, clock: Any, sending_ip: str | None = None) -> None:
        self.path = path
        self.clock = clock
        self.sending_ip = sending_ip
        self._file: Any = None

    def record(self, domain: str, kind: str, strings: Iterable[str], host: str, failure: str | None, text: str,
               mx_patterns: Iterable[str] = (), sending_ip: str = "", receiving_ip: str = "") -> None:
        row = {"time": self.clock.seconds(), "policy_domain": domain, "policy_type": kind,
               "policy_strings": list(strings), "mx_patterns": list(mx_patterns), "mx_host": host,
               "result": failure, "text": text[:500], "sending_ip": sending_ip or self.sending_ip or "",
               "receiving_ip": receiving_ip}
        try:
            if self._file is None:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8", buffering=1)
            self._file.write(json.dumps(row, separators=(",", ":")) + "\n")
        except OSError:
            log.failure("TLS-RPT result not written to {path}", path=self.path)
            self.reopen()

    def reopen(self) -> None:
        """Close the file: the next record opens it again (after the service moved it aside)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None


def _rows(path: str) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line after a crash
            if isinstance(row, dict) and row.get("policy_domain"):
                out.append(row)
    return out


def _date_range(rows: list[dict[str, Any]], now: float) -> tuple[float, float]:
    """RFC 8460 4.1: whole UTC days, from the midnight before the first result to the second before
    the last midnight (the daily run, a minute after it); ``now`` when the results are all of today."""
    first = min(float(r.get("time", now)) for r in rows)
    begin = first - first % DAY
    end = now - now % DAY - 1
    return (begin, end) if end > begin else (first, now)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(domain: str, rows: list[dict[str, Any]], begin: float, end: float, org: str, contact: str,
                 report_id: str) -> dict[str, Any]:
    """The RFC 8460 section 4.4 report for one policy domain."""
    policies: dict[str, dict[str, Any]] = {}
    for row in rows:
        ptype = row.get("policy_type") or "no-policy-found"
        strings = [str(s) for s in row.get("policy_strings") or ()]
        key = json.dumps([ptype, strings])
        entry = policies.get(key)
        if entry is None:
            policy: dict[str, Any] = {"policy-type": ptype, "policy-domain": domain}
            if strings:
                policy["policy-string"] = strings
            if row.get("mx_patterns"):
                policy["mx-host"] = [str(m) for m in row["mx_patterns"]]
            entry = policies[key] = {"policy": policy, "ok": 0, "failed": 0, "details": {}}
        if row.get("result"):
            entry["failed"] += 1
            dkey = (str(row["result"]), str(row.get("mx_host") or ""), str(row.get("text") or ""),
                    str(row.get("sending_ip") or ""), str(row.get("receiving_ip") or ""))
            entry["details"][dkey] = entry["details"].get(dkey, 0) + 1
        else:
            entry["ok"] += 1
    out = []
    for entry in policies.values():
        item: dict[str, Any] = {
            "policy": entry["policy"],
            "summary": {"total-successful-session-count": entry["ok"],
                        "total-failure-session-count": entry["failed"]},
        }
        if entry["details"]:
            details = []
            for (result, mx, text, sending_ip, receiving_ip), count in sorted(entry["details"].items()):
                d: dict[str, Any] = {"result-type": result, "failed-session-count": count}
                if sending_ip:
                    d["sending-mta-ip"] = sending_ip
                if mx:
                    d["receiving-mx-hostname"] = mx
                if receiving_ip:
                    d["receiving-ip"] = receiving_ip
                if text:  # free text: "additional-information" is for a URI (RFC 8460 4.4)
                    d["failure-reason-code"] = text
                details.append(d)
            item["failure-details"] = details
        out.append(item)
    return {
        "organization-name": org,
        "date-range": {"start-datetime": _iso(begin), "end-datetime": _iso(end)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": out,
    }


def parse_rua(strings: list[str]) -> list[str]:
    """The rua URIs of the one ``v=TLSRPTv1`` record (RFC 8460 3), [] when there is none or several."""
    found = [s for s in strings if re.match(r"v=TLSRPTv1\s*;", s)]
    if len(found) != 1:
        return []
    m = re.search(r"(?:^|;)\s*rua\s*=\s*([^;]+)", found[0])
    if not m:
        return []
    return [u.strip() for u in m.group(1).split(",") if re.match(r"(mailto:[^@\s]+@[^\s]+|https://\S+)$", u.strip())]


def report_message(domain: str, org: str, sender: str, to: list[str], data: bytes, begin: float, end: float,
                   report_id: str, now: float) -> bytes:
    """RFC 8460 5.3: multipart/report; report-type="tlsrpt" with the application/tlsrpt+gzip part."""
    msg = report_headers(domain, org, sender, to, report_id, now)
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = org
    msg.set_content(f"TLS report for {domain} from {org}, {_iso(begin)} to {_iso(end)} (RFC 8460).\n")
    msg.add_attachment(data, maintype="application", subtype="tlsrpt+gzip",
                       filename=f"{org}!{domain}!{int(begin)}!{int(end)}!{report_id[:8]}.json.gz")
    msg.set_type("multipart/report")
    msg.set_param("report-type", "tlsrpt")
    return msg.as_bytes()


class TLSReportService(DailyReportService):
    """Sends the reports once a day (see the module docstring)."""

    what = "TLS-RPT reports"

    def __init__(self, results: TLSResultLog, store: Any, clock: Any, reactor: Any, run: Any,
                 txt: Any, org: str, sender: str, contact: str, ca_file: str | None = None) -> None:
        super().__init__(clock)
        self.results = results
        self.store = store
        self.reactor = reactor
        self.run = run            # (fn, *args) -> Deferred: the thread pool
        self.txt = txt            # name -> list[str] (blocking TXT lookup)
        self.org = org
        self.sender = sender
        self.contact = contact
        self.ca_file = ca_file

    def _take_files(self, now: float) -> list[str]:
        files = self.take_files(self.results.path, now)
        self.results.reopen()
        return files

    async def send_reports(self) -> int:
        """Send the reports for everything recorded so far; returns how many reports went out."""
        now = self.clock.seconds()
        files = await self.run(self._take_files, now)
        sent = 0
        for path in files:
            rows = await self.run(_rows, path)
            try:
                sent += await self._send_rows(rows, now)
            except Exception:
                log.failure("TLS-RPT reports from {path} not sent; kept for the next run", path=path)
                continue
            await self.run(os.remove, path)
        return sent

    async def _send_rows(self, rows: list[dict[str, Any]], now: float) -> int:
        by_domain: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_domain.setdefault(str(row["policy_domain"]).lower(), []).append(row)
        sent = 0
        for domain, drows in sorted(by_domain.items()):
            strings = await self.run(self.txt, f"_smtp._tls.{domain}")
            rua = parse_rua(strings or [])
            if not rua:
                continue
            begin, end = _date_range(drows, now)
            report_id = hashlib.sha256(f"{self.org}|{domain}|{begin}|{end}".encode()).hexdigest()[:24]
            report = build_report(domain, drows, begin, end, self.org, self.contact, report_id)
            data = gzip.compress(json.dumps(report).encode(), mtime=0)
            mailto = [u[7:] for u in rua if u.lower().startswith("mailto:")]
            if mailto:
                content = report_message(domain, self.org, self.sender, mailto, data, begin, end, report_id, now)
                content = content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
                envelope = Envelope(sender="", recipients=[Recipient(t) for t in mailto], kind="dsn",
                                    received_at=now, size=len(content),
                                    params=MailParams(envid=REPORT_ENVID + report_id))
                queue_id = await self.store.submit(content, envelope)
                log.info("TLS-RPT report for {domain} queued as {queue_id} for {rua}", domain=domain,
                         queue_id=queue_id, rua=", ".join(mailto))
            for url in (u for u in rua if u.lower().startswith("https://")):
                await self._post(url, data, domain)
            sent += 1
        return sent

    async def _post(self, url: str, data: bytes, domain: str) -> None:
        import io

        from twisted.internet.ssl import optionsForClientTLS
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer
        from twisted.web.http_headers import Headers

        from exmta.tlspolicy.mtasts import _trust_root

        class _Policy(BrowserLikePolicyForHTTPS):
            def creatorForNetloc(inner, hostname: bytes, port: int) -> Any:  # noqa: N805
                return optionsForClientTLS(hostname.decode("idna"), trustRoot=_trust_root(self.ca_file))

        agent = Agent(self.reactor, contextFactory=_Policy(), connectTimeout=30)
        d = agent.request(b"POST", url.encode(), Headers({b"Content-Type": [b"application/tlsrpt+gzip"]}),
                          FileBodyProducer(io.BytesIO(data)))
        d.addTimeout(60, self.reactor)
        response = await d
        from exmta.tlspolicy.mtasts import _LimitedBody

        body: Deferred[bytes] = Deferred()
        response.deliverBody(_LimitedBody(64 * 1024, body))
        try:
            await body
        except Exception:  # the answer's body does not matter, only its status
            pass
        if not 200 <= response.code < 300:
            raise RuntimeError(f"TLS-RPT POST to {url} for {domain}: HTTP {response.code}")
        log.info("TLS-RPT report for {domain} posted to {url}", domain=domain, url=url)


def add_tls_report_service(parent: Any, config: Any, store: Any, reactor: Any, pool: Any,
                           connectors: dict[str, Any]) -> TLSReportService | None:
    """The daily report service under ``parent`` when ``[tls_policy] tls_rpt = true``.

    The result log is the one the send connectors' policy engines write
    (exmta.tlspolicy.wiring).
    """
    results = next((c.tls_policy.reporter for c in connectors.values()
                    if getattr(c, "tls_policy", None) is not None and c.tls_policy.reporter is not None), None)
    if results is None:
        return None
    from twisted.internet.threads import deferToThreadPool

    from types import SimpleNamespace

    from exmta.dns import TempDNSError, auth_dns_from_config

    servers = next((list(s.dns_servers) for s in config.send if s.dns_servers), [])
    dns = auth_dns_from_config({"dns_servers": servers}, SimpleNamespace(reactor=reactor, threadpool=pool))

    def txt(name: str) -> list[str]:
        try:
            return [t.decode("utf-8", "replace") for t in dns.txt(name) or ()]
        except TempDNSError:
            raise
        except Exception:
            return []

    tp = config.tls_policy
    sender = f"postmaster@{config.hostname}"
    signed_for = config.hostname.lower().rstrip(".")
    if not (any(s.dkim_sign for s in config.send) and any(k.domain == signed_for for k in config.dkim_keys)):
        log.warn("TLS-RPT reports from {sender} will go out without a DKIM signature, and RFC 8460 5.3 has "
                 "receivers ignore them: add a [[dkim.keys]] key for {domain} and dkim_sign = true on the send "
                 "connectors", sender=sender, domain=signed_for)
    service = TLSReportService(results, store, reactor, reactor,
                               lambda fn, *a: deferToThreadPool(reactor, pool, fn, *a), txt,
                               tp.tls_rpt_organization or config.hostname, sender, tp.tls_rpt_contact or sender,
                               tp.ca_file)
    service.setName("tls-reports")
    service.setServiceParent(parent)
    return service
