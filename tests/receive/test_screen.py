"""exmta.receive.screen and exmta.receive.dnslists: DNS lists and the greet pause, on StringTransport and a Clock."""
from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from exmta.config.load import ConfigError, parse_config
from exmta.receive.dnslists import ListAnswer, code_matcher, decide, query_name, sanitize_txt
from exmta.receive.proxy import ProxyHeaderFactory
from exmta.receive.screen import ListCache
from exmta.routing.dns import DNSTemporaryError
from exmta.model import Reply
from support.receive_harness import Harness, lose

EP = "tcp:2525:interface=127.0.0.1"
BLOCKED = b"554 5.7.1 Service unavailable; client [192.0.2.2] blocked using zen.example\r\n"


class FakeDNS:
    """The lists' zones: (name, rdtype) -> (records, ttl); a missing name is NXDOMAIN (negative TTL None)."""

    def __init__(self, records: dict[tuple[str, str], Any] | None = None) -> None:
        self.records = dict(records or {})
        self.queries: list[tuple[str, str]] = []
        self.hold: set[str] = set()           # zone suffixes whose queries never answer

    def __call__(self, name: str, rdtype: str) -> Deferred:
        self.queries.append((name, rdtype))
        if any(name.endswith(suffix) for suffix in self.hold):
            return Deferred()
        value = self.records.get((name, rdtype), ((), None))
        if isinstance(value, Exception):
            return fail(value)
        return succeed(value)


class Events:
    def __init__(self) -> None:
        self.events: list[Any] = []
        self.screened: list[tuple[str, str]] = []

    def track(self, event: Any) -> None:
        self.events.append(event)

    def connection_screened(self, connector: str, outcome: str) -> None:
        self.screened.append((connector, outcome))


LISTS = {
    "zen": {"zone": "zen.example", "codes": ["127.0.0.[2..11]"]},
    "bl2": {"zone": "bl2.example", "weight": 1},
    "hard": {"zone": "hard.example", "action": "reject", "txt": True},
    "dnswl": {"zone": "dnswl.example", "action": "allow"},
    "neg": {"zone": "neg.example", "weight": -1},
}


def config(sites=("zen",), threshold=1, **receive: Any):
    return parse_config({
        "server": {"hostname": "mx.test"},
        "accepted_domains": {"local.test": "authoritative"},
        "receive": {
            "internet": {"listen": [EP], "hostname": "in.test", "banner": "internet", "dnsbl_sites": list(sites),
                         **receive},
            "apps": {"listen": [EP], "hostname": "apps.test", "banner": "apps", "remote_ranges": ["127.0.0.2/32"],
                     "relay_networks": ["127.0.0.2"], "dnsbl_sites": list(sites), **receive},
        },
        "connection_filter": {"threshold": threshold, "timeout": "3s", "lists": LISTS},
    })


def harness(dns: FakeDNS, cfg: Any = None) -> tuple[Harness, Events]:
    h = Harness(cfg or config())
    events = Events()
    for f in h.factories:
        f.tracker = events
        f.session_observer = events
    h.dispatchers[EP].entries[0].factory.screen.lookup = dns
    return h, events


def listed(*names: str, code: str = "127.0.0.2", ttl: float = 60.0) -> dict[tuple[str, str], Any]:
    return {(n, "A"): ((code,), ttl) for n in names}


# ---------------------------------------------------------------- the pure parts


def test_query_names_reverse_octets_and_nibbles():
    assert query_name("192.0.2.99", "zen.example") == "99.2.0.192.zen.example"
    assert query_name("::ffff:192.0.2.99", "zen.example.") == "99.2.0.192.zen.example"
    assert query_name("2001:db8::1", "v6.example") == "1." + "0." * 23 + "8.b.d.0.1.0.0.2.v6.example"
    assert query_name("not an ip", "zen.example") is None


