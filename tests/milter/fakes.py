"""Tiny fake milters for the tests: Twisted servers on loopback that follow a script.

:class:`FakeMilter` parses the MTA's commands (length, command octet, data),
records them, and answers each with what ``script(command, data)`` returns:
a list of reply packets (possibly empty: no reply), or the strings
``"die"`` (close the connection) or ``"hang"`` (never answer again).
"""
from __future__ import annotations

import struct
from typing import Any, Callable

from twisted.internet.protocol import Factory, Protocol

from exmta.milter import protocol as p


def reply(command: bytes, data: bytes = b"") -> bytes:
    return p.encode(command, data)


def optneg_reply(actions: int = p.ACTIONS_OFFERED, protocol: int = 0, version: int = 6) -> bytes:
    return reply(b"O", struct.pack("!III", version, actions, protocol))


CONTINUE = reply(b"c")


def accept_all(command: bytes, data: bytes) -> list[bytes]:
    if command == b"O":
        return [optneg_reply()]
    if command in (b"D", b"Q", b"A"):
        return []
    return [CONTINUE]


class _Side(Protocol):
    def __init__(self, owner: FakeMilter) -> None:
        self.owner = owner
        self.buffer = b""
        self.hung = False
        self.commands: list[tuple[bytes, bytes]] = []

    def connectionMade(self) -> None:
        self.owner.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4 and not self.hung:
            length = struct.unpack("!I", self.buffer[:4])[0]
            if len(self.buffer) < 4 + length:
                return
            command, payload = self.buffer[4:5], self.buffer[5:4 + length]
            self.buffer = self.buffer[4 + length:]
            self.commands.append((command, payload))
            self.owner.commands.append((command, payload))
            answer = self.owner.script(command, payload)
            if answer == "die":
                self.transport.abortConnection()
                return
            if answer == "hang":
                self.hung = True
                return
            for packet in answer:
                self.transport.write(packet)

    def connectionLost(self, reason: Any = None) -> None:
        self.owner.closed += 1


class FakeMilter(Factory):
    """A scripted milter server (see the module docstring)."""

    def __init__(self, script: Callable[[bytes, bytes], Any] = accept_all) -> None:
        self.script = script
        self.commands: list[tuple[bytes, bytes]] = []
        self.connections: list[_Side] = []
        self.closed = 0
        self.port: Any = None

    def buildProtocol(self, addr: Any) -> _Side:
        return _Side(self)

    def listen(self, reactor: Any) -> str:
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")
        return f"inet:127.0.0.1:{self.port.getHost().port}"

    def listen_unix(self, reactor: Any, path: str) -> str:
        self.port = reactor.listenUNIX(path, self)
        return f"unix:{path}"

    def stop(self) -> Any:
        for side in self.connections:
            if side.transport is not None:
                side.transport.abortConnection()
        return self.port.stopListening() if self.port is not None else None

    def kinds(self) -> list[bytes]:
        return [c for c, _ in self.commands]
