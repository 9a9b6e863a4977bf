"""StaticRouter: Exchange address-space selection and per-destination grouping."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from exmta.config.schema import RouteConfig, SendConnectorConfig, SmartHost
from exmta.interfaces import IRouter
from exmta.model import Envelope, Recipient, Route
from exmta.routing import UNREACHABLE, StaticRouter

CONNECTORS = {
    "internet": SendConnectorConfig("internet"),  # MX routing
    "partner": SendConnectorConfig("partner"),
    "hub": SendConnectorConfig("hub", smarthosts=(SmartHost("hub.example.org"),)),
    "mailbox": SendConnectorConfig("mailbox", kind="lmtp", lmtp="unix:/run/lmtp"),
}


def env(*rcpts: str) -> Envelope:
    return Envelope(sender="a@example.org", recipients=[Recipient(r) for r in rcpts])


def test_provides_irouter() -> None:
    assert verifyObject(IRouter, StaticRouter([], ["internet"]))


def test_exact_beats_wildcard_beats_star() -> None:
    router = StaticRouter(
        [
            RouteConfig(("*",), "internet"),
            RouteConfig(("*.contoso.com",), "hub"),
            RouteConfig(("a.contoso.com",), "partner", cost=50),
        ],
        CONNECTORS,
    )
    assert router.choose("a.contoso.com") == "partner"
    assert router.choose("b.contoso.com") == "hub"
    assert router.choose("x.b.contoso.com") == "hub"
    assert router.choose("contoso.com") == "internet"  # *.contoso.com is subdomains only
    assert router.choose("fabrikam.com") == "internet"


def test_longer_wildcard_beats_shorter_and_cost_breaks_ties() -> None:
    router = StaticRouter(
        [
            RouteConfig(("*.contoso.com",), "internet", cost=1),
            RouteConfig(("*.eu.contoso.com",), "partner", cost=90),
            RouteConfig(("fabrikam.com",), "hub", cost=5),
            RouteConfig(("fabrikam.com",), "partner", cost=2),
            RouteConfig(("*",), "hub", cost=3),
            RouteConfig(("*",), "internet", cost=3),
        ],
        CONNECTORS,
    )
    assert router.choose("mail.eu.contoso.com") == "partner"
    assert router.choose("mail.us.contoso.com") == "internet"
    assert router.choose("fabrikam.com") == "partner"  # same specificity, lower cost
    assert router.choose("other.net") == "hub"  # same cost: alphabetical, not file order


def test_case_trailing_dot_and_smtp_prefix() -> None:
    router = StaticRouter([RouteConfig(("SMTP:Contoso.COM.",), "partner")], CONNECTORS)
    assert router.choose("CONTOSO.com.") == "partner"
    assert router.choose("contoso.org") is None


def test_groups_by_connector_and_domain_for_mx_connectors() -> None:
    router = StaticRouter(
        [RouteConfig(("*",), "internet"), RouteConfig(("*.corp.example",), "hub")], CONNECTORS,
    )
    routes = router.route(
        env(), ["a@x.net", "b@y.net", "c@X.NET", "d@a.corp.example", "e@b.corp.example"],
    )
    assert routes == [
        Route("internet", ("a@x.net", "c@X.NET"), "x.net"),
        Route("internet", ("b@y.net",), "y.net"),
        Route("hub", ("d@a.corp.example", "e@b.corp.example"), None),  # smart host: one destination
    ]


def test_local_connector_has_no_nexthop_and_accepts_recipient_objects() -> None:
    router = StaticRouter([RouteConfig(("example.org",), "mailbox")], CONNECTORS)
    routes = router.route(env(), [Recipient("u1@example.org"), Recipient("u2@Example.org")])
    assert routes == [Route("mailbox", ("u1@example.org", "u2@Example.org"), None)]


def test_names_only_groups_per_domain() -> None:
    router = StaticRouter([RouteConfig(("*",), "out")], ["out"])
    assert router.route(env(), ["a@x.net"]) == [Route("out", ("a@x.net",), "x.net")]


def test_unroutable_recipients_reported() -> None:
    router = StaticRouter([RouteConfig(("contoso.com",), "partner")], CONNECTORS)
    routes, unroutable = router.route_split(env(), ["a@contoso.com", "b@fabrikam.com", "nodomain"])
    assert routes == [Route("partner", ("a@contoso.com",), "contoso.com")]
    assert unroutable == ["b@fabrikam.com", "nodomain"]
    # through IRouter every recipient is still in exactly one Route
    assert router.route(env(), ["a@contoso.com", "b@fabrikam.com"]) == [
        Route("partner", ("a@contoso.com",), "contoso.com"),
        Route(UNREACHABLE, ("b@fabrikam.com",), None),
    ]


def test_no_routes_at_all() -> None:
    router = StaticRouter([], CONNECTORS)
    assert router.route(env(), ["a@b.c"]) == [Route(UNREACHABLE, ("a@b.c",), None)]
    assert router.route(env(), []) == []


def test_unknown_connector_is_rejected_naming_the_route() -> None:
    with pytest.raises(ValueError, match=r"route #2 \(\*\.contoso\.com -> nowhere\).*'nowhere'"):
        StaticRouter([RouteConfig(("*",), "internet"), RouteConfig(("*.contoso.com",), "nowhere")], CONNECTORS)


@pytest.mark.parametrize("bad", ["", "*contoso.com", "a.*.com", "user@contoso.com", "*.*"])
def test_bad_address_space_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="bad address space"):
        StaticRouter([RouteConfig((bad,), "internet")], CONNECTORS)


def test_route_without_domains_is_rejected() -> None:
    with pytest.raises(ValueError, match="no address spaces"):
        StaticRouter([RouteConfig((), "internet")], CONNECTORS)


def test_reserved_connector_name() -> None:
    with pytest.raises(ValueError, match="reserved"):
        StaticRouter([], [UNREACHABLE])


# ---------------------------------------------------------------- property: the choice is the most specific match

LABELS = st.sampled_from(["a", "b", "mail", "eu"])
DOMAINS = st.lists(LABELS, min_size=1, max_size=4).map(lambda ls: ".".join(ls) + ".example")
PATTERNS = st.one_of(st.just("*"), DOMAINS, DOMAINS.map(lambda d: "*." + d))


def _rank(pattern: str, domain: str) -> tuple[int, int] | None:
    if pattern == "*":
        return (0, 0)
    if pattern.startswith("*."):
        return (1, len(pattern)) if domain.endswith(pattern[1:]) else None
    return (2, 0) if pattern == domain else None


@given(
    table=st.lists(st.tuples(PATTERNS, st.integers(1, 3), st.sampled_from(["internet", "partner", "hub"])),
                   min_size=1, max_size=8),
    domain=DOMAINS,
)
def test_choice_is_most_specific_then_cheapest(table, domain) -> None:
    router = StaticRouter([RouteConfig((p,), c, cost) for p, cost, c in table], CONNECTORS)
    matches = [(_rank(p, domain), cost, c) for p, cost, c in table if _rank(p, domain) is not None]
    chosen = router.choose(domain)
    if not matches:
        assert chosen is None
        return
    best_rank = max(m[0] for m in matches)
    best_cost = min(m[1] for m in matches if m[0] == best_rank)
    assert chosen == min(m[2] for m in matches if m[0] == best_rank and m[1] == best_cost)
