"""The client side of SASL XOAUTH2 (Google's and Microsoft's bearer-token login for SMTP).

One exchange, as the mechanism's spec and Exchange Online have it::

    C: AUTH XOAUTH2 base64("user=" user ^A "auth=Bearer " token ^A ^A)
    S: 235 2.7.0 Authentication successful
  or, when the token is refused:
    S: 334 base64({"status":"401","schemes":"bearer","scope":"..."})
    C: (an empty line)
    S: 535 5.7.8 Authentication failed
  or (Exchange Online) a 535 at once.

After a 535 that says the token is invalid (status 401, or no error JSON),
the token is dropped from the cache and the login tried once more with a new
one.  The token is sent only on a TLS session (the caller verified the
certificate; ``check-config`` insists on it), and the protocol log shows
``AUTH XOAUTH2 <redacted>``.  Every failure is a :class:`SessionFailure`
with a 4xx reply: a refused login is a configuration problem, and the mail
waits until it is fixed.
"""
from __future__ import annotations

import base64
import binascii
import json
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from exmta.model import Reply
from exmta.send.token_error import TokenError
from exmta.smtp.client import SessionFailure, SMTPClientProtocol

if TYPE_CHECKING:  # annotations only: exmta.send.oauth2 builds the logins of this module
    from exmta.send.oauth2 import TokenSource

__all__ = ["XOAuth2Login", "error_details", "initial_response"]

log = Logger()


def initial_response(user: str, token: str) -> str:
    """The base64 initial client response of XOAUTH2."""
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode("utf-8")).decode("ascii")


def error_details(challenge: Reply) -> dict[str, Any]:
    """The error JSON of a ``334`` challenge ({} when it is not base64 JSON)."""
    try:
        doc = json.loads(base64.b64decode(challenge.text.strip(), validate=True))
    except (binascii.Error, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _failure(text: str, status: str = "4.7.0", code: int = 451) -> SessionFailure:
    return SessionFailure(Reply.make(code, status, text), "AUTH")


class XOAuth2Login:
    """Logs one session in as ``user`` with a token from ``tokens``."""

    def __init__(self, user: str, tokens: TokenSource) -> None:
        self.user = user
        self.tokens = tokens

    async def authenticate(self, proto: SMTPClientProtocol) -> None:
        """Run the exchange on an established (EHLO done, TLS up) session; SessionFailure if refused."""
        remote = proto.remote_host or "the remote server"
        if proto.tls is None:
            raise _failure(f"XOAUTH2 needs TLS: not sending the token in clear to {remote}", "4.7.5")
        mechanisms = set(proto.capabilities.get("AUTH", "").upper().split())
        if "XOAUTH2" not in mechanisms:
            raise _failure(f"{remote} does not offer AUTH XOAUTH2 (offers: {' '.join(sorted(mechanisms)) or 'none'})",
                           "4.7.4")
        reply: Reply | None = None
        details: dict[str, Any] = {}
        for attempt in (1, 2):
            try:
                token = await self.tokens.token()
            except TokenError as exc:
                raise SessionFailure(exc.reply, "AUTH") from None
            reply, details = await self._exchange(proto, token)
            if reply.code == 235:
                return
            invalid_token = reply.code == 535 and str(details.get("status", "401")) == "401"
            if attempt == 1 and invalid_token and self.tokens.invalidate(token):
                continue
            break
        assert reply is not None
        why = f" ({', '.join(f'{k}={v}' for k, v in sorted(details.items()))})" if details else ""
        log.warn("XOAUTH2 login as {user} at {remote} refused: {reply}{why}",
                 user=self.user, remote=remote, reply=str(reply), why=why)
        raise _failure(f"XOAUTH2 authentication as {self.user} failed: {reply}{why}",
                       code=reply.code if reply.is_transient else 451)

    async def _exchange(self, proto: SMTPClientProtocol, token: str) -> tuple[Reply, dict[str, Any]]:
        timeout = proto.timeouts.auth
        reply = await proto._command(f"AUTH XOAUTH2 {initial_response(self.user, token)}", timeout, "AUTH")
        details: dict[str, Any] = {}
        if reply.code == 334:
            # the error JSON; the spec wants an empty response, then the final 535
            details = error_details(reply)
            reply = await proto._command("", timeout, "AUTH")
            if reply.code == 334:  # still challenging: cancel (RFC 4954 4)
                reply = await proto._command("*", timeout, "AUTH")
        return reply, details