def test_code_patterns_cidrs_exclusions_and_bitmasks():
    m = code_matcher(["127.0.0.[2..4;10]", "127.1.0.0/16", "!127.1.0.5"])
    assert [m(c) for c in ("127.0.0.2", "127.0.0.4", "127.0.0.5", "127.0.0.10", "127.1.2.3", "127.1.0.5")] == \
        [True, True, False, True, True, False]
    default = code_matcher([])
    assert default("127.0.0.2") and default("127.0.10.3") and not default("127.255.255.254")
    assert not default("10.0.0.2") and not default("garbage")
    mask = code_matcher([], bitmask=4)
    assert mask("127.0.0.4") and mask("127.0.0.6") and not mask("127.0.0.2")
    for bad in ("127.0.0.[9..2]", "127.0.0.[300]", "127.0.[1]", "x.y", "127.0.0.0/40"):
        with pytest.raises(ValueError):
            code_matcher([bad])


def test_decide_allow_reject_and_score():
    block = ListAnswer("zen", "score", 2, listed=True)
    other = ListAnswer("bl2", "score", 1, listed=True)
    allow = ListAnswer("dnswl", "allow", 1, listed=True)
    assert decide([block, other], 3).reject and decide([block, other], 3).decided_by == ("zen", "bl2")
    assert not decide([block], 3).reject
    assert not decide([block, other, allow], 1).reject and decide([block, allow], 1).decided_by == ("dnswl",)
    assert decide([ListAnswer("hard", "reject", listed=True, txt="see x")], 100).txt == "see x"
    assert not decide([block, ListAnswer("neg", "score", -1, listed=True)], 2).reject
    assert not decide([ListAnswer("zen", "score", 5, error="timeout")], 1).reject


def test_txt_is_sanitised_and_bounded():
    assert sanitize_txt("Listed\r\n by\x00 us \u00e9 https://x/y") == "Listed by us https://x/y"
    assert len(sanitize_txt("a" * 1000)) == 200


def test_cache_keeps_answers_for_their_ttl_and_is_bounded():
    clock = Clock()
    cache = ListCache(clock, size=2)
    cache.put(("a", "A"), ("127.0.0.2",), 10)
    cache.put(("b", "A"), (), 100)
    assert cache.get(("a", "A")) == ("127.0.0.2",)
    cache.put(("c", "A"), (), 100)       # "b" is the least recently used
    assert cache.get(("b", "A")) is None and len(cache) == 2
    clock.advance(10)
    assert cache.get(("a", "A")) is None and cache.get(("c", "A")) == ()
    cache.put(("d", "A"), (), 0)          # a zero TTL is not kept
    assert cache.get(("d", "A")) is None


# ---------------------------------------------------------------- DNS lists on connections


def test_listed_client_gets_554_naming_the_list_then_503_until_quit():
    dns = FakeDNS(listed("2.2.0.192.zen.example"))
    h, ev = harness(dns)
    t, p = h.connect("192.0.2.2")
    assert t.value() == BLOCKED
    assert h.say(t, p, b"EHLO x\r\n") == \
        b"503 5.5.1 Bad sequence of commands: this connection was refused, send QUIT\r\n"
    assert h.say(t, p, b"QUIT\r\n") == b"221 2.0.0 Bye\r\n" and t.disconnecting
    event, = ev.events
    assert event.event_id.value == "REJECT" and event.connector == "internet" and event.remote_host == "192.0.2.2"
    assert event.details["check"] == "dnsbl" and event.details["lists"] == "zen.example"
    assert "listed in zen.example" in event.details["reason"] and event.reply.startswith("554 5.7.1")
    assert ("internet", "listed") in ev.screened


def test_refused_client_that_never_quits_is_closed():
    h, _ = harness(FakeDNS(listed("2.2.0.192.zen.example")))
    t, p = h.connect("192.0.2.2")
    for _ in range(5):
        p.dataReceived(b"NOOP\r\n")
    assert t.disconnecting
    t, p = h.connect("192.0.2.2")
    h.clock.advance(30)
    assert t.disconnecting


def test_unlisted_client_gets_the_session_and_a_return_code_outside_codes_does_not_count():
    dns = FakeDNS(listed("3.2.0.192.zen.example", code="127.0.0.12"))
    h, ev = harness(dns)
    t, p = h.connect("192.0.2.3")
    assert t.value() == b"220 in.test internet\r\n"
    assert h.say(t, p, b"EHLO c\r\n").startswith(b"250-in.test")
    assert ev.screened == [("internet", "passed")] and not ev.events


