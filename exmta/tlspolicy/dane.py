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

    @property
    def tlsa(self) -> tuple[TLSARecord, ...]:
        return tuple(TLSARecord(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert)) for r in self.records)


def tlsa_name(host: str, port: int = 25) -> str:
    return f"_{port}._tcp.{host.rstrip('.')}"


class ValidatingResolver:
    """Asks ``nameservers`` [(ip, port)] with DO and AD set; see the module docstring."""

    def __init__(self, reactor: Any, threadpool: Any, nameservers: list[tuple[str, int]],
                 timeout: float = 5.0) -> None:
        if not nameservers:
            raise ValueError("a validating resolver needs at least one name server")
        self.reactor = reactor
        self.threadpool = threadpool
        self.nameservers = list(nameservers)
        self.timeout = timeout

    def query(self, name: str, rdtype: str) -> defer.Deferred[Answer]:
        if self.threadpool is None:
            return defer.maybeDeferred(self.query_blocking, name, rdtype)
        return deferToThreadPool(self.reactor, self.threadpool, self.query_blocking, name, rdtype)

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
            for rrset in r.answer:
                if rrset.rdtype == rtype:
                    records.extend(rrset)
            return Answer("secure" if secure else "insecure", tuple(records), rcode == dns.rcode.NXDOMAIN,
                          text=f"{rdtype} {name}: {'secure' if secure else 'insecure'}")
        return Answer("bogus", text=f"no validating resolver answered for {rdtype} {name}: {last}")
