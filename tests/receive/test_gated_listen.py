"""Issue 10 item 4: listeners bind in privilegedStartService but accept only from startService on,
which the ordered service tree calls after the spool's recovery."""
from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from exmta.receive.proxy import listen_service

pytestmark = pytest.mark.integration


class Banner(Protocol):
    def connectionMade(self) -> None:
        self.factory.accepted += 1
        self.transport.write(b"220 ready\r\n")
        self.transport.loseConnection()


def read_banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.recv(100)


@pytest_twisted.ensureDeferred
async def test_listener_binds_early_and_accepts_after_start() -> None:
    from twisted.internet import reactor

    factory = Factory.forProtocol(Banner)
    factory.accepted = 0
    service = listen_service("tcp:0:interface=127.0.0.1", factory, reactor)
    service.privilegedStartService()  # what twistd does before dropping root, before any startService
    port = await service._waitingForPort
    number = port.getHost().port
    assert port not in reactor.getReaders()  # bound and listening, not accepting
    # a client that comes now waits in the backlog: connected, not refused, not served
    early = socket.create_connection(("127.0.0.1", number), timeout=10)
    try:
        assert factory.accepted == 0
        service.startService()  # after the store's recover() in exmta.service.OrderedService
        assert port in reactor.getReaders()
        early_banner = await deferToThread(early.recv, 100)
    finally:
        early.close()
    assert early_banner == b"220 ready\r\n"
    assert await deferToThread(read_banner, number) == b"220 ready\r\n"
    assert factory.accepted == 2
    await service.stopService()