def test_allow_list_wins_over_a_block_list():
    dns = FakeDNS(listed("2.2.0.192.zen.example", "2.2.0.192.dnswl.example"))
    h, ev = harness(dns, config(sites=("zen", "dnswl")))
    t, _ = h.connect("192.0.2.2")
    assert t.value() == b"220 in.test internet\r\n"
    assert ev.screened == [("internet", "allowed")]


def test_weights_add_up_to_the_threshold_and_the_reply_names_each_list():
    dns = FakeDNS(listed("2.2.0.192.zen.example", "2.2.0.192.bl2.example", "3.2.0.192.zen.example"))
    h, _ = harness(dns, config(sites=("zen", "bl2", "neg"), threshold=2))
    assert h.connect("192.0.2.3")[0].value().startswith(b"220 ")  # one list: score 1
    t, _ = h.connect("192.0.2.2")
    assert t.value() == b"554 5.7.1 Service unavailable; client [192.0.2.2] blocked using zen.example, " \
                        b"bl2.example\r\n"


def test_direct_reject_list_with_its_txt_record():
    dns = FakeDNS({**listed("2.2.0.192.hard.example"),
                   ("2.2.0.192.hard.example", "TXT"): (("Listed\r\nsee https://hard.example/q?2.2.0.192",), 60)})
    h, _ = harness(dns, config(sites=("hard",)))
    t, _ = h.connect("192.0.2.2")
    assert t.value() == b"554 5.7.1 Service unavailable; client [192.0.2.2] blocked using hard.example; " \
                        b"Listed see https://hard.example/q?2.2.0.192\r\n"


def test_dns_failures_never_refuse_and_are_counted():
    dns = FakeDNS({("2.2.0.192.zen.example", "A"): DNSTemporaryError(Reply.make(451, "4.4.3", "DNS server failure"))})
    h, ev = harness(dns)
    t, _ = h.connect("192.0.2.2")
    assert t.value() == b"220 in.test internet\r\n"
    assert ("internet", "dns_error") in ev.screened and not ev.events


def test_a_list_that_never_answers_holds_the_greeting_at_most_the_timeout():
    dns = FakeDNS(listed("2.2.0.192.bl2.example"))
    dns.hold.add("zen.example")
    h, ev = harness(dns, config(sites=("zen", "bl2"), threshold=2))
    t, p = h.connect("192.0.2.2")
    assert t.value() == b""
    p.dataReceived(b"EHLO early\r\n")  # no greet pause here: kept for the session
    h.clock.advance(3.9)
    assert t.value() == b""
    h.clock.advance(0.2)
    assert t.value().startswith(b"220 in.test internet\r\n250-in.test")
    assert ("internet", "dns_timeout") in ev.screened


def test_answers_are_cached_for_their_ttl():
    dns = FakeDNS(listed("2.2.0.192.zen.example", ttl=120))
    h, _ = harness(dns)
    for _ in range(3):
        assert h.connect("192.0.2.2")[0].value() == BLOCKED
        assert h.connect("192.0.2.3")[0].value().startswith(b"220 ")  # NXDOMAIN: the negative TTL (300s)
    assert dns.queries == [("2.2.0.192.zen.example", "A"), ("3.2.0.192.zen.example", "A")]
    h.clock.advance(120)
    h.connect("192.0.2.2")
    h.connect("192.0.2.3")
    assert len(dns.queries) == 3
    h.clock.advance(180)
    h.connect("192.0.2.3")
    assert len(dns.queries) == 4


def test_relay_networks_and_exempt_ranges_are_not_screened():
    dns = FakeDNS(listed("2.0.0.127.zen.example", "7.2.0.192.zen.example"))
    h, _ = harness(dns, config(connection_filter_exempt=["192.0.2.0/29"], greet_pause="2s"))
    assert h.connect("127.0.0.2")[0].value() == b"220 apps.test apps\r\n"
    assert h.connect("192.0.2.7")[0].value() == b"220 in.test internet\r\n"
    assert dns.queries == []


