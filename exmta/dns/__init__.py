"""DNS lookups for mail authentication (SPF, DKIM, DMARC, ARC), on top of routing.dns.

The libraries that check mail authentication (pyspf, dkimpy) are blocking
and take a DNS function; :class:`AuthDNS` provides those functions on the
same dnspython resolver as the send connectors (:class:`DNSResolver`), and
:meth:`AuthDNS.run` runs a blocking check on the filter thread pool.

Lookups are classified the way RFC 7208 and RFC 7489 need them:

* no such name, or no record of that type: ``None`` (a "none" result);
* timeout, SERVFAIL, REFUSED: :class:`TempDNSError` (temperror, never a silent pass);
* an answer larger than :data:`MAX_TXT_OCTETS`: :class:`OversizeAnswer` (permerror).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from exmta.routing.dns import DNSPermanentError, DNSResolver, DNSTemporaryError, parse_nameservers

__all__ = ["AuthDNS", "MAX_TXT_OCTETS", "OversizeAnswer", "TempDNSError", "auth_dns_from_config"]

T = TypeVar("T")
log = Logger()

#: largest TXT RRset (all strings of all records) we evaluate; a bigger one is an attack or a mistake
MAX_TXT_OCTETS = 8192


class TempDNSError(Exception):
    """A lookup that may succeed later (timeout, SERVFAIL): the check's result is temperror."""


class OversizeAnswer(Exception):
    """A TXT answer larger than MAX_TXT_OCTETS: the check's result is permerror."""


class AuthDNS:
    """Blocking lookups for the authentication libraries, plus a way to run them off the reactor.

    ``threadpool`` None runs checks inline (the FilterHarness in tests has no pool).
    """

    def __init__(self, resolver: DNSResolver, reactor: Any = None, threadpool: Any = None,
                 max_txt: int = MAX_TXT_OCTETS) -> None:
        self.resolver = resolver
        self.reactor = reactor
        self.threadpool = threadpool
        self.max_txt = max_txt
        self.timeout = resolver.timeout

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run a blocking check on the pool (inline without a pool)."""
        if self.threadpool is None:
            return maybeDeferred(fn, *args)
        return deferToThreadPool(self.reactor, self.threadpool, fn, *args)

    # ------------------------------------------------------------ blocking lookups

    def lookup(self, name: str, rdtype: str) -> list[Any] | None:
        """Records, or None for NXDOMAIN / no data; TempDNSError for transient failures."""
        name = name.rstrip(".")
        try:
            return self.resolver.query_blocking(name, rdtype)
        except DNSPermanentError:
            return None
        except DNSTemporaryError as e:
            raise TempDNSError(e.reply.text) from None

    def txt(self, name: str) -> list[bytes] | None:
        """Each TXT record at ``name`` with its strings joined (RFC 7208 3.3), or None."""
        records = self.lookup(name, "TXT")
        if records is None:
            return None
        out = [b"".join(r.strings) for r in records]  # type: ignore[attr-defined]
        total = sum(len(t) for t in out)
        if total > self.max_txt:
            raise OversizeAnswer(f"TXT answer for {name} is {total} octets (limit {self.max_txt})")
        return out

    def dkim_txt(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the first TXT record of a key name, or None."""
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        records = self.txt(text)
        if not records:
            return None
        return records[0]

    def spf_lookup(self, name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list[Any]:
        """pyspf's ``DNSLookup``: [((name, qtype), data), ...]; TempError on failures."""
        import spf

        try:
            if qtype in ("TXT", "SPF"):
                records = self.lookup(name, qtype)
                if records is None:
                    return []
                strings = [list(r.strings) for r in records]  # type: ignore[attr-defined]
                total = sum(len(s) for rec in strings for s in rec)
                if total > self.max_txt:
                    raise spf.PermError(f"TXT answer for {name} is {total} octets (limit {self.max_txt})")
                return [((name, qtype), rec) for rec in strings]
            records = self.lookup(name, qtype)
        except TempDNSError as e:
            raise spf.TempError(f"DNS {e}") from None
        out: list[Any] = []
        for r in records or ():
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), r.address))
            elif qtype == "MX":
                out.append(((name, qtype), (r.preference, r.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), r.target.to_text(True)))
        return out


_local = threading.local()


def install_spf_dns() -> None:
    """Route pyspf's module-level DNSLookup through the AuthDNS of the current thread.

    pyspf has one global lookup function; a thread-local dispatcher lets
    every check use its own resolver (and never the system one).
    """
    import spf

    if getattr(spf.DNSLookup, "_exmta", False):
        return

    def dispatch(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list[Any]:
        dns = getattr(_local, "dns", None)
        if dns is None:
            raise spf.TempError("no resolver configured for this SPF check")
        return dns.spf_lookup(name, qtype, strict, timeout)

    dispatch._exmta = True  # type: ignore[attr-defined]
    spf.DNSLookup = dispatch


class using_spf_dns:
    """Context manager: pyspf lookups on this thread go to ``dns``."""

    def __init__(self, dns: AuthDNS) -> None:
        self.dns = dns

    def __enter__(self) -> AuthDNS:
        install_spf_dns()
        self.previous = getattr(_local, "dns", None)
        _local.dns = self.dns
        return self.dns

    def __exit__(self, *exc: object) -> None:
        _local.dns = self.previous


def auth_dns_from_config(config: dict[str, Any], env: Any, where: str = "") -> AuthDNS:
    """Build an AuthDNS from a filter table's ``dns_servers`` / ``dns_timeout`` keys.

    ``dns_servers`` is a list of "ip" or "ip:port"; empty means the system
    resolver (/etc/resolv.conf). Errors name the key.
    """
    servers = config.get("dns_servers", [])
    if not isinstance(servers, (list, tuple)) or not all(isinstance(s, str) for s in servers):
        raise ValueError(f"{where}dns_servers must be a list of \"ip\" or \"ip:port\" strings")
    try:
        nameservers = parse_nameservers(list(servers))
    except ValueError as e:
        raise ValueError(f"{where}dns_servers: {e}") from None
    timeout = config.get("dns_timeout", 5.0)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 60:
        raise ValueError(f"{where}dns_timeout must be a number of seconds in (0, 60]")
    resolver = DNSResolver(env.reactor, env.threadpool, nameservers=nameservers or None, timeout=float(timeout))
    return AuthDNS(resolver, env.reactor, env.threadpool)
