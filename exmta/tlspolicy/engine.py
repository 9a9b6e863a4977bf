"""Which TLS a send connector must do with each MX host of a domain: DANE, MTA-STS or its own.

:meth:`TLSPolicyEngine.for_domain` gives a :class:`DomainPolicy`; its
:meth:`DomainPolicy.host` says, per MX host, either :class:`Skip` (do not
connect: an MTA-STS ``enforce`` policy whose ``mx`` patterns the host does
not match, or a bogus DNSSEC answer) or a :class:`HostPolicy` (TLS mode,
context, and the certificate check run after the handshake), or None (no
policy: the connector's own TLS settings).

Precedence (RFC 8461 section 2, RFC 7672): a host with DNSSEC-validated
TLSA records is DANE's; others follow the domain's MTA-STS policy. A
per-domain override ``none`` ignores both; ``testing`` delivers where they
would defer (and still reports). No policy ever lets a host fall back to
plaintext once TLS is required: the connector gets ``tls = mandatory`` for
it, and a failure defers the mail with the reason (then a DSN when the
message expires).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from exmta.model import Reply
from exmta.routing.dns import DNSError, DNSPermanentError, DNSResolver, DNSTemporaryError, parse_nameservers
from exmta.tlspolicy.config import TLSPolicyConfig
from exmta.tlspolicy.dane import ValidatingResolver, tlsa_name
from exmta.tlspolicy.mtasts import MTASTS, PolicyCache, PolicyFetcher, STSPolicy
from exmta.tlspolicy.nopolicy import NoPolicySession, ReportingDomains
from exmta.tlspolicy.report import is_tls_report
from exmta.tlspolicy.verify import TLSARecord, check_dane, check_webpki, make_store

__all__ = ["DomainPolicy", "HostPolicy", "PolicyDeferral", "Skip", "TLSPolicyEngine"]


class PolicyDeferral(DNSTemporaryError):
    """No MX host may be used under the domain's policy: defer with ``reply``."""


@dataclass(frozen=True)
class Skip:
    """Do not connect to this MX host; ``reason`` ends up in the deferral."""

    reason: str


@dataclass(eq=False)
class HostPolicy:
    """TLS with one MX host under DANE or MTA-STS."""

    kind: str                      # "dane" | "mta-sts"
    host: str
    policy_domain: str
    enforce: bool                  # False: testing mode / override: deliver anyway, report
    engine: TLSPolicyEngine
    tlsa: tuple[TLSARecord, ...] = ()
    sts: STSPolicy | None = None
    mx_mismatch: bool = False      # testing mode: the host is not in the policy's mx list

    def tls_mode(self, connector_mode: str) -> str:
        if self.enforce or connector_mode == "mandatory":
            return "mandatory"
        return "opportunistic"

    def context(self) -> Any:
        return self.engine.creator(self.host)

    def label(self) -> str:
        return "DANE" if self.kind == "dane" else f"MTA-STS policy of {self.policy_domain}"

    def verify(self, connection: Any, ips: tuple[str, str] = ("", "")) -> str | None:
        """Run after the handshake: None to go on, or why not (enforced policies only).
        ``ips``: (ours, the server's) for the TLS-RPT report."""
        try:
            return self._verify(connection, ips)
        except Exception:  # a certificate the checks choke on: refused under an enforced policy
            self.engine.log.failure("TLS policy check of {host} failed", host=self.host)
            self.engine.record(self, "validation-failure", "the certificate could not be checked", ips)
            return f"{self.label()}: {self.host}: the certificate could not be checked" if self.enforce else None

    def _verify(self, connection: Any, ips: tuple[str, str]) -> str | None:
        if self.kind == "dane" and not any(r.usable for r in self.tlsa):
            # RFC 7672 2.2: TLS, unauthenticated; RFC 8460 4.3.2.1: none of the records is valid
            self.engine.record(self, "tlsa-invalid", f"none of the TLSA records of {self.host} is usable", ips)
            return None
        if self.kind == "dane":
            problem = check_dane(connection, self.tlsa, [self.host])
        else:
            problem = check_webpki(connection, [self.host], self.engine.store)
        if problem is None and self.mx_mismatch:
            self.engine.record(self, "validation-failure", f"MX host {self.host} not in the policy's mx patterns",
                               ips)
            return None
        if problem is None:
            self.engine.record(self, None, "", ips)
            return None
        self.engine.record(self, problem.kind, problem.text, ips)
        text = f"{self.label()}: {self.host}: {problem.text}"
        if self.enforce:
            return text
        self.engine.log.info("{policy} (testing, delivering anyway): {problem}", policy=self.label(), problem=text)
        return None

    def after_session(self, proto: Any, established: bool, reply: Reply | None,
                      phase: str | None = None) -> Reply | None:
        """Record what the certificate check did not see (no STARTTLS, a failed handshake), and name
        the policy in the refusal ``reply`` of a session that did not come up.  A session refused
        before the TLS step (``phase`` greeting, EHLO, HELO) is no TLS result and is not recorded."""
        if proto.tls is None and (established or phase in (None, "STARTTLS")):
            ips = getattr(proto, "addresses", ("", ""))
            if established or "STARTTLS" not in getattr(proto, "capabilities", {}):
                self.engine.record(self, "starttls-not-supported", f"{self.host} did not offer STARTTLS", ips)
            else:
                self.engine.record(self, "validation-failure", f"TLS handshake with {self.host} failed", ips)
        if reply is None or not self.enforce or self.label() in reply.text:
            return reply
        return Reply(reply.code, reply.status, (f"{self.label()}: {reply.lines[0]}",) + reply.lines[1:])


