"""SMTP protocol logs: one JSON line per command and per reply of every session.

Exchange keeps a protocol log per connector, switched per connector
(``ProtocolLoggingLevel None | Verbose``); so do we (``protocol_log = "off" |
"verbose"`` on a receive or send connector). The server and the client get a
:class:`ProtocolLog` (or None, which costs nothing: every hook is behind an
``is not None`` test) and open one :class:`ProtocolSession` per connection.

A record::

    {"ts": 1700000000.25, "connector": "default", "direction": "receive",
     "session": "3f2a...", "seq": 4, "event": "command",
     "local": "127.0.0.1:25", "remote": "192.0.2.7:50123", "line": "MAIL FROM:<a@b>"}

``event`` is ``connect``, ``command`` (client to server), ``reply`` (server
to client), ``data`` (the message content, logged only as ``"<N octets>"``),
``tls`` (version, cipher and peer certificate subject once negotiated) or
``disconnect``. Secrets never reach the file: an ``AUTH`` command keeps its
mechanism and loses its initial response, and every line of the SASL exchange
that follows (until the server's final reply) is ``"<redacted>"``, in both
directions.
"""
from __future__ import annotations

import json
import os
from typing import Any

from zope.interface import implementer

from exmta.interfaces import IProtocolLog
from exmta.model import Reply, Session
from exmta.observe.rotation import RotatingLog

__all__ = ["ProtocolLog", "ProtocolSession", "redact_command"]

REDACTED = "<redacted>"


def redact_command(line: str) -> str:
    """``AUTH PLAIN dGVzdA==`` -> ``AUTH PLAIN <redacted>``; other lines unchanged."""
    parts = line.split(" ", 2)
    if parts[0].upper() != "AUTH":
        return line
    if len(parts) <= 2:
        return line
    return f"{parts[0]} {parts[1]} {REDACTED}"


def _endpoint(host: str, port: int) -> str:
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


@implementer(IProtocolLog)
class ProtocolLog:
    """The protocol log of one connector: a :class:`RotatingLog` and the sessions that write to it."""

    def __init__(self, connector: str, direction: str, file: RotatingLog) -> None:
        self.connector = connector
        self.direction = direction  # "receive" | "send"
        self.file = file
        self.clock = file.clock

    def open_session(self, local: str, remote: str, session_id: str | None = None,
                     remote_name: str | None = None) -> ProtocolSession:
        """Start a session transcript; ``local`` and ``remote`` are ``host:port`` strings."""
        session = ProtocolSession(self, session_id or os.urandom(6).hex(), local, remote)
        session.remote_name = remote_name
        session.record("connect")
        return session

    def for_server(self, session: Session) -> ProtocolSession:
        """A transcript for a server-side :class:`~exmta.model.Session`."""
        return self.open_session(
            _endpoint(session.local_ip, session.local_port), _endpoint(session.peer_ip, session.peer_port),
            session.session_id,
        )

    def for_transport(self, transport: Any, label: str | None = None) -> ProtocolSession:
        """A transcript for a client connection (endpoints read from the transport)."""
        def describe(addr: Any) -> str:
            host = getattr(addr, "host", None)
            return _endpoint(host, getattr(addr, "port", 0)) if host is not None else str(addr)

        try:
            local, remote = describe(transport.getHost()), describe(transport.getPeer())
        except Exception:
            local, remote = "", label or ""
        return self.open_session(local, remote, remote_name=label)

    def write(self, record: dict[str, Any]) -> None:
        self.file.write_line(json.dumps(record, ensure_ascii=False, separators=(",", ":")))

    def close(self) -> None:
        self.file.close()


class ProtocolSession:
    """One connection's transcript. Call the hooks in wire order; they never raise."""

    def __init__(self, log: ProtocolLog, session_id: str, local: str, remote: str) -> None:
        self.log = log
        self.session_id = session_id
        self.local = local
        self.remote = remote
        self.remote_name: str | None = None
        self.seq = 0
        self._sasl = False  # inside an AUTH exchange: lines are secrets
        self.closed = False

    def record(self, event: str, **fields: Any) -> None:
        if self.closed:
            return
        self.seq += 1
        rec: dict[str, Any] = {
            "ts": self.log.clock.seconds(), "connector": self.log.connector, "direction": self.log.direction,
            "session": self.session_id, "seq": self.seq, "event": event,
            "local": self.local, "remote": self.remote,
        }
        if self.remote_name and event == "connect":
            rec["remote_name"] = self.remote_name
        rec.update(fields)
        try:
            self.log.write(rec)
        except Exception:
            pass  # a diagnostic log must never break a session

    def command(self, line: bytes | str, invalid: str | None = None) -> None:
        """A line from the SMTP client (the peer for a receive connector, us for a send connector)."""
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        text = text.rstrip("\r\n")
        if self._sasl:
            text = REDACTED
        elif text[:5].upper() in ("AUTH ", "AUTH"):
            text = redact_command(text)
            self._sasl = True
        fields: dict[str, Any] = {"line": text}
        if invalid:
            fields["invalid"] = invalid
        self.record("command", **fields)

    def reply(self, reply: Reply) -> None:
        """A reply from the SMTP server."""
        if self._sasl and reply.code == 334:
            self.record("reply", code=334, line=f"334 {REDACTED}")
            return
        self._sasl = False
        self.record("reply", code=reply.code, line=str(reply))

    def data(self, size: int, kind: str = "DATA") -> None:
        """Message content went by: only its size is logged."""
        self.record("data", line=f"<{size} octets>", size=size, kind=kind)

    def tls(self, version: str | None, cipher: str | None, peer_subject: str | None = None) -> None:
        fields: dict[str, Any] = {"tls_version": version, "tls_cipher": cipher}
        if peer_subject:
            fields["peer_certificate"] = peer_subject
        self.record("tls", **fields)

    def end(self, reason: str | None = None) -> None:
        if self.closed:
            return
        self.record("disconnect", **({"reason": reason} if reason else {}))
        self.closed = True


class ProtocolLogs:
    """The protocol logs of a server: ``<directory>/<direction>-<connector>.jsonl``, made on demand."""

    def __init__(self, directory: str, clock: Any, **rotation: Any) -> None:
        self.directory = directory
        self.clock = clock
        self.rotation = rotation
        self.logs: dict[tuple[str, str], ProtocolLog] = {}

    def get(self, direction: str, connector: str, level: str) -> ProtocolLog | None:
        """The log for a connector, or None when its level is "off" (zero cost)."""
        if level != "verbose":
            return None
        key = (direction, connector)
        if key not in self.logs:
            path = os.path.join(self.directory, f"{direction}-{connector}.jsonl")
            self.logs[key] = ProtocolLog(connector, direction, RotatingLog(path, self.clock, **self.rotation))
        return self.logs[key]

    def close(self) -> None:
        for log in self.logs.values():
            log.close()
