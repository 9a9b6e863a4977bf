"""A fake rspamd for unit tests: an in-memory endpoint (twisted.test.iosim) and an HTTP responder that
answers what a test tells it to (a verdict, HTTP 500, garbage, nothing), on a task.Clock."""
from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.test.iosim import FakeTransport, connect

VERDICT = {
    "is_skipped": False, "score": 11.1, "required_score": 15.0, "action": "rewrite subject",
    "subject": "*** SPAM *** hello",
    "symbols": {
        "EXMTA_TEST_SCORE": {"name": "EXMTA_TEST_SCORE", "score": 9.5, "metric_score": 1.0, "options": ["9.5"]},
        "RDNS_NONE": {"name": "RDNS_NONE", "score": 1.0, "metric_score": 1.0},
        "ARC_NA": {"name": "ARC_NA", "score": 0.0, "metric_score": 0.0},
    },
    "messages": {},
    "milter": {
        "add_headers": {"X-Spam-Level": {"value": "***********", "order": -1},
                        "Authentication-Results": {"value": "mx.example.test;\r\n\tdkim=none", "order": 1}},
        "remove_headers": {"X-Spam-Level": 0, "Authentication-Results": 0},
    },
}


def http_answer(body: bytes, code: int = 200, reason: bytes = b"OK") -> bytes:
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (code, reason, len(body))) + body


def verdict_answer(**changes: Any) -> bytes:
    return http_answer(json.dumps({**VERDICT, **changes}).encode())


class FakeRspamd(Protocol):
    """Reads one HTTP request; then writes ``answer`` (None: never answers) and closes when asked."""

    def __init__(self, answer: bytes | None, close: bool = True) -> None:
        self.answer = answer
        self.close = close
        self.request = b""
        self.answered = False

    def dataReceived(self, data: bytes) -> None:
        self.request += data
        head, sep, body = self.request.partition(b"\r\n\r\n")
        if not sep or self.answered:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(body) >= length and self.answer is not None:
            self.answered = True
            self.transport.write(self.answer)
            if self.close:
                self.transport.loseConnection()

    def headers(self) -> list[tuple[str, str]]:
        head = self.request.partition(b"\r\n\r\n")[0].decode()
        return [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])]

    def body(self) -> bytes:
        return self.request.partition(b"\r\n\r\n")[2]


class FakeEndpoint:
    """A client endpoint whose connections reach a new ``make_server()`` protocol in memory (None: refused)."""

    def __init__(self, make_server: Callable[[], Protocol | None]) -> None:
        self.make_server = make_server
        self.servers: list[Protocol] = []
        self.pumps: list[Any] = []

    def connect(self, factory: Any) -> Any:
        server = self.make_server()
        if server is None:
            return fail(ConnectionRefusedError("127.0.0.1:11333"))
        addr = IPv4Address("TCP", "127.0.0.1", 11333)
        client = factory.buildProtocol(addr)
        self.servers.append(server)
        self.pumps.append(connect(server, FakeTransport(server, isServer=True, peerAddress=addr),
                                  client, FakeTransport(client, isServer=False, peerAddress=addr), greet=False))
        return succeed(client)

    def pump(self, rounds: int = 5) -> None:
        for _ in range(rounds):
            for pump in self.pumps:
                pump.flush()
