"""MX and address lookups with dnspython on a bounded thread pool.

dnspython is blocking, so every query runs through ``deferToThreadPool`` on
the pool the caller passes in (never the reactor's default pool, so a slow
DNS server cannot starve other blocking work).  Errors are mapped to two
exception classes whose ``reply`` a send connector can put in a result:

* :class:`DNSTemporaryError` (SERVFAIL, timeouts, CNAME loops): retry later;
* :class:`DNSPermanentError` (NXDOMAIN, RFC 7505 null MX, no address): bounce.
"""
from __future__ import annotations

import ipaddress
import random
from typing import Callable, TypeVar

import dns.exception
import dns.message
import dns.nameserver
import dns.rdatatype
import dns.resolver
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from exmta.model import Reply

__all__ = [
    "DNSError", "DNSPermanentError", "DNSResolver", "DNSTemporaryError", "NullMXError",
    "parse_nameservers",
]

T = TypeVar("T")
log = Logger()


class DNSError(Exception):
    """A lookup that gave no usable answer; ``reply`` explains it in SMTP terms."""

    reply: Reply

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class DNSTemporaryError(DNSError):
    """Try again later (SERVFAIL, timeout, CNAME loop)."""


class DNSPermanentError(DNSError):
    """The destination does not exist or accepts no mail."""

    nxdomain = False                      # the name does not exist (set with negative_ttl)
    negative_ttl: float | None = None     # RFC 2308 TTL of that answer, when the response gave one


class NullMXError(DNSPermanentError):
    """RFC 7505: the domain publishes a null MX and accepts no mail."""


def _temp(text: str) -> DNSTemporaryError:
    return DNSTemporaryError(Reply.make(451, "4.4.3", text))


def _perm(text: str, code: int = 550, status: str = "5.4.4") -> DNSPermanentError:
    return DNSPermanentError(Reply.make(code, status, text))


def parse_nameservers(specs: tuple[str, ...] | list[str]) -> list[tuple[str, int]]:
    """Config strings ("ip", "ip:port", "[v6]:port", "v6") -> (ip, port) pairs."""
    out: list[tuple[str, int]] = []
    for spec in specs:
        spec = spec.strip()
        if spec.startswith("["):
            host, _, rest = spec[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else 53
        elif spec.count(":") == 1:
            host, _, p = spec.partition(":")
            port = int(p)
        else:
            host, port = spec, 53
        ipaddress.ip_address(host)  # raises ValueError for a name
        out.append((host, port))
    return out


def _negative_ttl(responses: object) -> float | None:
    """RFC 2308: the lower of the SOA's TTL and its minimum field, from a negative answer's authority."""
    for response in responses:  # type: ignore[attr-defined]
        for rrset in getattr(response, "authority", ()):
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum))
    return None


