"""DNSSEC-aware lookups for DANE (RFC 7672) through a validating resolver the operator names.

The AD bit says "this answer was validated", but only a resolver we trust
may say so (RFC 7672 2.1; RFC 6698 4.1): the operator lists it in
``[tls_policy] dane_resolvers`` (typically a local unbound).  Each lookup
returns an :class:`Answer` whose ``status`` is

* ``secure``: the resolver validated it (AD set), records or a denial;
* ``insecure``: unsigned (no AD): DANE does not apply;
* ``bogus``: SERVFAIL, which a validating resolver returns for a bad
  signature (or a broken zone): the MX host must not be used (RFC 7672 2.1.1).

dnspython is blocking, so queries run on the bounded pool the caller gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from exmta.tlspolicy.verify import TLSARecord

__all__ = ["Answer", "ValidatingResolver", "tlsa_name"]


@dataclass(frozen=True)
class Answer:
    status: str                      # "secure" | "insecure" | "bogus"
    records: tuple[Any, ...] = ()    # rdata objects of the asked type (CNAMEs followed by the resolver)
    nxdomain: bool = False
    text: str = ""
    ttl: float | None = None         # of the records; None for a denial

    @property
    def tlsa(self) -> tuple[TLSARecord, ...]:
        return tuple(TLSARecord(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert)) for r in self.records)


def tlsa_name(host: str, port: int = 25) -> str:
    return f"_{port}._tcp.{host.rstrip('.')}"


class ValidatingResolver:
    """Asks ``nameservers`` [(ip, port)] with DO and AD set; see the module docstring."""

    def __init__(self, reactor: Any, threadpool: Any, nameservers: list[tuple[str, int]],
                 timeout: float = 5.0, *, clock: Any = None, max_cache: float = 300.0) -> None:
        if not nameservers:
            raise ValueError("a validating resolver needs at least one name server")
        self.reactor = reactor
        self.threadpool = threadpool
        self.nameservers = list(nameservers)
        self.timeout = timeout
        #: answers kept for their TTL (at most ``max_cache`` s; bogus ones never): a warm
        #: delivery path asks no question twice (measured in benchmarks/tls_policy.py)
        self.clock = clock
        self.max_cache = max_cache if clock is not None else 0.0
        self._cache: dict[tuple[str, str], tuple[float, Answer]] = {}

    def query(self, name: str, rdtype: str) -> defer.Deferred[Answer]:
        key = (name.lower().rstrip("."), rdtype)
        if self.max_cache > 0:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > self.clock.seconds():
                return defer.succeed(hit[1])
        if self.threadpool is None:
            d = defer.maybeDeferred(self.query_blocking, name, rdtype)
        else:
            d = deferToThreadPool(self.reactor, self.threadpool, self.query_blocking, name, rdtype)
        return d.addCallback(self._remember, key)

    def _remember(self, answer: Answer, key: tuple[str, str]) -> Answer:
        if self.max_cache > 0 and answer.status != "bogus":
            ttl = min([self.max_cache, answer.ttl] if answer.ttl is not None else [self.max_cache, 60.0])
            if ttl > 0:
                self._cache[key] = (self.clock.seconds() + ttl, answer)
                if len(self._cache) > 10000:  # bounded: drop the oldest half
                    for old in sorted(self._cache, key=lambda k: self._cache[k][0])[:5000]:
                        del self._cache[old]
        return answer

    def query_blocking(self, name: str, rdtype: str) -> Answer:
        qname = name.rstrip(".") + "."
        rtype = dns.rdatatype.from_text(rdtype)
        q = dns.message.make_query(qname, rtype, want_dnssec=True)
        q.flags |= dns.flags.AD | dns.flags.RD
        last = ""
        for ip, port in self.nameservers:
            try:
                r = dns.query.udp(q, ip, port=port, timeout=self.timeout)
                if r.flags & dns.flags.TC:
                    r = dns.query.tcp(q, ip, port=port, timeout=self.timeout)
            except (OSError, dns.exception.DNSException) as exc:
                last = f"{ip}:{port}: {exc.__class__.__name__}"
                continue
            rcode = r.rcode()
            if rcode == dns.rcode.SERVFAIL:
                return Answer("bogus", text=f"SERVFAIL from {ip}:{port} for {rdtype} {name} (validation failure?)")
            if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                last = f"{dns.rcode.to_text(rcode)} from {ip}:{port}"
                continue
            secure = bool(r.flags & dns.flags.AD)
            records: list[Any] = []
            ttls = []
            for rrset in r.answer:
                if rrset.rdtype == rtype:
                    records.extend(rrset)
                    ttls.append(rrset.ttl)
            return Answer("secure" if secure else "insecure", tuple(records), rcode == dns.rcode.NXDOMAIN,
                          text=f"{rdtype} {name}: {'secure' if secure else 'insecure'}",
                          ttl=float(min(ttls)) if ttls else None)
        return Answer("bogus", text=f"no validating resolver answered for {rdtype} {name}: {last}")
