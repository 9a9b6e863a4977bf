"""DMARC (RFC 7489) as a filter: alignment, policy discovery, p/sp/pct, and what we do.

* The RFC5322.From domain comes from exactly one From: field with one
  domain; none, several fields or several domains fail (RFC 7489 6.6.1) with
  ``dmarc=permerror`` and, by default, 550 5.7.1.
* The record is looked up at ``_dmarc.<from domain>`` and then at the
  organisational domain, found with the packaged public suffix list
  (:mod:`exmta.filters.psl`; ``exmta psl refresh`` updates a copy, never
  at run time).
* SPF (MAIL FROM, or HELO for the null sender) and DKIM identities are
  aligned relaxed (same organisational domain) or strict (equal), per
  ``aspf``/``adkim``.
* On fail the policy is ``sp`` for a subdomain when given, else ``p``;
  ``pct`` sampling downgrades reject to quarantine and quarantine to none
  (RFC 7489 6.6.4). ``reject`` answers 550 5.7.1 with the reason,
  ``quarantine`` holds the message (IMessageView.quarantine: the operator
  lists and releases it from the hold queue), ``none`` only tags.
* A DNS failure is ``temperror`` and a 451 4.7.1 by default, never a pass.
* ``discovery = "treewalk"`` replaces the two RFC 7489 lookups and the
  public suffix list with the DMARCbis DNS tree walk
  (draft-ietf-dmarc-dmarcbis-41 4.10, :class:`TreeWalk`): the policy is the
  nearest valid record walking up (at most 8 queries), organisational
  domains (policy choice and relaxed alignment) come from ``psd=`` and the
  records found, ``np=`` applies to a From: domain without A/AAAA/MX, and
  ``t=y`` replaces ``pct`` (one level less). A failed query anywhere on the
  walk is temperror. The default stays "psl" (RFC 7489).

Config (``plugin = "dmarc"``): ``dns_servers``, ``dns_timeout``,
``enforce`` (true; false tags only), ``quarantine`` ("hold" | "tag"),
``overrides`` (a table ``"domain" = "none" | "quarantine" | "reject"``
replacing the published policy for that From: domain or organisational
domain), ``malformed_from`` ("reject" | "tag"), ``on_temperror``,
``skip_authenticated``, ``report_log`` (true: append results to
``<data>/dmarc/results.jsonl``), ``reports`` (true: send daily aggregate
reports built from that log, :mod:`exmta.filters.dmarc_reports`),
``report_from``, ``report_org``, ``discovery`` ("psl" | "treewalk").
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from email.utils import getaddresses
from typing import Any

from twisted.logger import Logger
from zope.interface import provider

from exmta.dns import AuthDNS, OversizeAnswer, TempDNSError, auth_dns_from_config
from exmta.filters.authres import DKIMResult, DMARCResult, SPFResult, auth_state
from exmta.filters.base import FilterBase
from exmta.filters.dkim_verify import dkim_results
from exmta.filters.psl import org_domain, use_data_dir
from exmta.filters.spf import bool_option, check_spf, common_options
from exmta.interfaces import IFilterFactory
from exmta.model import Verdict

__all__ = ["DMARCFilter", "DMARCRecord", "TreeWalk", "evaluate", "from_domain", "lookup_record", "parse_record",
           "record_at", "walk_targets"]

log = Logger()

DISPOSITIONS = ("none", "quarantine", "reject")


class DMARCRecordError(ValueError):
    """A DMARC record that cannot be used (RFC 7489 6.6.3)."""


class DMARCRecord(dict):  # type: ignore[type-arg]
    """Parsed tags of a DMARC record (lower-case names), with RFC 7489 defaults applied on access."""

    @property
    def p(self) -> str:
        return self["p"]

    @property
    def sp(self) -> str:
        return self.get("sp", self["p"])

    @property
    def pct(self) -> int:
        return int(self.get("pct", "100"))

    @property
    def adkim(self) -> str:
        return self.get("adkim", "r")

    @property
    def aspf(self) -> str:
        return self.get("aspf", "r")

    @property
    def np(self) -> str:
        """DMARCbis / RFC 9091 policy for non-existent subdomains; sp (then p) when absent."""
        return self.get("np", self.sp)

    @property
    def psd(self) -> str:
        """DMARCbis ``psd=``: "y" (a public suffix domain), "n" (an organisational domain), else "u"."""
        value = self.get("psd", "u").lower()
        return value if value in ("y", "n") else "u"

    @property
    def testing(self) -> bool:
        """DMARCbis ``t=y`` (test mode: apply one level less); unknown values count as "n"."""
        return self.get("t", "n").lower() == "y"


def parse_record(text: str) -> DMARCRecord:
    """Parse ``v=DMARC1; p=...`` (RFC 7489 6.3); DMARCRecordError says what is wrong."""
    tags = DMARCRecord()
    parts = [p.strip() for p in text.split(";")]
    if not parts or re.sub(r"\s", "", parts[0]) != "v=DMARC1":
        raise DMARCRecordError("record does not start with v=DMARC1")
    for part in parts[1:]:
        if not part:
            continue
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if not eq or not re.fullmatch(r"[a-z0-9]+", name):
            raise DMARCRecordError(f"malformed tag {part!r}")
        if name in tags:
            raise DMARCRecordError(f"tag {name} given twice")
        tags[name] = value.strip()
    for name in ("p", "sp", "np"):
        if name in tags and tags[name].lower() not in DISPOSITIONS:
            if name == "p" and "rua" in tags:
                tags["p"] = "none"  # 6.6.3: an invalid p with rua is treated as p=none
                continue
            raise DMARCRecordError(f"{name}={tags[name]!r} is not none, quarantine or reject")
        if name in tags:
            tags[name] = tags[name].lower()
    if "p" not in tags:
        if "rua" in tags:
            tags["p"] = "none"
        else:
            raise DMARCRecordError("required tag p is missing")
    for name in ("adkim", "aspf"):
        if name in tags and tags[name].lower() not in ("r", "s"):
            raise DMARCRecordError(f"{name}={tags[name]!r} is not r or s")
        if name in tags:
            tags[name] = tags[name].lower()
    if "pct" in tags and not (tags["pct"].isdigit() and 0 <= int(tags["pct"]) <= 100):
        raise DMARCRecordError(f"pct={tags['pct']!r} is not an integer from 0 to 100")
    return tags


def from_domain(headers: Any) -> tuple[str | None, str]:
    """(the RFC5322.From domain, "") or (None, why it cannot be used) per RFC 7489 6.6.1."""
    fields = headers.get_all("From") or []
    if not fields:
        return None, "message has no From: header field"
    if len(fields) > 1:
        return None, f"message has {len(fields)} From: header fields"
    addresses = getaddresses([str(fields[0])])
    addrs = [addr for _, addr in addresses if addr]
    domains = {addr.rpartition("@")[2].strip().rstrip(".").lower() for addr in addrs}
    if not addrs or any("@" not in a for a in addrs) or "" in domains:
        return None, "From: has no address with a domain"
    if len(domains) > 1:
        return None, f"From: has addresses in {len(domains)} domains"
    domain = domains.pop()
    try:
        domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return None, f"From: domain {domain!r} is not a valid IDN"
    if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)+", domain):
        return None, f"From: domain {domain!r} is not a valid domain name"
    return domain, ""


def lookup_record(dns: AuthDNS, domain: str) -> tuple[DMARCRecord | None, str, str]:
    """(record, the domain it was found at, problem) for ``domain``; blocking.

    Raises TempDNSError. A record that exists but is unusable gives
    (None, where, "why") so the result is permerror.
    """
    candidates = [domain]
    org = org_domain(domain)
    if org != domain:
        candidates.append(org)
    for where in candidates:
        record, problem = record_at(dns, where)
        if record is not None or problem:
            return record, where, problem
    return None, "", ""


def record_at(dns: AuthDNS, where: str) -> tuple[DMARCRecord | None, str]:
    """(the one DMARC record at ``_dmarc.<where>``, "") or (None, why it is unusable) or (None, ""); blocking.

    Raises TempDNSError. Shared by both discovery methods.
    """
    try:
        records = dns.txt(f"_dmarc.{where}")
    except OversizeAnswer as e:
        return None, str(e)
    texts = [r.decode("utf-8", "replace") for r in records or ()]
    dmarc = [t for t in texts if re.match(r"\s*v\s*=\s*DMARC1\s*(;|$)", t, re.IGNORECASE)]
    if len(dmarc) > 1:
        return None, f"_dmarc.{where} has {len(dmarc)} DMARC records"
    if dmarc:
        try:
            return parse_record(dmarc[0]), ""
        except DMARCRecordError as e:
            return None, f"_dmarc.{where}: {e}"
    return None, ""


#: the tree walk never queries more than the start and the last 7 labels (DMARCbis 4.10 step 5)
WALK_LABELS = 7


def walk_targets(domain: str) -> list[str]:
    """The names the DMARCbis tree walk queries under ``_dmarc.``, nearest first.

    draft-ietf-dmarc-dmarcbis-41 section 4.10: the domain itself; then, when
    it has 8 labels or more, its last 7 labels, else one label fewer; then one
    label fewer each step down to the top-level domain. At most 8 queries.
    """
    labels = domain.split(".")
    names = [domain]
    for n in range(min(len(labels) - 1, WALK_LABELS), 0, -1):
        names.append(".".join(labels[-n:]))
    return names


class TreeWalk:
    """DMARCbis policy discovery and organisational domains by the DNS tree walk (blocking).

    One instance serves one message: ``_dmarc`` answers are cached, so the
    walks for the From: domain and for the SPF/DKIM identities share queries.
    Raises TempDNSError when a query on the way fails (the result is then
    temperror: a walk that skipped a level could pick the wrong policy).
    """

    def __init__(self, dns: AuthDNS) -> None:
        self.dns = dns
        self.cache: dict[str, tuple[DMARCRecord | None, str]] = {}

    def record(self, where: str) -> tuple[DMARCRecord | None, str]:
        if where not in self.cache:
            self.cache[where] = record_at(self.dns, where)
        return self.cache[where]

    def policy(self, domain: str) -> tuple[DMARCRecord | None, str, str]:
        """(record, where, problem): the valid record nearest to ``domain`` (4.10.1).

        Unusable records (several, malformed, oversize) are discarded and the
        walk goes on (4.10 steps 2 and 7); only when no valid record is found
        at all does the first problem make the result permerror.
        """
        problems: list[str] = []
        for where in walk_targets(domain):
            record, problem = self.record(where)
            if record is not None:
                if problems:
                    log.info("DMARC tree walk for {domain}: discarded {problems}; using _dmarc.{where}",
                             domain=domain, problems="; ".join(problems), where=where)
                return record, where, ""
            if problem:
                problems.append(problem)
        return None, (domain if problems else ""), problems[0] if problems else ""

    def org_domain(self, domain: str) -> str:
        """The organisational domain of ``domain`` (DMARCbis 4.10.2).

        Walking up: the first record with psd=n is the organisational domain;
        a psd=y record (not at the start) makes the domain one label below it
        the organisational domain; otherwise the record with the fewest labels;
        with no record at all, the domain itself.
        """
        domain = domain.lower().rstrip(".")
        labels = domain.split(".")
        found: list[str] = []
        for where in walk_targets(domain):
            record, _ = self.record(where)
            if record is None:
                continue
            if record.psd == "n":
                return where
            if record.psd == "y" and where != domain:
                return ".".join(labels[-(where.count(".") + 2):])
            found.append(where)
        return found[-1] if found else domain  # targets are nearest first: the last found has the fewest labels

    def nonexistent(self, domain: str) -> bool:
        """DMARCbis 3.2.x / RFC 9091: no A, AAAA or MX records (NXDOMAIN or NODATA); TempDNSError passes up."""
        return all(self.dns.lookup(domain, rdtype) is None for rdtype in ("A", "AAAA", "MX"))

    def applicable_policy(self, domain: str, record: DMARCRecord, where: str, org: str) -> tuple[str, str]:
        """(tag, value) of the policy that applies to ``domain`` under the record found at ``where``.

        p at the From: domain itself; sp, or np for a non-existent domain,
        when the record is the organisational domain's or a PSD's (psd=y);
        p for a record on an intermediate subdomain (the draft's note that sp
        and np are ignored for records published below an organisational domain).
        """
        if where == domain or (where != org and record.psd != "y"):
            return "p", record.p
        if "np" in record and record.np != record.sp and self.nonexistent(domain):
            return "np", record.np
        return ("sp", record.sp) if "sp" in record else ("p", record.p)


def aligned(identity: str, from_dom: str, mode: str, org: Any = org_domain) -> bool:
    """Strict: equal; relaxed: the same organisational domain by ``org`` (the PSL, or a TreeWalk's)."""
    identity = identity.lower().rstrip(".")
    if mode == "s" or identity == from_dom:
        return identity == from_dom
    return bool(org(identity) == org(from_dom))


def evaluate(dns: AuthDNS, from_dom: str, spf: SPFResult | None, dkim: list[DKIMResult],
             rng: random.Random, overrides: dict[str, str], discovery: str = "psl") -> DMARCResult:
    """The DMARC result for an already known From domain (blocking: the record lookups).

    ``discovery`` "psl": RFC 7489 (From: domain, then its organisational
    domain from the public suffix list; pct sampling). "treewalk": DMARCbis
    (:class:`TreeWalk` for the policy and every organisational domain; np,
    psd and t honoured, pct ignored except that pct=0 counts as t=y).
    """
    walk = TreeWalk(dns) if discovery == "treewalk" else None
    org_of: Any = walk.org_domain if walk is not None else org_domain
    org = from_dom
    try:
        org = org_of(from_dom)
        record, where, problem = walk.policy(from_dom) if walk is not None else lookup_record(dns, from_dom)
    except TempDNSError as e:
        return DMARCResult("temperror", from_dom, reason=f"DMARC record lookup failed: {e}", org_domain=org)
    if record is None:
        if problem:
            return DMARCResult("permerror", from_dom, reason=problem, org_domain=org)
        return DMARCResult("none", from_dom, reason="no DMARC record", org_domain=org)
    walk_failed: list[str] = []

    def is_aligned(identity: str, mode: str) -> bool:
        try:
            return aligned(identity, from_dom, mode, org_of)
        except TempDNSError as e:  # only the tree walk queries here
            walk_failed.append(f"organisational domain of {identity}: {e}")
            return False

    spf_ok = bool(spf and spf.result == "pass" and is_aligned(spf.domain, record.aspf))
    dkim_ok = any(d.result == "pass" and is_aligned(d.domain, record.adkim) for d in dkim)
    tags = dict(record)
    tag = "sp" if where != from_dom else "p"
    policy = record.sp if where != from_dom else record.p
    if walk is not None:
        try:
            tag, policy = walk.applicable_policy(from_dom, record, where, org)
        except TempDNSError as e:
            walk_failed.append(f"existence of {from_dom}: {e}")
    if spf_ok or dkim_ok:
        return DMARCResult("pass", from_dom, policy, "none", "", org, spf_ok, dkim_ok, tags, where)
    temp = (spf is not None and spf.result == "temperror" and is_aligned(spf.domain, record.aspf)) or any(
        d.result == "temperror" and is_aligned(d.domain, record.adkim) for d in dkim)
    if temp or walk_failed:
        reason = "an aligned check failed temporarily (DNS)" if temp else "; ".join(walk_failed)
        return DMARCResult("temperror", from_dom, policy, "none", reason, org, False, False, tags, where)
    disposition = policy
    if walk is None:
        downgrade = record.pct < 100 and rng.random() * 100 >= record.pct  # RFC 7489 6.6.4
    else:
        downgrade = record.testing or ("t" not in record and record.get("pct") == "0")  # DMARCbis t=y
    if downgrade:
        disposition = {"reject": "quarantine", "quarantine": "none"}.get(policy, policy)
    override = overrides.get(from_dom) or overrides.get(org)
    if override:
        disposition = override
    reasons = [f"{from_dom} does not exist (np={policy})"] if tag == "np" else []
    reasons.append(f"SPF {spf.result} for {spf.domain}" if spf else "no SPF result")
    if spf and spf.result == "pass" and not spf_ok:
        reasons[-1] += " (not aligned)"
    passing = [d.domain for d in dkim if d.result == "pass"]
    reasons.append(f"DKIM pass only for {', '.join(passing)} (not aligned)" if passing else "no passing DKIM signature")
    return DMARCResult("fail", from_dom, policy, disposition, "; ".join(reasons), org, False, False, tags, where)


@provider(IFilterFactory)
class DMARCFilter(FilterBase):
    """``plugin = "dmarc"``: see the module docstring."""

    KEYS = frozenset({"dns_servers", "dns_timeout", "enforce", "quarantine", "overrides", "malformed_from",
                      "on_temperror", "skip_authenticated", "report_log", "reports", "report_from",
                      "report_org", "discovery"})

    def __init__(self, name: str, dns: AuthDNS, receiver: str, *, enforce: bool = True, quarantine: str = "hold",
                 overrides: dict[str, str] | None = None, malformed_from: str = "reject",
                 on_temperror: str = "tempfail", skip_authenticated: bool = True,
                 report_path: str | None = None, rng: random.Random | None = None, clock: Any = None,
                 discovery: str = "psl") -> None:
        self.name = name
        self.discovery = discovery
        self.dns = dns
        self.receiver = receiver
        self.enforce = enforce
        self.quarantine = quarantine
        self.overrides = {k.lower().rstrip("."): v for k, v in (overrides or {}).items()}
        self.malformed_from = malformed_from
        self.on_temperror = on_temperror
        self.skip_authenticated = skip_authenticated
        self.report_path = report_path
        self.rng = rng or random.Random()
        self.clock = clock

    @classmethod
    def from_config(cls, name: str, config: dict[str, Any], env: Any) -> DMARCFilter:
        options = common_options(config, cls.KEYS)
        if "enforce" in config:
            options["enforce"] = bool_option(config, "enforce")
        for key, allowed in (("quarantine", ("hold", "tag")), ("malformed_from", ("reject", "tag")),
                             ("discovery", ("psl", "treewalk"))):
            if key in config:
                if config[key] not in allowed:
                    raise ValueError(f"{key} must be one of {', '.join(allowed)}, not {config[key]!r}")
                options[key] = config[key]
        overrides = config.get("overrides", {})
        if not isinstance(overrides, dict):
            raise ValueError("overrides must be a table of \"domain\" = \"none\" | \"quarantine\" | \"reject\"")
        for domain, value in overrides.items():
            if value not in DISPOSITIONS:
                raise ValueError(f"overrides.{domain} must be none, quarantine or reject, not {value!r}")
        options["overrides"] = overrides
        if config.get("report_log", False) is not False:
            if bool_option(config, "report_log"):
                options["report_path"] = os.path.join(env.data_dir, "dmarc", "results.jsonl")
        if "reports" in config and bool_option(config, "reports") and config.get("report_log") is not True:
            raise ValueError("reports = true needs report_log = true (the reports are built from that log)")
        for key in ("report_from", "report_org"):
            if key in config and (not isinstance(config[key], str) or not config[key].strip()
                                  or "\n" in config[key] or "\r" in config[key]):
                raise ValueError(f"{key} must be a one-line string")
        if "report_from" in config and "@" not in config["report_from"]:
            raise ValueError("report_from must be an address (local@domain)")
        use_data_dir(env.data_dir)  # a list refreshed by `exmta psl refresh`, else the packaged one
        return cls(name, auth_dns_from_config(config, env), env.hostname, clock=env.clock, **options)

    async def on_data(self, session: Any, txn: Any, message: Any) -> Verdict:
        if self.skip_authenticated and session.auth_identity:
            return Verdict.CONTINUE
        state = auth_state(session).for_message(txn)
        domain, problem = from_domain(message.headers)
        if domain is None:
            state.dmarc = DMARCResult("permerror", reason=problem)
            log.info("{filter_name}: DMARC permerror: {reason}", filter_name=self.name, reason=problem)
            if self.enforce and self.malformed_from == "reject":
                return Verdict.reject(550, "5.7.1", f"DMARC: {problem} (RFC 7489 6.6.1)")
            return Verdict.CONTINUE
        spf = state.spf_for(txn)
        if spf is None:
            sender = str(txn.sender)
            spf = await self.dns.run(check_spf, self.dns, session.peer_ip, sender, session.helo_name or "",
                                     self.receiver, "mailfrom")
            state.mailfrom, state.mailfrom_sender = spf, sender
        dkim = await dkim_results(self.dns, state, message)
        result = await self.dns.run(evaluate, self.dns, domain, spf, dkim, self.rng, self.overrides, self.discovery)
        if not self.enforce and result.result == "fail":
            result = _with(result, disposition="none")
        if result.disposition == "quarantine" and self.quarantine == "tag":
            result = _with(result, disposition="none")
        state.dmarc = result
        log.info("{filter_name}: DMARC header.from={domain}: {result} p={policy} dis={disposition} {reason}",
                 filter_name=self.name, domain=domain, result=result.result, policy=result.policy,
                 disposition=result.disposition, reason=result.reason)
        recording = self._record(session, txn, result, spf, dkim)
        if recording is not None:
            await recording
        if result.result == "temperror" and self.on_temperror == "tempfail":
            return Verdict.tempfail(451, "4.7.1", f"DMARC check of {domain} failed temporarily; try again later")
        if result.result != "fail":
            return Verdict.CONTINUE
        if result.disposition == "reject":
            return Verdict.reject(550, "5.7.1", f"DMARC policy of {domain} rejects this message: {result.reason}"[:400])
        if result.disposition == "quarantine":
            message.quarantine(f"DMARC policy of {domain} is quarantine: {result.reason}")
            state.quarantined = True
        return Verdict.CONTINUE

    def _record(self, session: Any, txn: Any, result: DMARCResult, spf: SPFResult | None,
                dkim: list[DKIMResult]) -> Any:
        """Append one line for the aggregate reports on the pool (best effort; never fails the message)."""
        if not self.report_path or not result.record:
            return None
        now = self.clock.seconds() if self.clock is not None else time.time()
        line = {
            "time": now, "source_ip": session.peer_ip, "header_from": result.from_domain,
            "org_domain": result.org_domain, "policy_domain": result.policy_domain, "policy": result.record,
            "disposition": result.disposition, "result": result.result,
            "dkim_aligned": result.dkim_aligned, "spf_aligned": result.spf_aligned,
            "envelope_from": spf.domain if spf else "",
            "spf": {"domain": spf.domain, "result": spf.result, "scope": spf.identity} if spf else None,
            "dkim": [{"domain": d.domain, "selector": d.selector, "result": d.result} for d in dkim],
        }
        return self.dns.run(self._append, json.dumps(line, separators=(",", ":")) + "\n")

    def _append(self, text: str) -> None:
        assert self.report_path is not None
        try:
            os.makedirs(os.path.dirname(self.report_path), exist_ok=True)
            with open(self.report_path, "a", encoding="utf-8") as f:
                f.write(text)  # one write of one line: appends from pool threads do not interleave
        except OSError:
            log.failure("{filter_name}: cannot append to {path}", filter_name=self.name, path=self.report_path)


def _with(result: DMARCResult, **changes: Any) -> DMARCResult:
    from dataclasses import replace

    return replace(result, **changes)
