"""Next-hop peers for send-connector tests, all on loopback.

* :func:`start_sink` starts an aiosmtpd :class:`~support.sinks.SmtpSink`
  (an independent implementation) without blocking the reactor thread.
* :class:`ScriptedServer` is a tiny Twisted SMTP server that answers from a
  script, for what aiosmtpd cannot do: refusing greetings, 4xx EHLO,
  advertising PIPELINING/CHUNKING, hanging, dropping the connection.
* :func:`dead_port` returns a loopback port where nothing listens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.internet.protocol import Factory, Protocol

from .procs import LOOPBACK, free_port
from .sinks import SmtpSink


def dead_port() -> int:
    """A port on 127.0.0.1 that refuses connections (free a moment ago)."""
    return free_port(LOOPBACK)


def start_sink(**kw: Any) -> defer.Deferred[SmtpSink]:
    """Start an aiosmtpd sink in a thread (its start blocks until the port answers)."""
    return threads.deferToThread(lambda: SmtpSink(**kw).start())


def stop_sink(sink: SmtpSink) -> defer.Deferred[None]:
    return threads.deferToThread(sink.stop)


@dataclass
class Session:
    """What one connection to a ScriptedServer saw."""

    commands: list[str] = field(default_factory=list)
    data: bytes = b""


class _ScriptedProtocol(Protocol):
    def __init__(self, server: ScriptedServer) -> None:
        self.server = server
        self.session = Session()
        self.buffer = b""
        self.in_data = False
        self.bdat_left = 0
        self.bdat_last = False

    def connectionMade(self) -> None:
        self.server.sessions.append(self.session)
        if self.server.greeting is None:
            return  # hang: never greet
        self.transport.write(self.server.greeting.encode() + b"\r\n")
        if self.server.greeting[:1] in "45":
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.bdat_left:
                take = self.buffer[:self.bdat_left]
                self.buffer = self.buffer[len(take):]
                self.session.data += take
                self.bdat_left -= len(take)
                if self.bdat_left:
                    return
                self.reply("BDAT-LAST" if self.bdat_last else "BDAT")
                continue
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.session.data += self.buffer[:end + 2]
                self.buffer = self.buffer[end + 5:]
                self.in_data = False
                self.reply("EOD")
                continue
            idx = self.buffer.find(b"\r\n")
            if idx < 0:
                return
            line, self.buffer = self.buffer[:idx].decode("utf-8", "replace"), self.buffer[idx + 2:]
            self.session.commands.append(line)
            verb = line.split(" ", 1)[0].upper()
            if verb == "BDAT":
                parts = line.split()
                self.bdat_left = int(parts[1])
                self.bdat_last = len(parts) > 2 and parts[2].upper() == "LAST"
                if self.bdat_left == 0:
                    self.reply("BDAT-LAST" if self.bdat_last else "BDAT")
                continue
            self.reply(verb)
            if verb == "DATA" and self.session.commands and self._last_reply.startswith("354"):
                self.in_data = True
                self.session.data = b""

    _last_reply = ""

    def reply(self, verb: str) -> None:
        answer = self.server.respond(verb, self.session)
        self._last_reply = answer or ""
        if answer is None:
            return  # hang
        if answer == "CLOSE":
            self.transport.loseConnection()
            return
        self.transport.write(answer.encode() + b"\r\n")
        if verb == "QUIT":
            self.transport.loseConnection()


DEFAULT_REPLIES = {
    "EHLO": "250-scripted.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1000000",
    "LHLO": "250-scripted.test\r\n250 PIPELINING",
    "HELO": "250 scripted.test",
    "MAIL": "250 2.1.0 ok",
    "RCPT": "250 2.1.5 ok",
    "DATA": "354 go ahead",
    "EOD": "250 2.0.0 queued",
    "BDAT": "250 2.0.0 chunk ok",
    "BDAT-LAST": "250 2.0.0 queued",
    "RSET": "250 2.0.0 ok",
    "QUIT": "221 2.0.0 bye",
    "NOOP": "250 ok",
}


class ScriptedServer:
    """A loopback SMTP server whose replies come from ``replies`` (verb -> reply).

    A reply may be a string, None (never answer) or "CLOSE"; ``respond`` may
    be overridden by passing ``responder(verb, session) -> str | None``.
    ``greeting`` None makes the server never greet.
    """

    def __init__(self, greeting: str | None = "220 scripted.test ESMTP",
                 replies: dict[str, str | None] | None = None,
                 responder: Callable[[str, Session], str | None] | None = None) -> None:
        self.greeting = greeting
        self.replies = dict(DEFAULT_REPLIES)
        self.replies.update(replies or {})
        self.responder = responder
        self.sessions: list[Session] = []
        self.port: Any = None

    def respond(self, verb: str, session: Session) -> str | None:
        if self.responder is not None:
            answer = self.responder(verb, session)
            if answer is not None:
                return answer
        return self.replies.get(verb, "502 5.5.2 unknown command")

    def listen(self, reactor: Any, interface: str = LOOPBACK, port: int = 0) -> int:
        """Listen on interface:port (port 0 = any free one); return the port."""
        factory = Factory.forProtocol(lambda: _ScriptedProtocol(self))
        self.port = reactor.listenTCP(port, factory, interface=interface)
        return self.port.getHost().port

    def listen_unix(self, reactor: Any, path: str) -> str:
        """Listen on a unix socket (LMTP tests); return its path."""
        factory = Factory.forProtocol(lambda: _ScriptedProtocol(self))
        self.port = reactor.listenUNIX(path, factory)
        return path

    def stop(self) -> defer.Deferred[None]:
        return defer.maybeDeferred(self.port.stopListening)