# ---------------------------------------------------------------- the greet pause


def test_an_early_talker_gets_521_and_is_disconnected():
    h, ev = harness(FakeDNS(), config(sites=(), greet_pause="1s"))
    t, p = h.connect("192.0.2.9")
    h.clock.advance(0.5)
    assert t.value() == b""
    p.dataReceived(b"EHLO hasty\r\n")
    assert t.value() == b"521 5.5.1 Protocol error: talking before the greeting\r\n" and t.disconnecting
    h.clock.advance(1)
    assert t.value() == b"521 5.5.1 Protocol error: talking before the greeting\r\n"
    event, = ev.events
    assert event.details["check"] == "pregreet" and ev.screened == [("internet", "pregreet")]
    lose(t, p)


def test_a_patient_client_gets_the_greeting_after_the_pause():
    h, ev = harness(FakeDNS(), config(sites=(), greet_pause="1s"))
    t, p = h.connect("192.0.2.9")
    h.clock.advance(0.999)
    assert t.value() == b""
    h.clock.advance(0.001)
    assert t.value() == b"220 in.test internet\r\n"
    assert h.say(t, p, b"EHLO patient\r\n").startswith(b"250-in.test")
    assert ev.screened == [("internet", "passed")]


def test_the_greeting_waits_for_the_pause_and_the_lists_together():
    dns = FakeDNS(listed("2.2.0.192.zen.example"))
    h, _ = harness(dns, config(greet_pause="1s"))
    t, p = h.connect("192.0.2.2")
    assert t.value() == b""  # the list answered at once, the pause still runs
    h.clock.advance(1)
    assert t.value() == BLOCKED


def proxied(h: Harness) -> tuple[StringTransport, Any]:
    factory = ProxyHeaderFactory(h.dispatchers[EP])
    addr = IPv4Address("TCP", "127.0.0.1", 5000)  # the proxy (inside relay_networks of "apps" too)
    proto = factory.buildProtocol(addr)
    t = StringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
    proto.makeConnection(t)
    return t, proto


