"""What the SMTP client reads: the reply parser (sans-IO) and the client's failures.

:class:`ReplyParser` turns the server's byte stream into :class:`~exmta.model.Reply`
objects, bounded in line length and reply size; every failure of a client session is
a :class:`ClientError` carrying the reply a delivery result should record.
"""
from __future__ import annotations

import re

from exmta.model import Reply
from exmta.textsafe import escape_controls

__all__ = [
    "ClientError", "ConnectionLostError", "MAX_REPLY_LINE", "MAX_REPLY_LINES", "ProtocolError",
    "ReplyParser", "ReplyTimeout", "SessionFailure", "StaleConnection", "local_reply",
]

MAX_REPLY_LINE = 4096           # RFC 5321 says 512; be lenient, but bounded
MAX_REPLY_LINES = 200           # a multi-line reply longer than this is hostile


# ---------------------------------------------------------------- errors


class ClientError(Exception):
    """Base of the client's failures; ``reply`` is what a result should carry."""

    reply: Reply

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class ProtocolError(ClientError):
    """The server sent something that is not an SMTP reply."""


class ReplyTimeout(ClientError):
    """No (complete) reply within the phase's timeout."""


class ConnectionLostError(ClientError):
    """The connection closed while we waited for a reply."""


class SessionFailure(ClientError):
    """The session could not be set up (greeting, EHLO, STARTTLS, AUTH).

    ``permanent`` says whether the failure is worth a bounce; the send
    connector normally tries the next host first.
    """

    def __init__(self, reply: Reply, phase: str, permanent: bool = False) -> None:
        super().__init__(reply)
        self.phase = phase
        self.permanent = permanent


class StaleConnection(Exception):
    """A reused connection failed before the transaction started (RSET)."""


# ---------------------------------------------------------------- reply parsing


_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -]|$)(.*)$", re.DOTALL)
_ENHANCED = re.compile(r"^([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |$)")


def _split_status(code: int, text: str) -> tuple[str | None, str]:
    m = _ENHANCED.match(text)
    if m and int(m.group(1)) == code // 100:
        status = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        return status, text[m.end():]
    return None, text


class ReplyParser:
    """Turns a byte stream into :class:`Reply` objects; sans-IO.

    Lines end in CRLF (a bare LF is tolerated: some servers send it).
    Raises :class:`ProtocolError` for garbage lines, inconsistent codes in a
    multi-line reply, over-long lines and over-long replies.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._code: int | None = None
        self._lines: list[str] = []
        self._status: str | None = None

    @property
    def partial(self) -> bool:
        """True when part of a reply has arrived (a connection loss now truncates it)."""
        return bool(self._buffer) or self._code is not None

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        replies: list[Reply] = []
        while True:
            idx = self._buffer.find(b"\n")
            if idx < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    raise ProtocolError(local_reply(451, "4.5.0", "Reply line too long from remote server"))
                return replies
            line, self._buffer = self._buffer[:idx], self._buffer[idx + 1:]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > MAX_REPLY_LINE:
                raise ProtocolError(local_reply(451, "4.5.0", "Reply line too long from remote server"))
            reply = self._line(line)
            if reply is not None:
                replies.append(reply)

    def _line(self, line: bytes) -> Reply | None:
        m = _REPLY_LINE.match(line)
        if m is None:
            shown = line[:80].decode("utf-8", "replace")
            raise ProtocolError(local_reply(451, "4.5.0", f"Malformed reply from remote server: {shown!r}"))
        code = int(m.group(1))
        if self._code is not None and code != self._code:
            raise ProtocolError(local_reply(
                451, "4.5.0", f"Inconsistent multi-line reply from remote server ({self._code} then {code})"))
        text = escape_controls(m.group(3).decode("utf-8", "replace"))  # stored, logged and printed later
        status, text = _split_status(code, text)
        if self._code is None:
            self._code, self._status = code, status
        self._lines.append(text)
        if len(self._lines) > MAX_REPLY_LINES:
            raise ProtocolError(local_reply(451, "4.5.0", "Reply too long from remote server"))
        if m.group(2) == b"-":
            return None
        reply = Reply(code, self._status, tuple(self._lines))
        self._code, self._status, self._lines = None, None, []
        return reply


def local_reply(code: int, status: str, text: str) -> Reply:
    """A reply made up here (not received), e.g. for a protocol error."""
    return Reply.make(code, status, text)