class DNSResolver:
    """MX and A/AAAA lookups for the send connectors.

    ``nameservers`` None uses the system configuration (/etc/resolv.conf);
    tests always pass a loopback server.  ``timeout`` bounds each whole
    lookup (dnspython's lifetime), retries included.
    """

    def __init__(
        self,
        reactor: object,
        threadpool: ThreadPool,
        nameservers: list[tuple[str, int]] | None = None,
        timeout: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        self.threadpool = threadpool
        self.timeout = timeout
        self.rng = rng or random.Random()
        if nameservers:
            res = dns.resolver.Resolver(configure=False)
            res.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in nameservers]
        else:
            res = dns.resolver.Resolver()
        res.lifetime = timeout
        res.timeout = min(timeout, 2.0)
        res.cache = None
        self._resolver = res

    def _run(self, fn: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.threadpool, fn)

    # ------------------------------------------------------------ blocking parts (thread)

    def _query(self, name: str, rdtype: str) -> list[object] | None:
        """Records of ``rdtype`` at ``name`` (CNAMEs followed); None when the name has none."""
        answer = self._answer(name, rdtype)
        if answer.rrset is None:
            return None
        return list(answer.rrset)

    def _answer(self, name: str, rdtype: str) -> dns.resolver.Answer:
        """dnspython's answer, errors mapped as documented; NXDOMAIN's error carries ``negative_ttl``."""
        try:
            return self._resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            error = _perm(f"Host or domain name not found: {name} (NXDOMAIN)")
            error.nxdomain, error.negative_ttl = True, _negative_ttl(exc.responses().values())
            raise error from None
        except dns.message.ChainTooLong:
            raise _temp(f"CNAME chain too long or looping at {name}") from None
        except dns.resolver.LifetimeTimeout:
            raise _temp(f"DNS timeout looking up {rdtype} for {name}") from None
        except dns.resolver.NoNameservers as exc:
            if "CNAME chain" in str(exc):
                raise _temp(f"CNAME chain too long or looping at {name}") from None
            raise _temp(f"DNS server failure (SERVFAIL/REFUSED) looking up {rdtype} for {name}") from None
        except dns.resolver.YXDOMAIN:
            raise _perm(f"DNS name too long after DNAME substitution: {name}") from None
        except dns.exception.DNSException as exc:
            raise _temp(f"DNS error looking up {rdtype} for {name}: {exc}") from None

    def records_with_ttl_blocking(self, name: str, rdtype: str) -> tuple[list[object], float | None]:
        """(records, TTL) of ``rdtype`` at ``name``; ([], negative TTL) when it has none.

        For callers that cache answers for as long as the zone says (the DNS
        lists of exmta.receive.screen). The negative TTL is the SOA's
        (RFC 2308), None when the answer has no SOA. NXDOMAIN also gives
        ``[]``; timeouts and SERVFAIL raise :class:`DNSTemporaryError`.
        """
        try:
            answer = self._answer(name, rdtype)
        except DNSPermanentError as exc:
            if not exc.nxdomain:
                raise
            return [], exc.negative_ttl
        if answer.rrset is None:
            return [], _negative_ttl([answer.response])
        return list(answer.rrset), float(answer.rrset.ttl)

    def query_blocking(self, name: str, rdtype: str) -> list[object] | None:
        """Records of ``rdtype`` at ``name``, or None; for callers already on a pool thread.

        NXDOMAIN raises :class:`DNSPermanentError`, timeouts and SERVFAIL
        :class:`DNSTemporaryError` (used by the mail authentication lookups).
        """
        return self._query(name, rdtype)

    def _mx_blocking(self, domain: str) -> list[tuple[int, str]]:
        domain = domain.rstrip(".")
        records = self._query(domain, "MX")
        if records is None:
            # RFC 5321 5.1: no MX, the domain itself is the implicit MX (if it has an address)
            self._addresses_blocking(domain)
            return [(0, domain)]
        mxs = [(int(r.preference), r.exchange.to_text(omit_final_dot=True))  # type: ignore[attr-defined]
               for r in records]
        real = [(p, h) for p, h in mxs if h not in ("", ".")]
        if not real:
            # RFC 7505: a null MX (a single "." target) says the domain accepts no mail
            raise NullMXError(Reply.make(556, "5.1.10", f"Domain {domain} does not accept mail (null MX)"))
        return real

    def _addresses_blocking(self, host: str) -> list[str]:
        host = host.rstrip(".")
        try:
            return [str(ipaddress.ip_address(host.strip("[]")))]
        except ValueError:
            pass
        found: list[str] = []
        errors: list[DNSError] = []
        for rdtype in ("A", "AAAA"):
            try:
                records = self._query(host, rdtype)
            except DNSError as exc:
                errors.append(exc)
                continue
            for r in records or ():
                found.append(r.address)  # type: ignore[attr-defined]
        if found:
            return found
        temporary = [e for e in errors if isinstance(e, DNSTemporaryError)]
        if temporary:
            raise temporary[0]
        if errors:
            raise errors[0]
        raise _perm(f"No address (A or AAAA) for {host}")

    # ------------------------------------------------------------ API

    def resolve_mx(self, domain: str) -> Deferred[list[tuple[int, str]]]:
        """MX hosts as (preference, host), best first, shuffled within a preference.

        Falls back to the implicit MX ``[(0, domain)]`` when there are no MX
        records but the domain has an address.  Errbacks with
        :class:`NullMXError`, :class:`DNSPermanentError` or
        :class:`DNSTemporaryError`.
        """
        d = self._run(lambda: self._mx_blocking(domain))

        def order(mxs: list[tuple[int, str]]) -> list[tuple[int, str]]:
            shuffled = list(mxs)
            self.rng.shuffle(shuffled)
            shuffled.sort(key=lambda item: item[0])  # stable: shuffled within a preference
            log.debug("MX for {domain}: {mxs}", domain=domain, mxs=shuffled)
            return shuffled

        return d.addCallback(order)

    def resolve_addresses(self, host: str) -> Deferred[list[str]]:
        """IPv4 then IPv6 addresses of ``host`` (an IP literal is returned as is)."""
        return self._run(lambda: self._addresses_blocking(host))
