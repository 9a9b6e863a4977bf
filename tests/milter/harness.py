"""The real SMTP server (ESMTPServerFactory) with the milter filter, on the real reactor.

The client side is a StringTransport; the milters are real sockets on
loopback, so :func:`send` polls (bounded) until the end-of-data reply is out.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from exmta.config.schema import AcceptedDomain, Config, ReceiveConnectorConfig
from exmta.filters import FilterChain
from exmta.milter.filter import MilterFilter, parse_settings
from exmta.receive.policy import DefaultReceivePolicy
from exmta.smtp.server import ESMTPServerFactory
from exmta.testing.memstore import MemoryStore


def make_server(reactor: Any, milters: list[dict[str, Any]], chain_timeout: float = 120.0):
    config = Config(hostname="mx.example.test", accepted_domains=(AcceptedDomain("example.test"),))
    rc = ReceiveConnectorConfig(name="default", hostname="mx.example.test")
    store = MemoryStore(reactor)
    flt = MilterFilter("milter", parse_settings("milter", {"milters": milters}), reactor, reactor,
                       hostname="mx.example.test")
    factory = ESMTPServerFactory(
        rc, DefaultReceivePolicy(config.accepted_domain, rc.relay_networks),
        FilterChain([flt], reactor, timeout=chain_timeout), store, reactor,
        local_domain=lambda d: config.accepted_domain(d) is not None)
    return factory, store


async def send(reactor: Any, factory: Any, message: bytes, rcpts=("u@example.test",),
               deadline: float = 60.0) -> bytes:
    """One SMTP transaction; returns the reply line to end of data."""
    addr = IPv4Address("TCP", "127.0.0.1", 40123)
    proto = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
    proto.makeConnection(transport)
    dialogue = b"EHLO client.example.test\r\nMAIL FROM:<sender@remote.test>\r\n"
    dialogue += b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts)
    dialogue += b"DATA\r\n" + message.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    proto.dataReceived(dialogue)
    end = reactor.seconds() + deadline
    expected = 4 + len(rcpts) + 1  # banner, EHLO, MAIL, each RCPT, DATA, then end of data
    while reactor.seconds() < end:
        lines = [line for line in transport.value().split(b"\r\n") if line[3:4] == b" "]
        if len(lines) >= expected:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    lines = [line for line in transport.value().split(b"\r\n") if line[3:4] == b" "]
    assert len(lines) >= expected, transport.value()
    proto.connectionLost(Failure(ConnectionDone()))
    return lines[expected - 1]
