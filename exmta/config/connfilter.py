"""Reading connection filtering: ``[connection_filter]`` and the per-connector keys.

``[connection_filter]`` holds the DNS lists (``[connection_filter.lists.NAME]``)
and how they are queried; a receive connector names the lists it checks in
``dnsbl_sites`` and may delay its greeting with ``greet_pause``. Each
connector's config gets its own resolved :class:`ConnectionFilterConfig` (only
its lists), so a reload that changes a list reaches the connector like any
other setting. Called from :mod:`exmta.config.load`; meaning: docs/connection-filtering.rst.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from exmta.config import reader

__all__ = ["ConnectionFilterConfig", "DNSListConfig", "read_connection_filter", "receive_kwargs"]

ACTIONS = ("score", "reject", "allow")


@dataclass(frozen=True)
class DNSListConfig:
    """One DNS list (Exchange: an IP Block/Allow List provider; Postfix: a postscreen_dnsbl_sites entry)."""

    name: str
    zone: str
    codes: tuple[str, ...] = ()           # return codes that count; () = any 127/8 but 127.255.255/24
    bitmask: int = 0                      # Exchange bitmask match on the last octet; 0 = off
    action: str = "score"                 # "score" (add weight) | "reject" (at once) | "allow" (let through)
    weight: int = 1                       # for "score": negative weights are allow lists (postscreen)
    display: str = ""                     # the name in replies and logs (default: the zone)
    txt: bool = False                     # add the listing's TXT record to the reply

    @property
    def label(self) -> str:
        return self.display or self.zone


@dataclass(frozen=True)
class ConnectionFilterConfig:
    """How one connector checks DNS lists: the lists and the shared lookup settings."""

    lists: tuple[DNSListConfig, ...] = ()
    threshold: int = 1                    # postscreen_dnsbl_threshold
    dns_servers: tuple[str, ...] = ()     # "ip" or "ip:port"; empty = the system resolver
    timeout: float = 5.0                  # all lookups of one connection together
    cache_size: int = 10000               # answers kept (bounded LRU)
    max_cache_ttl: float = 3600.0         # a record's TTL is used up to this
    negative_ttl: float = 300.0           # NXDOMAIN without an SOA minimum to go by


def receive_kwargs(r: Any, d: Any) -> dict[str, Any]:
    """The connection filtering keys of one ``[receive.NAME]`` table (lists resolved later)."""
    out = {
        "greet_pause": r.get("greet_pause", d.greet_pause, reader.parse_duration),
        "dnsbl_sites": r.get("dnsbl_sites", d.dnsbl_sites, reader.list_of(reader.nonempty_string)),
        "connection_filter_exempt": r.get("connection_filter_exempt", d.connection_filter_exempt,
                                          reader.list_of(reader.cidr)),
    }
    if out["greet_pause"] > 60:
        r.error("greet_pause", "must be at most 60s (clients wait about 5 minutes for a greeting; postscreen uses 6s)")
    return out


def _read_list(r: Any, name: str) -> DNSListConfig | None:
    from exmta.receive.dnslists import code_matcher

    zone = r.get("zone", "", reader.domain)
    item = DNSListConfig(
        name=name, zone=zone,
        codes=r.get("codes", (), reader.list_of(reader.nonempty_string)),
        bitmask=r.get("bitmask", 0, reader.integer(0, 255)),
        action=r.get("action", "score", reader.choice(*ACTIONS)),
        weight=r.get("weight", 1, _weight),
        display=r.get("display", "", reader.string),
        txt=r.get("txt", False, reader.boolean),
    )
    r.finish()
    if not zone:
        r.error("zone", "is required: the list's DNS zone, e.g. \"zen.spamhaus.org\"")
        return None
    if zone.startswith("*"):
        r.error("zone", "must be a DNS zone, not a pattern")
    try:
        code_matcher(item.codes, item.bitmask)
    except ValueError as e:
        r.error("codes", str(e))
    if item.display and item.display != " ".join(item.display.split()) or not item.display.isascii():
        r.error("display", "must be printable ASCII on one line (it is sent in SMTP replies)")
    return item


def _weight(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected a whole number (negative for an allow list), not {v!r}")
    if not -100 <= v <= 100:
        raise ValueError("must be between -100 and 100")
    return v


def read_connection_filter(r: Any, receive: list[Any]) -> list[Any]:
    """Read ``[connection_filter]`` and give each connector its lists; problems go to ``r``."""
    from exmta.routing.dns import parse_nameservers

    servers = r.get("dns_servers", (), reader.list_of(reader.nameserver))
    try:
        parse_nameservers(servers)
    except ValueError as e:
        r.error("dns_servers", str(e))
    base = ConnectionFilterConfig(
        threshold=r.get("threshold", 1, reader.integer(1, 1000)),
        dns_servers=servers,
        timeout=r.get("timeout", 5.0, reader.parse_duration),
        cache_size=r.get("cache_size", 10000, reader.integer(0, 10_000_000)),
        max_cache_ttl=r.get("max_cache_ttl", 3600.0, reader.parse_duration),
        negative_ttl=r.get("negative_ttl", 300.0, reader.parse_duration),
    )
    if not 0 < base.timeout <= 60:
        r.error("timeout", "must be more than 0 and at most 60s (the greeting waits for it)")
    lists: dict[str, DNSListConfig] = {}
    ls = r.sub("lists")
    for name in list(ls.table):
        ls.used.add(name)
        item = _read_list(ls.sub(name), name)
        if item is not None:
            lists[name] = item
    r.finish()
    out = []
    for rc in receive:
        missing = [n for n in rc.dnsbl_sites if n not in lists]
        if missing:
            r.problems.append(f"receive.{rc.name}.dnsbl_sites: no [connection_filter.lists.{missing[0]}] section "
                              f"(defined: {', '.join(sorted(lists)) or 'none'})")
        chosen = tuple(lists[n] for n in rc.dnsbl_sites if n in lists)
        if (chosen or rc.greet_pause) and _implicit_tls(rc):
            r.problems.append(f"receive.{rc.name}: dnsbl_sites and greet_pause are for connectors where the "
                              "server speaks first; this one uses implicit TLS (the client speaks first)")
        out.append(replace(rc, connection_filter=replace(base, lists=chosen) if chosen else None))
    return out


def _implicit_tls(rc: Any) -> bool:
    tls = getattr(rc, "tls", None)
    return bool(getattr(tls, "implicit", False)) or any(e.startswith(("ssl:", "haproxy:ssl:")) for e in rc.listen)
