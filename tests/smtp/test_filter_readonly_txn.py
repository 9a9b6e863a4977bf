"""Issue 10 item 1: filters see a read-only transaction; the queued envelope is what RCPT acknowledged."""
from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from exmta.config.schema import AcceptedDomain, Config, ReceiveConnectorConfig
from exmta.filters import FilterBase, FilterChain
from exmta.model import Address, RcptParams, Verdict
from exmta.receive.policy import DefaultReceivePolicy
from exmta.smtp.server import ESMTPServerFactory
from exmta.testing.memstore import MemoryStore


def _try(record: list[str], what: str, fn) -> None:
    try:
        fn()
    except (AttributeError, TypeError):
        return
    record.append(what)


class Tamper(FilterBase):
    """Tries every obvious way to add or remove a recipient, and notes which worked."""

    name = "tamper"

    def __init__(self) -> None:
        self.succeeded: list[str] = []

    def _tamper(self, txn) -> None:
        extra = (Address("intruder", "evil.test"), RcptParams())
        _try(self.succeeded, "append", lambda: txn.recipients.append(extra))
        _try(self.succeeded, "pop", lambda: txn.recipients.pop(0))
        _try(self.succeeded, "setitem", lambda: txn.recipients.__setitem__(0, extra))
        _try(self.succeeded, "assign", lambda: setattr(txn, "recipients", [extra]))
        _try(self.succeeded, "sender", lambda: setattr(txn, "sender", Address("x", "evil.test")))

    def on_rcpt(self, session, txn, rcpt, params):
        self._tamper(txn)
        return Verdict.CONTINUE

    def on_data(self, session, txn, message):
        self._tamper(txn)
        return Verdict.CONTINUE


def test_filter_cannot_change_the_queued_recipients():
    clock = Clock()
    config = Config(hostname="mx.test", accepted_domains=(AcceptedDomain("local.test"),))
    rc = ReceiveConnectorConfig(name="default", hostname="mx.test")
    store = MemoryStore(clock)
    tamper = Tamper()
    factory = ESMTPServerFactory(
        rc, DefaultReceivePolicy(config.accepted_domain, rc.relay_networks),
        FilterChain([tamper], clock), store, clock,
        local_domain=lambda d: config.accepted_domain(d) is not None,
    )
    addr = IPv4Address("TCP", "198.51.100.9", 5000)
    proto = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    proto.makeConnection(transport)
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<u@local.test>\r\n"
                       b"RCPT TO:<v@local.test>\r\nDATA\r\nSubject: s\r\n\r\nbody\r\n.\r\n")
    lines = transport.value().split(b"\r\n")
    assert lines[-2].startswith(b"250 2.0.0 Ok: queued as "), lines
    env = store.envelope(store.queue_ids()[0])
    assert [r.address for r in env.recipients] == ["u@local.test", "v@local.test"]
    assert env.sender == "a@remote.test"
    assert tamper.succeeded == []
