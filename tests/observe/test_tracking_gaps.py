"""Connection refusals reach the tracking log, and `exmta track` shows the AUTH user (issue 12, item 12)."""
from __future__ import annotations

from types import SimpleNamespace

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from exmta.admin.track import format_table
from exmta.config.schema import ReceiveConnectorConfig
from exmta.receive.ranges import ConnectorEntry, DispatchingFactory


class Session:
    def __init__(self, tracker, clock):
        self.tracker, self.clock = tracker, clock
        self.config = ReceiveConnectorConfig(name="lan", remote_ranges=("10.0.0.0/8",), max_connections_per_ip=1)

    def buildProtocol(self, addr):
        from twisted.internet.protocol import Protocol

        return Protocol()


def connect(factory: DispatchingFactory, ip: str) -> bytes:
    proto = factory.buildProtocol(IPv4Address("TCP", ip, 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", ip, 40000))
    proto.makeConnection(transport)
    return transport.value()


def test_connection_refusals_are_reject_events():
    clock = Clock()
    clock.advance(1_700_000_000)
    events: list = []
    source = Session(SimpleNamespace(track=events.append), clock)
    entry = ConnectorEntry.from_config(source.config, source, source)
    factory = DispatchingFactory([entry], "tcp:25")
    assert connect(factory, "192.0.2.1").startswith(b"554 5.7.1 ")
    assert connect(factory, "10.1.1.1") == b""          # admitted
    assert connect(factory, "10.1.1.1").startswith(b"421 4.7.0 ")  # past max_connections_per_ip
    no_connector, too_many = events
    assert no_connector.to_json() == {
        "timestamp": 1_700_000_000.0, "event_id": "REJECT", "queue_id": "", "sender": "", "recipients": [],
        "source": "SMTP", "remote_host": "192.0.2.1",
        "reply": "554 5.7.1 Your address is not allowed to connect to this server",
        "reason": "connection refused: no receive connector admits this address", "endpoint": "tcp:25"}
    assert too_many.connector == "lan" and too_many.reply.startswith("421 4.7.0 ")
    row = format_table([no_connector.to_json()])
    assert "reason=connection refused: no receive connector admits this address" in row


def test_track_shows_the_authenticated_user():
    rec = {"timestamp": 1_700_000_000.0, "event_id": "RECEIVE", "queue_id": "Q", "sender": "a@x.test",
           "recipients": ["b@y.test"], "source": "SMTP", "connector": "submission", "remote_host": "192.0.2.7",
           "auth_user": "alice"}
    assert format_table([rec]).splitlines()[1].endswith("host=192.0.2.7 user=alice")
