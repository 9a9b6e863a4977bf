"""ESMTPServer with the real in-memory store and the default receive policy (no fakes between them)."""
from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from exmta.config.schema import AcceptedDomain, Config, ReceiveConnectorConfig
from exmta.filters import FilterBase, FilterChain
from exmta.model import Verdict
from exmta.receive.policy import DefaultReceivePolicy
from exmta.smtp.server import ESMTPServer, ESMTPServerFactory
from exmta.testing.memstore import MemoryStore


class AddHeader(FilterBase):
    name = "add-header"

    def on_data(self, session, txn, message):
        message.edits.insert_header("X-Exmta-Test", "seen")
        return Verdict.CONTINUE


def session(peer: str) -> tuple[StringTransport, MemoryStore, ESMTPServer]:
    clock = Clock()
    config = Config(hostname="mx.test", accepted_domains=(AcceptedDomain("local.test"),))
    rc = ReceiveConnectorConfig(name="default", hostname="mx.test", relay_networks=("10.0.0.0/8",))
    store = MemoryStore(clock)
    factory = ESMTPServerFactory(
        rc, DefaultReceivePolicy(config.accepted_domain, rc.relay_networks),
        FilterChain([AddHeader()], clock), store, clock,
        local_domain=lambda d: config.accepted_domain(d) is not None,
    )
    addr = IPv4Address("TCP", peer, 5000)
    proto = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    proto.makeConnection(transport)
    return transport, store, proto


def test_anonymous_client_delivers_locally_but_cannot_relay():
    t, store, proto = session("198.51.100.9")
    proto.dataReceived(
        b"EHLO c.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<u@local.test>\r\n"
        b"RCPT TO:<u@elsewhere.test>\r\nRCPT TO:<u%elsewhere.test@local.test>\r\nDATA\r\n"
    )
    proto.dataReceived(b"Subject: s\r\n\r\nbody\r\n.\r\n")
    lines = t.value().split(b"\r\n")
    assert lines[-7:-2] == [
        b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"554 5.7.1 Relay access denied",
        b"554 5.7.1 Relay access denied", b"354 End data with <CR><LF>.<CR><LF>",
    ]
    queued = lines[-2]
    assert queued.startswith(b"250 2.0.0 Ok: queued as ")
    queue_id = queued.rsplit(b" ", 1)[1].decode()
    env = store.envelope(queue_id)
    assert [r.address for r in env.recipients] == ["u@local.test"]
    content = store.content(queue_id)
    assert content.startswith(b"X-Exmta-Test: seen\r\nReceived: from c.test ([198.51.100.9])\r\n")
    assert content.endswith(b"Subject: s\r\n\r\nbody\r\n")
    assert env.size == len(content)


def test_relay_network_client_may_relay():
    t, store, proto = session("10.1.1.1")
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@local.test>\r\nRCPT TO:<u@elsewhere.test>\r\n"
                       b"DATA\r\nx\r\n.\r\n")
    assert t.value().endswith(b"\r\n250 2.0.0 Ok: queued as " + store.queue_ids()[0].encode() + b"\r\n")


def test_header_firewall_follows_the_relay_right():
    message = b"X-MS-Exchange-Organization-AuthAs: Internal\r\nSubject: s\r\n\r\nb\r\n.\r\n"
    for peer, kept in (("10.1.1.1", True), ("198.51.100.9", False)):
        t, store, proto = session(peer)
        proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<u@local.test>\r\nDATA\r\n" + message)
        content = store.content(store.queue_ids()[0])
        assert (b"X-MS-Exchange-Organization-AuthAs: Internal\r\n" in content) is kept
