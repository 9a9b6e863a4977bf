"""Routes that split one message by recipient set: the tenant's domains one way, the rest another.

Exchange Online's High Volume Email (HVE) accepts internal recipients only:
a message from an application to ``alice@contoso.com`` and
``bob@partner.example`` must go to the HVE endpoint for Alice and to the
internet (or the XOAUTH2 relay) for Bob. A route says so with two keys::

    [[route]]
    domains = ["*"]
    connector = "internet"            # every other recipient
    internal_connector = "hve"        # recipients of the tenant's accepted domains
    internal_domains = ["contoso.com", "*.contoso.com"]   # default: every [accepted_domains] entry

:class:`~exmta.routing.router.StaticRouter` picks the route as usual (the
most specific address space) and then sends the recipients whose domain is
in ``internal_domains`` to ``internal_connector``. The two sets become two
deliveries, each one SMTP transaction with its own recipients (the
scheduler groups recipients by connector and next hop), and
:func:`transfer_details` describes the split for the tracking log's
TRANSFER event ("recipients forked", as Exchange names it).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from exmta.config.reader import domain as _domain
from exmta.config.reader import list_of as _list_of
from exmta.config.reader import nonempty_string as _nonempty_str

__all__ = ["domain_matches", "read_split", "resolve_split", "transfer_details"]


def read_split(r: Any) -> dict[str, Any]:
    """``internal_connector`` and ``internal_domains`` of one ``[[route]]`` (exmta.config.load reader)."""
    out: dict[str, Any] = {
        "internal_connector": r.get("internal_connector", None, _nonempty_str),
        "internal_domains": r.get("internal_domains", (), _list_of(_domain)),
    }
    if out["internal_domains"] and out["internal_connector"] is None:
        r.error("internal_domains", "is only used with internal_connector")
    if "*" in out["internal_domains"]:
        r.error("internal_domains", "\"*\" would send every recipient to internal_connector; list the tenant's "
                "domains")
    if out["internal_connector"] is not None and out["internal_connector"] == r.table.get("connector"):
        r.error("internal_connector", "is the same as connector: nothing would be split")
    return out


def resolve_split(routes: Sequence[Any], accepted: Iterable[Any],
                  send_names: set[str]) -> tuple[tuple[Any, ...], list[str]]:
    """Routes with ``internal_domains`` filled from the accepted domains where empty, and the problems."""
    names = tuple(a.name for a in accepted)
    out, problems = [], []
    for i, route in enumerate(routes):
        if route.internal_connector is None:
            out.append(route)
            continue
        if route.internal_connector not in send_names:
            problems.append(f"route[{i + 1}].internal_connector: no [send.{route.internal_connector}] connector "
                            f"(defined: {', '.join(sorted(send_names)) or 'none'})")
        if not route.internal_domains:
            if not names:
                problems.append(f"route[{i + 1}].internal_domains: not set and there are no [accepted_domains] "
                                "to take them from")
            route = replace(route, internal_domains=names)
        out.append(route)
    return tuple(out), problems


def domain_matches(domain: str, patterns: Iterable[str]) -> bool:
    """``domain`` equals a pattern, or is under a ``*.pattern`` (AcceptedDomain's rule)."""
    d = domain.lower().rstrip(".")
    for p in patterns:
        if p.startswith("*."):
            if d.endswith(p[1:]) and len(d) > len(p) - 1:
                return True
        elif d == p:
            return True
    return False


def transfer_details(routes: Iterable[Any],
                     first_time: Mapping[str, bool]) -> tuple[tuple[str, ...], dict[str, Any]] | None:
    """(recipients, details) for a TRANSFER event when a split route forked this message's
    recipients into sets for different connectors; None otherwise. Only recipients routed for the
    first time count (``first_time``), so a retry does not log the fork again."""
    sets: dict[str, dict[str, list[str]]] = {}
    for route in routes:
        if not getattr(route, "split", None):
            continue
        rcpts = [a for a in route.recipients if first_time.get(a)]
        if rcpts:
            sets.setdefault(route.split, {}).setdefault(route.connector, []).extend(rcpts)
    forks = {label: by_connector for label, by_connector in sets.items() if len(by_connector) > 1}
    if not forks:
        return None
    recipients = tuple(a for by_connector in forks.values() for rcpts in by_connector.values() for a in rcpts)
    details = {"split": sorted(forks), "recipient_sets": {c: r for f in forks.values() for c, r in f.items()}}
    return recipients, details
