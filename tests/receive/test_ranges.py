"""exmta.receive.ranges: most specific range wins, refusals at connect, connection limits, PROXY headers."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from exmta.config.load import parse_config
from exmta.receive.proxy import ProxyHeaderFactory
from exmta.receive.ranges import (
    ConnectionCounter, ConnectorEntry, DispatchingFactory, best_prefix, group_listeners,
    parse_ip, parse_ranges, select_connector,
)
from support.receive_harness import Harness, lose

EP = "tcp:2525:interface=127.0.0.1"


def entries(*specs):
    return [ConnectorEntry(name, object(), parse_ranges(ranges)) for name, ranges in specs]


def test_most_specific_range_wins_whatever_the_order():
    es = entries(("internet", ["0.0.0.0/0", "::/0"]), ("lan", ["10.0.0.0/8"]), ("app", ["10.1.2.3"]),
                 ("v6", ["2001:db8::/32"]))
    for listed in (es, list(reversed(es))):
        assert select_connector(listed, "10.1.2.3").name == "app"
        assert select_connector(listed, "10.1.2.4").name == "lan"
        assert select_connector(listed, "192.0.2.1").name == "internet"
        assert select_connector(listed, "2001:db8::5").name == "v6"
        assert select_connector(listed, "2001:db9::5").name == "internet"
        assert select_connector(listed, "::ffff:10.1.2.3").name == "app"  # IPv4-mapped on a dual-stack socket


def test_no_connector_admits():
    es = entries(("lan", ["10.0.0.0/8"]), ("v6", ["2001:db8::/32"]))
    assert select_connector(es, "192.0.2.1") is None
    assert select_connector(es, "not an address") is None
    assert select_connector(es, "") is None


def test_parse_helpers():
    assert str(parse_ip("fe80::1%eth0")) == "fe80::1"
    assert parse_ip("::ffff:192.0.2.1").version == 4
    assert best_prefix(parse_ip("10.0.0.1"), parse_ranges(["10.0.0.0/8", "10.0.0.0/24", "::/0"])) == 24
    with pytest.raises(ValueError):
        parse_ranges(["10.0.0.0/33"])


def test_connection_counter():
    c = ConnectionCounter(max_total=3, max_per_ip=2)
    assert c.refusal("a") is None
    c.opened("a")
    c.opened("a")
    assert "from a" in c.refusal("a")
    assert c.refusal("b") is None
    c.opened("b")
    assert "too many connections (3, limit 3)" == c.refusal("c")
    c.closed("a")
    assert c.refusal("a") is None and c.per_ip == {"a": 1, "b": 1}
    c.closed("a")
    c.closed("b")
    assert c.total == 0 and c.per_ip == {}


def two_connectors(**extra):
    return parse_config({
        "server": {"hostname": "mx.test"},
        "accepted_domains": {"local.test": "authoritative"},
        "receive": {
            "internet": {"listen": [EP], "hostname": "in.test", "banner": "internet", **extra},
            "apps": {"listen": [EP], "hostname": "apps.test", "banner": "apps", "remote_ranges": ["127.0.0.2/32"],
                     "relay_networks": ["127.0.0.2"]},
        },
    })


def test_two_connectors_on_one_endpoint_get_their_own_clients():
    h = Harness(two_connectors())
    assert list(h.dispatchers) == [EP]
    t1, p1 = h.connect("127.0.0.1")
    t2, p2 = h.connect("127.0.0.2")
    assert t1.value() == b"220 in.test internet\r\n"
    assert t2.value() == b"220 apps.test apps\r\n"
    # the apps range may relay, the rest of the world may not
    assert h.say(t2, p2, b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<u@elsewhere.test>\r\n").endswith(
        b"250 2.1.5 Ok\r\n")
    assert h.say(t1, p1, b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<u@elsewhere.test>\r\n").endswith(
        b"554 5.7.1 Relay access denied\r\n")


def test_a_connection_no_connector_admits_gets_554_and_is_closed():
    cfg = two_connectors(remote_ranges=["192.0.2.0/24"])
    h = Harness(cfg)
    t, p = h.connect("198.51.100.7")
    assert t.value() == b"554 5.7.1 Your address is not allowed to connect to this server\r\n"
    assert t.disconnecting
    p.dataReceived(b"EHLO x\r\n")  # nothing more is said
    assert t.value() == b"554 5.7.1 Your address is not allowed to connect to this server\r\n"
    assert h.dispatchers[EP].refused == 1


def test_connection_limits_per_ip_and_in_total():
    h = Harness(two_connectors(max_connections_per_ip=2, max_connections=3))
    open_ = [h.connect("192.0.2.1") for _ in range(2)]
    t, _ = h.connect("192.0.2.1")
    assert t.value() == b"421 4.7.0 in.test Too many connections from 192.0.2.1 (limit 2), try again later\r\n"
    assert t.disconnecting
    third = h.connect("192.0.2.2")
    assert third[0].value().startswith(b"220 ")
    t, _ = h.connect("192.0.2.3")
    assert t.value().startswith(b"421 4.7.0 in.test Too many connections (3, limit 3)")
    # another connector's clients are counted apart
    assert h.connect("127.0.0.2")[0].value().startswith(b"220 apps.test")
    # closing frees a slot, also after QUIT
    h.say(*open_[0], b"QUIT\r\n")
    lose(*open_[0])
    assert h.connect("192.0.2.1")[0].value().startswith(b"220 ")


def test_one_connector_on_two_endpoints_counts_both():
    cfg = parse_config({"receive": {"in": {"listen": [EP, "tcp:2526:interface=127.0.0.1"],
                                           "max_connections_per_ip": 1}}})
    h = Harness(cfg)
    assert h.connect("192.0.2.1", EP)[0].value().startswith(b"220 ")
    assert h.connect("192.0.2.1", "tcp:2526:interface=127.0.0.1")[0].value().startswith(b"421 4.7.0")


def test_group_listeners_keeps_the_order():
    cfg = two_connectors()
    groups = group_listeners(cfg.receive)
    assert [(ep, [rc.name for rc in rcs]) for ep, rcs in groups] == [(EP, ["internet", "apps"])]


def proxied(h: Harness, header: bytes):
    factory = ProxyHeaderFactory(h.dispatchers[EP])
    addr = IPv4Address("TCP", "127.0.0.1", 5000)  # the proxy
    proto = factory.buildProtocol(addr)
    t = StringTransport(peerAddress=addr)
    proto.makeConnection(t)
    return t, proto


def test_proxy_protocol_v1_dispatches_on_the_real_client_address():
    h = Harness(two_connectors())
    t, p = proxied(h, b"")
    assert t.value() == b""  # nothing before the PROXY header
    p.dataReceived(b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 25\r\n")
    assert t.value() == b"220 apps.test apps\r\n"
    p.dataReceived(b"EHLO c\r\n")
    assert b"250-apps.test" in t.value()
    t, p = proxied(h, b"")
    p.dataReceived(b"PROXY TCP4 198.51.100.1 127.0.0.1 40000 25\r\nEHLO c\r\n")
    assert t.value().startswith(b"220 in.test internet\r\n250-in.test")


def test_proxy_protocol_v2_and_garbage():
    import struct
    h = Harness(two_connectors())
    t, p = proxied(h, b"")
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    body = bytes([127, 0, 0, 2, 127, 0, 0, 1]) + struct.pack("!HH", 40000, 25)
    p.dataReceived(sig + b"\x21\x11" + struct.pack("!H", len(body)) + body)
    assert t.value() == b"220 apps.test apps\r\n"
    t, p = proxied(h, b"")
    p.dataReceived(b"EHLO not-a-proxy-header\r\n")
    assert t.value() == b"" and t.disconnecting
    t, p = proxied(h, b"")
    p.dataReceived(b"PROXY TCP4 nonsense here\r\n")
    assert t.value() == b"" and t.disconnecting
    lose(t, p)  # a connection lost before the session started is fine


def test_dispatcher_on_a_tcp_like_transport_passes_tls_calls_through():
    h = Harness(two_connectors())
    t, p = h.connect("192.0.2.9")
    assert p.getPeer().host == "192.0.2.9"  # the SMTP session sees the wrapper as its transport
    assert p.wrappedProtocol.session.peer_ip == "192.0.2.9"


def test_unix_socket_clients_go_to_the_first_connector_of_the_endpoint():
    from twisted.internet.address import UNIXAddress

    ep = "unix:/run/exmta/smtp.sock"
    cfg = parse_config({"receive": {"local": {"listen": [ep], "remote_ranges": ["10.0.0.0/8"], "banner": "local"}}})
    h = Harness(cfg)
    proto = h.dispatchers[ep].buildProtocol(UNIXAddress(None))
    t = StringTransport(peerAddress=UNIXAddress(None), hostAddress=UNIXAddress(b"/run/exmta/smtp.sock"))
    proto.makeConnection(t)
    assert t.value().startswith(b"220 ") and t.value().endswith(b" local\r\n")


@settings(max_examples=300, deadline=None)
@given(
    nets=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)), min_size=1, max_size=6),
    ip=st.integers(0, 2**32 - 1),
)
def test_selection_is_the_longest_matching_prefix(nets, ip):
    import ipaddress

    es = entries(*[(f"c{i}", [f"{ipaddress.IPv4Address(a)}/{n}"]) for i, (a, n) in enumerate(nets)])
    addr = ipaddress.IPv4Address(ip)
    matching = [(e.ranges[0].prefixlen, -i) for i, e in enumerate(es) if addr in e.ranges[0]]
    chosen = select_connector(es, str(addr))
    if not matching:
        assert chosen is None
    else:
        best = max(matching)
        assert chosen is es[-best[1]]


def test_a_reloaded_connector_config_applies_to_the_next_connection():
    from dataclasses import replace

    h = Harness(two_connectors(max_connections_per_ip=1))
    held = h.connect("192.0.2.1")
    assert h.connect("192.0.2.1")[0].value().startswith(b"421 4.7.0")
    # what exmta.observe.reload does on SIGHUP: a new ReceiveConnectorConfig on the session factory
    internet, apps = h.factories
    internet.config = replace(internet.config, max_connections_per_ip=2)
    apps.config = replace(apps.config, remote_ranges=("127.0.0.2/32", "192.0.2.7/32"))
    assert h.connect("192.0.2.1")[0].value().startswith(b"220 in.test")
    assert h.connect("192.0.2.7")[0].value().startswith(b"220 apps.test")
    assert held[0].value().startswith(b"220 in.test")