@dataclass
class DomainPolicy:
    domain: str
    engine: TLSPolicyEngine
    override: str = "enforce"
    dane_mx: bool = False          # the MX RRset validated (DNSSEC secure): look up TLSA
    sts: STSPolicy | None = None
    skipped: list[str] = field(default_factory=list)

    async def host(self, host: str) -> HostPolicy | Skip | None:
        """The policy for one MX host. An internal error skips the host (fail closed: never clear text)."""
        try:
            return await self._host(host)
        except Exception:
            self.engine.log.failure("TLS policy of {host} ({domain}) could not be determined", host=host,
                                    domain=self.domain)
            reason = f"TLS policy of {host} could not be determined (internal error; see the log)"
            self.skipped.append(reason)
            return Skip(reason)

    async def _host(self, host: str) -> HostPolicy | Skip | None:
        if self.override == "none":
            return None
        enforce = self.override != "testing"
        engine = self.engine
        if self.dane_mx and engine.dane is not None:
            addr = await engine.dane.query(host, "A")
            if addr.status == "bogus":
                return self._skip(host, f"DNSSEC validation of {host} failed ({addr.text})", "dnssec-invalid",
                                  enforce)
            if addr.status == "secure" and not addr.nxdomain:
                tlsa = await engine.dane.query(tlsa_name(host), "TLSA")
                if tlsa.status == "bogus":
                    return self._skip(host, f"TLSA lookup for {host} failed DNSSEC validation ({tlsa.text})",
                                      "dnssec-invalid", enforce)
                if tlsa.status == "secure" and tlsa.records:
                    return HostPolicy("dane", host, self.domain, enforce, engine, tlsa=tlsa.tlsa)
        sts = self.sts
        if sts is None or sts.mode == "none":
            return None
        if not sts.matches(host):
            if sts.mode == "enforce" and enforce:
                reason = (f"MTA-STS policy of {self.domain}: MX host {host} matches none of "
                          f"mx: {', '.join(sts.mx)}")
                self.skipped.append(reason)
                return Skip(reason)
            return HostPolicy("mta-sts", host, self.domain, False, engine, sts=sts, mx_mismatch=True)
        return HostPolicy("mta-sts", host, self.domain, enforce and sts.mode == "enforce", engine, sts=sts)

    def no_policy(self, host: str) -> NoPolicySession | None:
        """TLS-RPT for a host :meth:`host` gave no policy: its sessions count as ``no-policy-found``
        (when the domain publishes a TLSRPT record; exmta.tlspolicy.nopolicy). None when not reporting."""
        domains = self.engine.reporting_domains
        if domains is None or self.override == "none":
            return None
        return NoPolicySession(self.domain, host, self.engine, domains)

    def _skip(self, host: str, reason: str, kind: str, enforce: bool) -> Skip | None:
        self.engine.record_domain(self.domain, "tlsa", kind, reason, host)
        if not enforce:
            return None
        self.skipped.append(reason)
        return Skip(reason)

    def deferral(self) -> PolicyDeferral:
        text = "; ".join(dict.fromkeys(self.skipped)) or f"no usable MX host for {self.domain}"
        return PolicyDeferral(Reply.make(451, "4.7.5", text))


