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

A route with ``internal_connector`` splits its recipients by set: those
whose domain is in its ``internal_domains`` go to ``internal_connector``
(see :mod:`exmta.routing.split`); their Routes carry the ``split`` label.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from zope.interface import implementer

from exmta.config.schema import RouteConfig, SendConnectorConfig
from exmta.interfaces import IRouter
from exmta.model import Address, Envelope, Recipient, Route
from exmta.routing.split import domain_matches

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
        table: list[tuple[str, int, str, int]] = []
        #: route index -> (internal connector, its domains, label): routes that split (exmta.routing.split)
        self._internal: dict[int, tuple[str, tuple[str, ...], str]] = {}
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
                table.append((p, rc.cost, rc.connector, i))
            internal = getattr(rc, "internal_connector", None)
            if internal is not None:
                if internal not in names:
                    raise ValueError(f"{label}: unknown internal send connector {internal!r}")
                patterns = tuple(_normalise(d) for d in rc.internal_domains)
                self._internal[i] = (internal, patterns, f"route[{i + 1}]")
        self._table = tuple(table)

    def choose(self, domain: str) -> str | None:
        """The connector for one domain, or None when no route matches."""
        chosen = self._choose(domain)
        return chosen[0] if chosen else None

    def _choose(self, domain: str) -> tuple[str, int] | None:
        """(connector, route index) of the best route for ``domain``, or None."""
        d = domain.lower().rstrip(".")
        if not d:
            return None
        candidates = []
        for pattern, cost, connector, index in self._table:
            spec = _specificity(pattern, d)
            if spec is not None:
                candidates.append((-spec[0], -spec[1], cost, connector, index))
        if not candidates:
            return None
        # most specific first, then the lower cost, then the name
        best = min(candidates)
        return best[3], best[4]

    def route_split(self, envelope: Envelope, recipients: Iterable[str | Recipient]) -> tuple[list[Route], list[str]]:
        """-> (routes, unroutable recipients), preserving recipient order within each route."""
        groups: dict[tuple[str, str | None, str | None], list[str]] = {}
        unroutable: list[str] = []
        forced = getattr(envelope, "route_connector", None)  # a transport rule's RouteMessageOutboundConnector
        for item in recipients:
            rcpt = item if isinstance(item, str) else item.address  # str or model.Recipient
            domain = Address.parse_simple(rcpt).domain_key
            chosen = self._choose(domain)
            if forced:  # a transport rule's RouteMessageOutboundConnector wins over the address spaces
                chosen = (forced, None)
            if chosen is None:
                unroutable.append(rcpt)
                continue
            connector, index = chosen
            split = None
            if index in self._internal:  # the tenant's domains to the internal connector (HVE)
                internal, patterns, split = self._internal[index]
                if domain_matches(domain, patterns):
                    connector = internal
            nexthop = domain if connector in self._by_domain else None
            groups.setdefault((connector, nexthop, split), []).append(rcpt)
        routes = [Route(c, tuple(r), n, s) for (c, n, s), r in groups.items()]
        return routes, unroutable

    def route(self, envelope: Envelope, recipients: Iterable[str | Recipient]) -> list[Route]:
        """IRouter: every recipient in exactly one Route; unmatched ones under UNREACHABLE."""
        routes, unroutable = self.route_split(envelope, recipients)
        if unroutable:
            routes.append(Route(UNREACHABLE, tuple(unroutable), None))
        return routes


__all__ = ["StaticRouter", "UNREACHABLE"]
