"""What a rule sees: the message, its envelope and where it came from (read-only for rules).

Rules never get the live SMTP transaction: the core builds one
:class:`RuleContext` per message from a copy of the envelope, and rules
answer with a :class:`~exmta.rules.decision.Decision` the core carries out.
"""
from __future__ import annotations

import email.utils
from dataclasses import dataclass, field
from typing import Callable

from exmta.message import MimeMessage

__all__ = ["RuleContext", "SENDER_LOCATIONS", "domain_of"]

SENDER_LOCATIONS = ("envelope", "header", "header_or_envelope")


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


@dataclass
class RuleContext:
    """One message as the rules evaluate it.

    ``internal_domain(domain)`` says whether a domain is one of ours (an
    accepted domain other than external_relay). ``trusted`` is true when the
    message came over an authenticated session or a connector whose
    permission groups make it internal (Exchange's FromScope needs both an
    internal address and such a session). ``member_of(address, group)``
    answers group membership from the directory, or is None when there is none.
    """

    message: MimeMessage
    sender: str
    recipients: tuple[str, ...]
    connector: str = ""
    client_ip: str | None = None
    authenticated: bool = False
    trusted: bool = False
    source: str = "SMTP"            # SMTP | PICKUP | RESUBMIT | TEST
    scl: int | None = None
    now: float = 0.0                # seconds since the epoch (activation and expiry dates)
    internal_domain: Callable[[str], bool] = lambda domain: False
    member_of: Callable[[str, str], bool] | None = None
    #: per-evaluation cache for conditions (e.g. extracted body text)
    cache: dict[object, object] = field(default_factory=dict)

    def header_senders(self) -> list[str]:
        """The From: addresses, lower case (parsed once per message version)."""
        key = ("from", id(self.message))
        found = self.cache.get(key)  # type: ignore[call-overload]
        if found is None:
            found = [addr.lower() for _, addr in email.utils.getaddresses(self.message.header_values("From")) if addr]
            self.cache[key] = found  # type: ignore[index]
        return list(found)

    def senders(self, location: str) -> list[str]:
        """The sender addresses a rule tests, per its sender_address_location."""
        envelope = [self.sender.lower()] if self.sender else []
        if location == "envelope":
            return envelope
        if location == "header":
            return self.header_senders()
        return list(dict.fromkeys(self.header_senders() + envelope))

    def is_internal(self, address: str) -> bool:
        return bool(domain_of(address)) and self.internal_domain(domain_of(address))