def test_behind_proxy_protocol_the_pause_starts_after_the_header():
    dns = FakeDNS(listed("2.2.0.192.zen.example"))
    h, _ = harness(dns, config(greet_pause="1s"))
    t, p = proxied(h)
    p.dataReceived(b"PROXY TCP4 192.0.2.3 127.0.0.1 40000 25\r\n")  # the header is not early talk
    assert t.value() == b""
    h.clock.advance(1)
    assert t.value() == b"220 in.test internet\r\n"
    t, p = proxied(h)
    p.dataReceived(b"PROXY TCP4 192.0.2.3 127.0.0.1 40000 25\r\nEHLO hasty\r\n")  # early talk after the header
    assert t.value().startswith(b"521 5.5.1") and t.disconnecting
    t, p = proxied(h)
    p.dataReceived(b"PROXY TCP4 192.0.2.2 127.0.0.1 40000 25\r\n")  # the real client is the one judged
    h.clock.advance(1)
    assert t.value() == BLOCKED
    t, p = proxied(h)
    p.dataReceived(b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 25\r\n")  # a relay client: never screened
    assert t.value() == b"220 apps.test apps\r\n"


def test_a_reload_turns_screening_on_for_the_next_connection():
    from exmta.observe.reload import ConfigReloader

    dns = FakeDNS(listed("2.2.0.192.zen.example"))
    h, _ = harness(dns, config(sites=()))
    assert h.connect("192.0.2.2")[0].value() == b"220 in.test internet\r\n"
    reloader = ConfigReloader(h.config, h.clock, factories={rc.name: f for rc, f in zip(h.config.receive,
                                                                                         h.factories)})
    reloader.apply(config(greet_pause="1s"))
    t, _ = h.connect("192.0.2.2")
    h.clock.advance(1)
    assert t.value() == BLOCKED


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("receive,cf,problem", [
    ({"dnsbl_sites": ["nope"]}, {}, "receive.r.dnsbl_sites: no [connection_filter.lists.nope] section"),
    ({"greet_pause": "2m"}, {}, "receive.r.greet_pause: must be at most 60s"),
    ({}, {"lists": {"x": {"zone": "x.example", "codes": ["127.0.0.[5..1]"]}}}, "connection_filter.lists.x.codes"),
    ({}, {"lists": {"x": {"codes": []}}}, "connection_filter.lists.x.zone: is required"),
    ({}, {"lists": {"x": {"zone": "x.example", "action": "block"}}}, "connection_filter.lists.x.action"),
    ({}, {"lists": {"x": {"zone": "x.example", "colour": 1}}}, "connection_filter.lists.x.colour: unknown"),
    ({}, {"timeout": "0s"}, "connection_filter.timeout: must be more than 0"),
    ({}, {"dns_servers": ["dns.example"]}, "connection_filter.dns_servers"),
])
def test_check_config_refuses(receive, cf, problem):
    with pytest.raises(ConfigError) as e:
        parse_config({"receive": {"r": receive}, "connection_filter": cf})
    assert any(problem in p for p in e.value.problems), e.value.problems


def test_check_config_refuses_screening_on_implicit_tls(tmp_path):
    from support.tlscerts import TestPKI

    cert = TestPKI(tmp_path / "pki").server("mx.example.test")
    tls = {"cert": str(cert.cert), "key": str(cert.key), "implicit": True}
    with pytest.raises(ConfigError) as e:
        parse_config({"receive": {"r": {"greet_pause": "1s", "tls": tls}}})
    assert any("implicit TLS (the client speaks first)" in p for p in e.value.problems), e.value.problems
    assert parse_config({"receive": {"r": {"tls": tls}}}).receive[0].connection_filter is None


def test_ipv6_clients_are_looked_up_by_nibbles():
    name = query_name("2001:db8::7", "zen.example")
    h, _ = harness(FakeDNS(listed(name)))
    t, _ = h.connect("2001:db8::7")
    assert t.value() == b"554 5.7.1 Service unavailable; client [2001:db8::7] blocked using zen.example\r\n"


def test_a_client_gone_before_the_answers_is_forgotten():
    dns = FakeDNS()
    dns.hold.add("zen.example")
    h, ev = harness(dns, config(greet_pause="1s"))
    t, p = h.connect("192.0.2.2")
    lose(t, p)
    h.clock.advance(10)
    assert t.value() == b"" and ev.screened == [] and not h.clock.getDelayedCalls()


def test_the_protocol_log_names_the_list_that_decided():
    records: list[tuple[str, Any]] = []

    class Transcript:
        def record(self, event: str, **fields: Any) -> None:
            records.append((event, fields))

        def reply(self, reply: Reply) -> None:
            records.append(("reply", str(reply)))

        def end(self, reason: str | None = None) -> None:
            records.append(("disconnect", reason))

    class Log:
        def for_transport(self, transport: Any) -> Transcript:
            return Transcript()

    h, _ = harness(FakeDNS(listed("2.2.0.192.zen.example")))
    h.factories[0].protocol_log = Log()
    h.connect("192.0.2.2")
    assert records[0][0] == "connect" and records[1] == ("reply", BLOCKED.decode().strip())
    assert records[2] == ("disconnect", "connection filter: listed in zen.example (score 1, threshold 1)")


def test_outcomes_reach_the_metrics_also_from_a_receive_worker():
    from exmta.observe.metrics import Metrics
    from exmta.observe.worker_metrics import WorkerRelay, dispatch

    metrics = Metrics(Clock())
    lines: list[bytes] = []
    WorkerRelay(lines.append).connection_screened("internet", "dns_timeout")
    dispatch(lines[0], metrics, [])
    metrics.connection_screened("internet", "listed")
    assert metrics.registry.get_sample_value(
        "exmta_connection_filter_total", {"connector": "internet", "outcome": "dns_timeout"}) == 1
    assert metrics.registry.get_sample_value(
        "exmta_connection_filter_total", {"connector": "internet", "outcome": "listed"}) == 1
