"""Units of issue 11 items 1 and 7 on the injected clock: the tarpit of refused RCPTs, the header limits."""
from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from exmta.config.schema import AcceptedDomain, Config, ReceiveConnectorConfig
from exmta.filters import FilterChain
from exmta.filters.base import MessageView, longest_field
from exmta.receive.policy import DefaultReceivePolicy
from exmta.smtp.limits import header_refusal
from exmta.smtp.server import ESMTPServerFactory
from exmta.testing.memstore import MemoryStore


def _session(**limits: object) -> tuple[StringTransport, Clock]:
    clock = Clock()
    config = Config(hostname="mx.test", accepted_domains=(AcceptedDomain("local.test"),))
    rc = ReceiveConnectorConfig(name="default", hostname="mx.test", **limits)  # type: ignore[arg-type]
    factory = ESMTPServerFactory(rc, DefaultReceivePolicy(config.accepted_domain, rc.relay_networks),
                                 FilterChain([], clock), MemoryStore(clock), clock)
    addr = IPv4Address("TCP", "198.51.100.7", 5000)
    proto = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    proto.makeConnection(transport)
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@remote.test>\r\n"
                       + b"".join(b"RCPT TO:<u%d@elsewhere.test>\r\n" % i for i in range(30)))
    return transport, clock


def _refusals(t: StringTransport) -> int:
    return t.value().count(b"554 5.7.1")


def test_refused_rcpts_are_tarpitted_after_the_soft_limit_then_closed() -> None:
    t, clock = _session(max_refused_recipients=14, refused_recipients_tarpit_after=10, refused_recipients_tarpit=2.0)
    # refusals 11, 12 and 13 each wait 2 s on the clock (pipelined replies go out together); the 14th closes
    clock.pump([2.0, 2.0, 1.9])
    assert not t.disconnecting
    clock.advance(0.1)
    assert _refusals(t) == 14 and t.value().endswith(
        b"421 4.7.0 mx.test Error: too many refused recipients, closing connection\r\n")
    assert t.disconnecting


def test_no_limit_when_zero() -> None:
    t, _ = _session(max_refused_recipients=0, refused_recipients_tarpit=0.0)
    assert _refusals(t) == 30 and not t.disconnecting


def test_header_limits() -> None:
    small = MessageView(b"Subject: x\r\nX-Long: " + b"a" * 2000 + b"\r\n\r\nbody\r\n")
    assert header_refusal(small, 4096, 1000) == "a header field of 2010 octets (limit 1000)"
    assert header_refusal(small, 4096, 4096) is None
    assert header_refusal(small, 1024, 1000).startswith("header block of 2022 octets")
    assert longest_field(b"A: 1\r\n folded\r\nB: 2\r\n") == len(b"A: 1\r\n folded\r\n")
    # a block that does not end within what the view reads is over any limit
    endless = MessageView(b"Subject: x\r\n" + (b"X-Pad: " + b"p" * 90 + b"\r\n") * 12000)
    assert not endless.header_complete and header_refusal(endless, 1024 * 1024, 100 * 1024) is not None
