"""A test harness: real receive connectors (config -> policy -> ESMTPServerFactory) behind the
real dispatching factory, driven over StringTransport with a task.Clock."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from exmta.config.schema import Config
from exmta.filters import FilterChain
from exmta.receive.wiring import ReceiveResources, make_dispatchers, make_policy
from exmta.smtp.server import ESMTPServerFactory
from exmta.testing.memstore import MemoryStore


@dataclass
class Harness:
    config: Config
    clock: Clock = field(default_factory=Clock)
    resources: ReceiveResources = field(default_factory=ReceiveResources)

    def __post_init__(self) -> None:
        self.store = MemoryStore(self.clock)
        self.factories = []
        for rc in self.config.receive:
            policy = make_policy(self.config, rc, self.clock, self.resources)
            self.factories.append(ESMTPServerFactory(
                rc, policy, FilterChain((), self.clock), self.store, self.clock,
                local_domain=lambda d: self.config.accepted_domain(d) is not None,
            ))
        self.dispatchers = dict(make_dispatchers(self.config.receive, self.factories, self.clock))

    def connect(self, peer: str, endpoint: str | None = None, port: int = 40000) -> tuple[StringTransport, Any]:
        """A new connection from ``peer`` to ``endpoint`` (the first one by default)."""
        dispatcher = self.dispatchers[endpoint] if endpoint else next(iter(self.dispatchers.values()))
        addr = IPv6Address("TCP", peer, port) if ":" in peer else IPv4Address("TCP", peer, port)
        proto = dispatcher.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
        proto.makeConnection(transport)
        return transport, proto

    def say(self, transport: StringTransport, proto: Any, data: bytes) -> bytes:
        """Send ``data``; the reply bytes written since the last call."""
        transport.clear()
        proto.dataReceived(data)
        return transport.value()


def lose(transport: StringTransport, proto: Any) -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    proto.connectionLost(Failure(ConnectionDone()))
