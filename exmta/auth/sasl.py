"""SASL PLAIN (RFC 4616) and LOGIN exchanges for SMTP AUTH (RFC 4954), sans-IO.

A mechanism object takes the optional initial response and then each
client line, and answers with either a challenge to send in a ``334`` reply
or the decoded :class:`Credentials`. Malformed input raises
:class:`SASLError` carrying the reply. Passwords only ever live in
:class:`Credentials`, whose repr hides them, so they cannot reach a log.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from exmta.model import Reply

__all__ = [
    "BAD_BASE64", "CANCELLED", "Credentials", "LoginMechanism", "MECHANISMS", "PlainMechanism",
    "SASLError", "decode_response",
]

CANCELLED = Reply.make(501, "5.7.0", "Authentication cancelled")
BAD_BASE64 = Reply.make(501, "5.5.2", "Error: cannot decode the response (invalid base64)")
BAD_PLAIN = Reply.make(501, "5.5.2", "Error: PLAIN response must be authzid NUL authcid NUL password")
BAD_TEXT = Reply.make(501, "5.5.2", "Error: user name and password must be UTF-8 without NUL")
TOO_LONG = Reply.make(501, "5.5.2", "Error: authentication field too long")

#: RFC 4616 limits authcid and passwd to 255 octets; we allow a little more for long UPNs and passphrases
MAX_FIELD = 1024


class SASLError(Exception):
    """The exchange ends with ``reply`` (a syntax problem or a cancel, not a failed login)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True)
class Credentials:
    """What a client sent: the user name, the password and the PLAIN authorization identity."""

    username: str
    password: str = field(repr=False)
    authzid: str = ""


def decode_response(data: bytes) -> bytes:
    """A client response: ``*`` cancels, ``=`` is empty (RFC 4954 4), anything else strict base64."""
    text = data.strip()
    if text == b"*":
        raise SASLError(CANCELLED)
    if text == b"=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SASLError(BAD_BASE64) from None


def _text(raw: bytes) -> str:
    if len(raw) > MAX_FIELD:
        raise SASLError(TOO_LONG)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(BAD_TEXT) from None
    if "\x00" in text:
        raise SASLError(BAD_TEXT)
    return text


class PlainMechanism:
    """PLAIN: one response, ``[authzid] NUL authcid NUL passwd``."""

    name = "PLAIN"

    def start(self, initial: bytes | None) -> bytes | Credentials:
        """``initial`` is the raw initial response (still base64), or None: then send an empty challenge."""
        if initial is None:
            return b""
        return self.respond(initial)

    def respond(self, line: bytes) -> bytes | Credentials:
        parts = decode_response(line).split(b"\x00")
        if len(parts) != 3:
            raise SASLError(BAD_PLAIN)
        authzid, username, password = (_text(p) for p in parts)
        return Credentials(username, password, authzid)


class LoginMechanism:
    """LOGIN (draft-murchison-sasl-login): ``Username:`` then ``Password:``, each base64."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._username: str | None = None

    def start(self, initial: bytes | None) -> bytes | Credentials:
        if initial is None:
            return b"Username:"
        return self.respond(initial)

    def respond(self, line: bytes) -> bytes | Credentials:
        value = _text(decode_response(line))
        if self._username is None:
            self._username = value
            return b"Password:"
        return Credentials(self._username, value)


MECHANISMS: dict[str, type[PlainMechanism] | type[LoginMechanism]] = {
    "PLAIN": PlainMechanism,
    "LOGIN": LoginMechanism,
}
