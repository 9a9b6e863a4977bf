"""TLS-RPT for MX hosts without MTA-STS or DANE: sessions reported as ``no-policy-found``.

RFC 8460 section 4.4: a domain that publishes a TLSRPT record
(``_smtp._tls.<domain>`` TXT ``v=TLSRPTv1; ...``) but neither an MTA-STS
policy nor usable TLSA records still gets a report, for policy type
``no-policy-found``, counting the sessions that negotiated TLS as successful
and the others with their RFC 8460 section 4.3 result type.

Delivery never waits for the TLSRPT lookup: :class:`ReportingDomains` starts
it when the domain's policy is looked up and caches the answer (a positive or
negative answer for an hour, a DNS failure for five minutes, as "does not
publish"); a session's result is written once the answer is known, and
dropped when the domain publishes nothing or the lookup failed.  So domains
without a TLSRPT record cost one cached TXT lookup and no disk writes.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from exmta.tlspolicy.report import parse_rua
from exmta.tlspolicy.verify import peer_chain

__all__ = ["NoPolicySession", "ReportingDomains", "result_type"]

log = Logger()


class ReportingDomains:
    """Which recipient domains publish a TLSRPT record; looked up once per ``ttl``, never failing.

    ``lookup(name)`` gives a Deferred of the TXT strings at ``name`` (None:
    no records) and may fail (a DNS error): then the domain counts as not
    publishing for ``error_ttl`` seconds.
    """

    def __init__(self, clock: Any, lookup: Callable[[str], defer.Deferred[list[str] | None]], *,
                 ttl: float = 3600.0, error_ttl: float = 300.0, max_entries: int = 10_000) -> None:
        self.clock = clock
        self.lookup = lookup
        self.ttl = ttl
        self.error_ttl = error_ttl
        self.max_entries = max_entries
        self._known: OrderedDict[str, tuple[bool, float]] = OrderedDict()  # domain -> (publishes, until)
        self._waiting: dict[str, list[Callable[[bool], None]]] = {}

    def cached(self, domain: str) -> bool | None:
        """The cached answer, or None when it must be looked up."""
        entry = self._known.get(domain)
        if entry is None:
            return None
        if entry[1] <= self.clock.seconds():
            del self._known[domain]
            return None
        return entry[0]

    def prefetch(self, domain: str) -> None:
        """Start the lookup now (with the MX and policy lookups) unless it is cached or under way."""
        self.when_known(domain, lambda publishes: None)

    def when_known(self, domain: str, then: Callable[[bool], None]) -> None:
        """Call ``then(publishes)`` now if the answer is cached, else once the lookup is done."""
        domain = domain.lower().rstrip(".")
        known = self.cached(domain)
        if known is not None:
            then(known)
            return
        waiting = self._waiting.get(domain)
        if waiting is not None:
            waiting.append(then)
            return
        self._waiting[domain] = [then]
        try:
            d = self.lookup(f"_smtp._tls.{domain}")
        except Exception as exc:  # a lookup that cannot even start: as a DNS failure
            d = defer.fail(exc)
        d.addCallbacks(lambda strings: self._done(domain, _publishes(strings or []), self.ttl),
                       lambda f: self._failed(domain, f))

    def _failed(self, domain: str, failure: Any) -> None:
        log.debug("TLSRPT lookup for {domain} failed: {error}", domain=domain, error=failure.getErrorMessage())
        self._done(domain, False, self.error_ttl)

    def _done(self, domain: str, publishes: bool, ttl: float) -> None:
        self._known[domain] = (publishes, self.clock.seconds() + ttl)
        self._known.move_to_end(domain)
        while len(self._known) > self.max_entries:
            self._known.popitem(last=False)
        for then in self._waiting.pop(domain, ()):
            try:
                then(publishes)
            except Exception:
                log.failure("TLS-RPT recording for {domain} failed", domain=domain)


def _publishes(strings: list[str]) -> bool:
    """RFC 8460 3: exactly one record starting with ``v=TLSRPTv1`` (with a usable rua)."""
    return bool(parse_rua(strings))


def result_type(text: str) -> str:
    """The RFC 8460 4.3 result type for the reason a STARTTLS/handshake step failed."""
    low = text.lower()
    if "does not offer starttls" in low or "starttls was refused" in low:
        return "starttls-not-supported"
    if "expired" in low or "not yet valid" in low:
        return "certificate-expired"
    if "name verification" in low or "hostname mismatch" in low or "do not match" in low:
        return "certificate-host-mismatch"
    if any(w in low for w in ("verify failed", "self-signed", "self signed", "unable to get local issuer",
                              "not trusted", "untrusted", "unknown ca")):
        return "certificate-not-trusted"
    return "validation-failure"


class NoPolicySession:
    """One connection to an MX host of ``domain`` that has no MTA-STS or DANE policy.

    The send connector calls :meth:`after_session` once the session is up or
    has failed; the result is recorded (``engine.record_domain``, policy type
    ``no-policy-found``) if the domain publishes a TLSRPT record.
    """

    def __init__(self, domain: str, host: str, engine: Any, domains: ReportingDomains) -> None:
        self.domain = domain
        self.host = host
        self.engine = engine
        self.domains = domains

    def after_session(self, proto: Any, established: bool, phase: str | None, reply_text: str,
                      tls_mode: str) -> None:
        """Classify the session: TLS up (success), no STARTTLS, or a failed STARTTLS/handshake.

        Sessions that never reached the TLS step (refused greeting or EHLO)
        and sessions where we did not try TLS (``tls_mode`` none) say nothing
        about the receiver's TLS and are not recorded.  Never raises: a
        report must not change what happens to the mail.
        """
        try:
            self._classify(proto, established, phase, reply_text, tls_mode)
        except Exception:
            log.failure("TLS-RPT recording for {domain} failed", domain=self.domain)

    def _classify(self, proto: Any, established: bool, phase: str | None, reply_text: str, tls_mode: str) -> None:
        ips = getattr(proto, "addresses", ("", ""))
        if proto.tls is not None:
            self.record(None, "", ips)
        elif tls_mode == "none":
            return
        elif established:
            if "STARTTLS" in getattr(proto, "capabilities", {}):
                self.record("starttls-not-supported", f"{self.host} refused STARTTLS", ips)
            else:
                self.record("starttls-not-supported", f"{self.host} did not offer STARTTLS", ips)
        elif phase == "STARTTLS":
            kind = result_type(reply_text)
            if kind in ("validation-failure", "certificate-not-trusted") and self._expired(proto):
                kind = "certificate-expired"
            self.record(kind, reply_text, ips)

    def _expired(self, proto: Any) -> bool:
        """Is the certificate the server sent outside its dates?  (A connector's own context may
        refuse it as just "certificate verify failed".)"""
        try:
            chain = peer_chain(proto.transport.getHandle())
            if not chain:
                return False
            cert = chain[0].to_cryptography()
            now = self.engine.clock.seconds()
            return bool(cert.not_valid_after_utc.timestamp() < now or cert.not_valid_before_utc.timestamp() > now)
        except Exception:  # no TLS connection to look at (another transport)
            return False

    def record(self, failure: str | None, text: str, ips: tuple[str, str] = ("", "")) -> None:
        domain, host, engine = self.domain, self.host, self.engine

        def write(publishes: bool) -> None:
            if publishes:
                engine.record_domain(domain, "no-policy-found", failure, text, host, ips)

        self.domains.when_known(domain, write)
