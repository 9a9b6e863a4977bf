"""Tracking events the receive side emits: RECEIVE with TLS and connector, AGENTINFO for a filter's quarantine."""
from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from exmta.config.schema import AcceptedDomain, ReceiveConnectorConfig
from exmta.filters.base import FilterBase, FilterChain
from exmta.model import TrackingEventId, Verdict
from exmta.receive.policy import DefaultReceivePolicy
from exmta.smtp.server import ESMTPServerFactory
from exmta.testing.memstore import MemoryStore


class Quarantine(FilterBase):
    name = "dmarc"

    def on_data(self, session: Any, txn: Any, message: Any) -> Verdict:
        message.quarantine("DMARC policy of example.org is quarantine")
        return Verdict.CONTINUE


class Events:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def track(self, event: Any) -> None:
        self.events.append(event)


def test_quarantine_is_an_agentinfo_event_after_receive() -> None:
    clock = Clock()
    clock.advance(1_700_000_000)
    accepted = AcceptedDomain("local.test")
    tracker = Events()
    factory = ESMTPServerFactory(
        ReceiveConnectorConfig(name="inbound", hostname="mx.test"),
        DefaultReceivePolicy(lambda d: accepted if accepted.matches(d) else None, ()),
        FilterChain([Quarantine()], clock), MemoryStore(clock), clock, tracker=tracker,
        local_domain=lambda d: d == "local.test")
    addr = IPv4Address("TCP", "192.0.2.7", 40000)
    proto = factory.buildProtocol(addr)
    proto.makeConnection(StringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 25)))
    for line in (b"EHLO c.test\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@local.test>\r\n", b"DATA\r\n",
                 b"Subject: q\r\nMessage-ID: <q@example.org>\r\n\r\nbody\r\n.\r\n"):
        proto.dataReceived(line)
    proto.connectionLost(Failure(ConnectionDone()))
    receive, agent = tracker.events
    assert receive.event_id is TrackingEventId.RECEIVE and agent.event_id is TrackingEventId.AGENTINFO
    assert agent.queue_id == receive.queue_id and agent.message_id == "<q@example.org>"
    assert agent.connector == "inbound" and agent.recipients == ("b@local.test",)
    assert agent.details["verdict"] == "quarantine" and "DMARC policy" in agent.details["reason"]
    assert receive.remote_host == "192.0.2.7" and receive.connector == "inbound"
