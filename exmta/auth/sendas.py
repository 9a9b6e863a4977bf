"""Send-as grants: which envelope senders and From: addresses an authenticated user may use.

Grants come from the users file (explicit addresses, ``*@domain`` wildcards,
``*`` for any address) or from the directory (``mail`` and the ``smtp:`` /
``SMTP:`` values of ``proxyAddresses``). Addresses compare case-insensitively,
as Exchange compares SMTP addresses. A refused sender gets Exchange's
SendAs-denied reply, ``550 5.7.60``.
"""
from __future__ import annotations

import email.utils
from dataclasses import dataclass
from typing import Iterable

from exmta.model import Reply

__all__ = ["SendAsGrants", "SEND_AS_DENIED", "check_grant_pattern", "from_addresses", "proxy_addresses"]

#: Exchange's reply when a client may not send as the address it used
SEND_AS_DENIED = Reply.make(550, "5.7.60", "Client does not have permissions to send as this sender")


def check_grant_pattern(pattern: str) -> str:
    """A grant in canonical (lower case) form, or ValueError: ``user@domain``, ``*@domain`` or ``*``."""
    p = pattern.strip().lower()
    if p == "*":
        return p
    local, at, domain = p.rpartition("@")
    if not at or not local or not domain or "*" in domain or ("*" in local and local != "*"):
        raise ValueError(f"{pattern!r} is not an address, \"*@domain\" or \"*\"")
    if any(c.isspace() or c in "<>,;" for c in p):
        raise ValueError(f"{pattern!r} contains a space or one of <>,;")
    return p


@dataclass(frozen=True)
class SendAsGrants:
    """The addresses one user may send as."""

    addresses: frozenset[str] = frozenset()   # lower case user@domain
    domains: frozenset[str] = frozenset()     # lower case domain, from "*@domain"
    any_address: bool = False                 # "*": any sender (Exchange's Accept-Any-Sender)

    @classmethod
    def from_patterns(cls, patterns: Iterable[str]) -> SendAsGrants:
        addresses, domains, any_address = set(), set(), False
        for raw in patterns:
            p = check_grant_pattern(raw)
            if p == "*":
                any_address = True
            elif p.startswith("*@"):
                domains.add(p[2:].rstrip("."))
            else:
                addresses.add(p)
        return cls(frozenset(addresses), frozenset(domains), any_address)

    def allows(self, address: str) -> bool:
        """Whether ``address`` (``local@domain``; "" is the null sender) is granted."""
        if self.any_address:
            return True
        a = address.strip().lower()
        local, at, domain = a.rpartition("@")
        if not at or not local or not domain:
            return False  # the null sender and bare local parts need "*"
        domain = domain.rstrip(".")
        return f"{local}@{domain}" in self.addresses or domain in self.domains

    def describe(self) -> list[str]:
        out = ["*"] if self.any_address else []
        return out + sorted(self.addresses) + sorted(f"*@{d}" for d in self.domains)


def proxy_addresses(values: Iterable[str]) -> list[str]:
    """The SMTP addresses among AD ``proxyAddresses`` values (``SMTP:`` primary, ``smtp:`` secondary)."""
    out = []
    for v in values:
        kind, sep, address = str(v).partition(":")
        if sep and kind.lower() == "smtp" and "@" in address:
            out.append(address.strip())
    return out


def from_addresses(values: Iterable[str]) -> list[str] | None:
    """The addresses in the given From: field values; None when one of them cannot be parsed."""
    out: list[str] = []
    for value in values:
        text = str(value).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        pairs = email.utils.getaddresses([text])
        found = [addr for _, addr in pairs if addr]
        if not found or any("@" not in a for a in found):
            return None
        out.extend(found)
    return out
