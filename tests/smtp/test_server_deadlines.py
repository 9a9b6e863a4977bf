"""Issue 10 item 10: a slow-drip client is cut off (StringTransport, task.Clock).

A command line must be complete ``command_timeout`` after its first octet, and DATA within
``data_timeout`` + size / ``min_data_rate``, whatever the pace of single bytes.
"""
from __future__ import annotations

from dataclasses import replace

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from exmta.config.schema import AcceptedDomain, Config, ReceiveConnectorConfig
from exmta.filters import FilterChain
from exmta.receive.policy import DefaultReceivePolicy
from exmta.smtp.server import ESMTPServer, ESMTPServerFactory
from exmta.testing.memstore import MemoryStore

TIMEOUT = b"421 4.4.2 mx.test Error: timeout exceeded\r\n"


def session(**cfg) -> tuple[Clock, StringTransport, ESMTPServer, MemoryStore]:
    clock = Clock()
    config = Config(hostname="mx.test", accepted_domains=(AcceptedDomain("local.test"),))
    rc = replace(ReceiveConnectorConfig(name="default", hostname="mx.test"), **cfg)
    store = MemoryStore(clock)
    factory = ESMTPServerFactory(rc, DefaultReceivePolicy(config.accepted_domain, rc.relay_networks),
                                 FilterChain([], clock), store, clock,
                                 local_domain=lambda d: config.accepted_domain(d) is not None)
    addr = IPv4Address("TCP", "198.51.100.9", 5000)
    proto = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    proto.makeConnection(transport)
    proto.dataReceived(b"EHLO c.test\r\n")
    transport.clear()
    return clock, transport, proto, store


def drip(clock: Clock, proto: ESMTPServer, transport: StringTransport, data: bytes, every: float,
         until: float) -> float:
    """Send ``data`` one octet every ``every`` seconds (cycling) until closed or ``until``; -> when it closed."""
    start = clock.seconds()
    i = 0
    while clock.seconds() - start < until and not transport.disconnecting:
        proto.dataReceived(data[i % len(data):i % len(data) + 1])
        i += 1
        clock.advance(every)
    return clock.seconds() - start


def test_a_command_dripping_in_is_cut_off_at_the_command_timeout():
    clock, t, proto, _ = session(command_timeout=30.0)
    proto.dataReceived(b"NOOP ")
    took = drip(clock, proto, t, b"xyz", every=5.0, until=90.0)
    assert t.disconnecting and t.value() == TIMEOUT
    assert took <= 30.0


def test_whole_commands_keep_an_idle_session_alive():
    clock, t, proto, _ = session(command_timeout=30.0)
    for _ in range(10):
        clock.advance(20.0)
        proto.dataReceived(b"NOOP\r\n")
    assert not t.disconnecting and t.value() == b"250 2.0.0 Ok\r\n" * 10
    proto.dataReceived(b"NO")  # a partial line: the clock starts at its first octet
    clock.advance(20.0)
    proto.dataReceived(b"O")
    clock.advance(10.0)
    assert t.disconnecting and t.value().endswith(TIMEOUT)


def test_data_dripping_in_is_cut_off_by_the_minimum_rate():
    clock, t, proto, store = session(data_timeout=60.0, min_data_rate=100)
    proto.dataReceived(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@local.test>\r\nDATA\r\n")
    t.clear()
    took = drip(clock, proto, t, b"Subject: slow\r\n\r\nbody line\r\n", every=2.0, until=300.0)
    assert t.disconnecting and t.value() == TIMEOUT
    assert took <= 60.0 + 40 / 100 + 2.0  # the allowance grows by one octet / rate per octet
    assert store.queue_ids() == []


def test_a_big_message_at_a_good_rate_is_taken():
    clock, t, proto, store = session(data_timeout=60.0, min_data_rate=100)
    proto.dataReceived(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@local.test>\r\nDATA\r\n")
    line = b"x" * 98 + b"\r\n"
    for _ in range(200):  # 20 000 octets at 200 octets/s: 100 s, more than data_timeout
        proto.dataReceived(line)
        clock.advance(0.5)
    proto.dataReceived(b".\r\n")
    assert not t.disconnecting
    assert t.value().endswith(b"Ok: queued as " + store.queue_ids()[0].encode() + b"\r\n")