class TLSPolicyEngine:
    """Builds :class:`DomainPolicy` objects for one send connector; see the module docstring."""

    log = Logger()

    def __init__(self, config: TLSPolicyConfig, reactor: Any, clock: Any, threadpool: Any,
                 resolver: DNSResolver | None, *, reporter: Any = None,
                 client_certificate: tuple[str, str | None] | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = clock
        self.threadpool = threadpool
        self.resolver = resolver
        #: exmta.tlspolicy.report.TLSReporter (TLS-RPT), or None
        self.reporter = reporter
        self.store = make_store(config.ca_file)
        #: which domains publish a TLSRPT record (sessions without a policy are reported to those only)
        self.reporting_domains: ReportingDomains | None = None
        if reporter is not None and resolver is not None:
            self.reporting_domains = ReportingDomains(clock, self._txt_or_error)
        self.sts: MTASTS | None = None
        if config.mta_sts and resolver is not None:
            import os

            fetcher = PolicyFetcher(reactor, resolver.resolve_addresses, port=config.https_port,
                                    ca_file=config.ca_file, timeout=config.fetch_timeout,
                                    max_size=config.max_policy_size)
            cache = PolicyCache(os.path.join(config.cache_dir, "mta-sts") if config.cache_dir else None)
            self.sts = MTASTS(clock, threadpool, reactor, cache, fetcher, self._txt, txt_recheck=config.txt_recheck,
                              report=self._sts_failed)
        self.dane: ValidatingResolver | None = None
        if config.dane and config.dane_resolvers:
            self.dane = ValidatingResolver(reactor, threadpool, parse_nameservers(config.dane_resolvers), clock=clock)
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)  # RFC 8461 4.2: TLS 1.2 or later
        ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)  # checked after the handshake (verify.py)
        if client_certificate is not None:
            # the send connector's tls_certificate, still presented under a policy (Exchange Online
            # attributes a tenant's mail by it, and publishes MTA-STS for its MX hosts)
            from OpenSSL import crypto

            from exmta.tls.certs import load_certificate

            loaded = load_certificate(*client_certificate)
            ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, loaded.leaf_pem))
            for pem in loaded.chain_pem:
                ctx.add_extra_chain_cert(crypto.load_certificate(crypto.FILETYPE_PEM, pem))
            ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, loaded.key_pem))
        self._ctx = ctx

    # ------------------------------------------------------------ lookups

    def override_for(self, domain: str) -> str:
        overrides = self.config.overrides
        if domain in overrides:
            return overrides[domain]
        labels = domain.split(".")
        for i in range(1, len(labels)):
            wildcard = "*." + ".".join(labels[i:])
            if wildcard in overrides:
                return overrides[wildcard]
        return overrides.get("*", "enforce")

    async def for_domain(self, domain: str) -> DomainPolicy:
        """The domain's policy; PolicyDeferral when it cannot be had (an internal error included:
        mail waits rather than going out with less protection than the domain asked for)."""
        try:
            return await self._for_domain(domain)
        except DNSError:
            raise
        except Exception:
            self.log.failure("TLS policy of {domain} could not be determined", domain=domain)
            raise PolicyDeferral(Reply.make(451, "4.3.0", f"TLS policy of {domain} could not be determined "
                                            "(internal error; see the log)")) from None

    async def _for_domain(self, domain: str) -> DomainPolicy:
        domain = domain.lower().rstrip(".")
        policy = DomainPolicy(domain, self, override=self.override_for(domain))
        if policy.override == "none":
            return policy
        if self.reporting_domains is not None:  # TLSRPT TXT, alongside the policy lookups (not awaited)
            try:
                self.reporting_domains.prefetch(domain)
            except Exception:  # reporting never holds up delivery
                self.log.failure("TLSRPT lookup for {domain} not started", domain=domain)
        if self.dane is not None:
            mx = await self.dane.query(domain, "MX")
            if mx.status == "bogus" and policy.override != "testing":
                policy.skipped.append(f"DNSSEC validation of the MX records of {domain} failed ({mx.text})")
                raise policy.deferral()
            policy.dane_mx = mx.status == "secure" and bool(mx.records)
        if self.sts is not None:
            policy.sts = await self.sts.policy_for(domain)
        return policy

    def _txt(self, name: str) -> defer.Deferred[list[str] | None]:
        """TXT strings at ``name``; None when there are none or DNS failed."""
        def none_on_dns_error(failure: Any) -> None:
            failure.trap(DNSError)
            return None

        return self._txt_or_error(name).addErrback(none_on_dns_error)

    def _txt_or_error(self, name: str) -> defer.Deferred[list[str] | None]:
        """TXT strings at ``name`` (None: no records); fails on DNS errors other than NXDOMAIN."""
        resolver = self.resolver

        def lookup() -> list[str] | None:
            try:
                records = resolver.query_blocking(name, "TXT")  # type: ignore[union-attr]
            except DNSPermanentError:
                return None
            if records is None:
                return None
            return [b"".join(r.strings).decode("utf-8", "replace") for r in records]  # type: ignore[attr-defined]

        if self.threadpool is None:
            return defer.maybeDeferred(lookup)
        return deferToThreadPool(self.reactor, self.threadpool, lookup)

    def creator(self, hostname: str) -> Any:
        from exmta.tls.client import _Creator

        return _Creator(self._ctx, hostname, verify=False, check_name=None)

    # ------------------------------------------------------------ TLS-RPT

    @staticmethod
    def exempt(envelope: Any) -> bool:
        """A TLS report of ours: RFC 8460 5.3 has it delivered despite TLS failures (even in clear),
        and its session left out of the next report."""
        return is_tls_report(envelope)

    def record(self, host: HostPolicy, failure: str | None, text: str, ips: tuple[str, str] = ("", "")) -> None:
        if self.reporter is None:
            return
        kind = "tlsa" if host.kind == "dane" else "sts"
        strings = _policy_strings(host)
        try:
            self.reporter.record(host.policy_domain, kind, strings, host.host, failure, text,
                                 mx_patterns=host.sts.mx if host.sts else (), sending_ip=ips[0],
                                 receiving_ip=ips[1])
        except Exception:
            self.log.failure("TLS-RPT recording failed for {domain}", domain=host.policy_domain)

    def record_domain(self, domain: str, kind: str, failure: str | None, text: str, host: str = "",
                      ips: tuple[str, str] = ("", "")) -> None:
        if self.reporter is None:
            return
        try:
            if ips == ("", ""):
                self.reporter.record(domain, kind, (), host, failure, text)
            else:
                self.reporter.record(domain, kind, (), host, failure, text, sending_ip=ips[0], receiving_ip=ips[1])
        except Exception:
            self.log.failure("TLS-RPT recording failed for {domain}", domain=domain)

    def _sts_failed(self, domain: str, kind: str, text: str) -> None:
        self.record_domain(domain, "sts", kind, text)


def _policy_strings(host: HostPolicy) -> tuple[str, ...]:
    if host.kind == "dane":
        return tuple(f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in host.tlsa)
    if host.sts is None:
        return ()
    return tuple(line.strip() for line in host.sts.text.replace("\r\n", "\n").split("\n") if line.strip())
