"""Static address-space routing, the way Exchange picks a send connector.

Each :class:`~exmta.config.schema.RouteConfig` gives address spaces
(``example.com``, ``*.example.com`` or ``*``), a connector and a cost. For
every recipient domain the most specific matching address space wins:

1. an exact domain beats any wildcard;
2. a longer wildcard beats a shorter one (``*.a.example.com`` beats
   ``*.example.com``), and ``*`` comes last;
3. among equally specific matches the lower cost wins, then the connector
   name (alphabetically), so the choice never depends on file order.

``*.example.com`` matches subdomains of example.com, not example.com itself,
as :class:`~exmta.config.schema.AcceptedDomain` does. Domains are compared
in lower case without a trailing dot. Internationalised domains are
compared as written (U-labels and A-labels are not converted).

A recipient that no route matches (or that has no domain) goes into a
:class:`~exmta.model.Route` whose connector is :data:`UNREACHABLE`, named
after Exchange's Unreachable queue; the scheduler fails those recipients
with ``550 5.4.4``. :meth:`StaticRouter.route_split` returns them
separately instead.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from zope.interface import implementer

from exmta.config.schema import RouteConfig, SendConnectorConfig
from exmta.interfaces import IRouter
from exmta.model import Address, Envelope, Recipient, Route

#: Connector name of the Route holding recipients that no route matches.
UNREACHABLE = "Unreachable"


def _normalise(pattern: str) -> str:
    p = pattern.strip().lower().rstrip(".")
    if p.lower().startswith("smtp:"):  # Exchange's "SMTP:domain" address-space form
        p = p[5:]
    return p


def _specificity(pattern: str, domain: str) -> tuple[int, int] | None:
    """How well ``pattern`` matches ``domain``: larger is more specific, None = no match."""
    if pattern == "*":
        return (0, 0)
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        if domain.endswith(suffix) and len(domain) > len(suffix):
            return (1, len(suffix))
        return None
    if pattern == domain:
        return (2, len(pattern))
    return None


def _valid_pattern(pattern: str) -> bool:
    if pattern == "*":
        return True
    body = pattern[2:] if pattern.startswith("*.") else pattern
    return bool(body) and "*" not in body and "@" not in body and " " not in body


@implementer(IRouter)
class StaticRouter:
    """IRouter over a fixed list of routes (immutable; build a new one on reload).

    ``known_connectors`` is either a mapping of connector name to
    :class:`SendConnectorConfig` or just the connector names. With configs,
    recipients of an SMTP connector without smart hosts (MX routing) are
    grouped per recipient domain and the Route's ``nexthop`` is that domain;
    recipients of smart-host, LMTP and Maildir connectors share one Route
    per connector with ``nexthop`` None (one destination). With bare names
    every connector is treated as MX-routed (grouping per domain), which is
    never wrong, only less batched.
    """

    def __init__(
        self,
        routes: Sequence[RouteConfig],
        known_connectors: Mapping[str, SendConnectorConfig] | Iterable[str],
    ) -> None:
        if isinstance(known_connectors, Mapping):
            configs: Mapping[str, SendConnectorConfig] = dict(known_connectors)
            names = set(configs)
            self._by_domain = {
                name for name, c in configs.items()
                if not isinstance(c, SendConnectorConfig) or (c.kind == "smtp" and not c.smarthosts)
            }
        else:
            names = set(known_connectors)
            self._by_domain = set(names)
        if UNREACHABLE in names:
            raise ValueError(f"{UNREACHABLE!r} is reserved and cannot name a send connector")
        table: list[tuple[str, int, str]] = []
        for i, rc in enumerate(routes):
            label = f"route #{i + 1} ({', '.join(rc.domains) or 'no domains'} -> {rc.connector})"
            if rc.connector not in names:
                known = ", ".join(sorted(names)) or "none"
                raise ValueError(f"{label}: unknown send connector {rc.connector!r} (known: {known})")
            if not rc.domains:
                raise ValueError(f"{label}: no address spaces")
            for d in rc.domains:
                p = _normalise(d)
                if not _valid_pattern(p):
                    raise ValueError(f"{label}: bad address space {d!r}")
                table.append((p, rc.cost, rc.connector))
        self._table = tuple(table)

    def choose(self, domain: str) -> str | None:
        """The connector for one domain, or None when no route matches."""
        d = domain.lower().rstrip(".")
        if not d:
            return None
        candidates = []
        for pattern, cost, connector in self._table:
            spec = _specificity(pattern, d)
            if spec is not None:
                candidates.append((-spec[0], -spec[1], cost, connector))
        # most specific first, then the lower cost, then the name
        return min(candidates)[3] if candidates else None

    def route_split(self, envelope: Envelope, recipients: Iterable[str | Recipient]) -> tuple[list[Route], list[str]]:
        """-> (routes, unroutable recipients), preserving recipient order within each route."""
        groups: dict[tuple[str, str | None], list[str]] = {}
        unroutable: list[str] = []
        forced = getattr(envelope, "route_connector", None)  # a transport rule's RouteMessageOutboundConnector
        for item in recipients:
            rcpt = item if isinstance(item, str) else item.address  # str or model.Recipient
            domain = Address.parse_simple(rcpt).domain_key
            connector = forced or self.choose(domain)
            if connector is None:
                unroutable.append(rcpt)
                continue
            nexthop = domain if connector in self._by_domain else None
            groups.setdefault((connector, nexthop), []).append(rcpt)
        routes = [Route(c, tuple(r), n) for (c, n), r in groups.items()]
        return routes, unroutable

    def route(self, envelope: Envelope, recipients: Iterable[str | Recipient]) -> list[Route]:
        """IRouter: every recipient in exactly one Route; unmatched ones under UNREACHABLE."""
        routes, unroutable = self.route_split(envelope, recipients)
        if unroutable:
            routes.append(Route(UNREACHABLE, tuple(unroutable), None))
        return routes


__all__ = ["StaticRouter", "UNREACHABLE"]
