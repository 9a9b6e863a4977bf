"""Stand-ins for ESMTP server and client tests: a receive policy and a STARTTLS-capable StringTransport."""
from __future__ import annotations

from typing import Any, Iterable

from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from exmta.interfaces import IReceivePolicy
from exmta.model import Verdict


@implementer(IReceivePolicy)
class StubPolicy:
    """CONTINUE at connect and MAIL; at RCPT accept everyone, or only some.

    With ``local_domains`` and/or ``relay_authenticated`` set, a recipient is
    accepted when its domain is local or the session has authenticated, and
    refused ``554 5.7.1 Relay access denied`` otherwise. ``tls_at_mail``
    records ``session.tls`` as the policy sees it at each MAIL.
    """

    def __init__(self, local_domains: Iterable[str] | None = None, relay_authenticated: bool = False) -> None:
        self.local_domains = None if local_domains is None else frozenset(local_domains)
        self.relay_authenticated = relay_authenticated
        self.tls_at_mail: list[Any] = []

    def check_connect(self, session: Any) -> Verdict:
        return Verdict.CONTINUE

    def check_mail(self, session: Any, sender: Any, params: Any) -> Verdict:
        self.tls_at_mail.append(session.tls)
        return Verdict.CONTINUE

    def authorize_rcpt(self, session: Any, txn: Any, rcpt: Any, params: Any) -> Verdict:
        if self.local_domains is None and not self.relay_authenticated:
            return Verdict.ACCEPT
        if rcpt.domain_key in (self.local_domains or ()):
            return Verdict.ACCEPT
        if self.relay_authenticated and session.auth_identity:
            return Verdict.ACCEPT
        return Verdict.reject(554, "5.7.1", "Relay access denied")


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that offers startTLS and records the context it was given (no handshake)."""

    tls_started_with: Any = None

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        self.tls_started_with = contextFactory
