"""The built-in receive policy: accepted domains and relay networks, default deny.

A recipient is accepted when its domain is an accepted domain (Exchange's
authoritative, internal relay or external relay kinds alike) or when the
client may relay (its IP is in a relay network, or it authenticated).
Everything else gets ``554 5.7.1 Relay access denied``.

Anonymous clients are also refused the classic open-relay test tricks
(Postfix's ``allow_untrusted_routing = no`` and the RFC 2505 checks):
sender-specified routing with ``%`` or ``!`` in the local part, a quoted
local part hiding an ``@``, address literals (``user@[192.0.2.1]``) and
domains with a trailing dot, which some resolvers and routers treat
differently from the name without it.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Callable, Sequence

from twisted.logger import Logger
from zope.interface import implementer

from exmta.config.schema import AcceptedDomain
from exmta.interfaces import IReceivePolicy
from exmta.model import Address, Verdict

__all__ = ["DefaultReceivePolicy", "RELAY_DENIED", "routing_trick"]

log = Logger()

RELAY_DENIED = Verdict.reject(554, "5.7.1", "Relay access denied")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:192.0.2.1 on a dual-stack socket is 192.0.2.1
    return ip


def routing_trick(rcpt: Address) -> str | None:
    """Why ``rcpt`` looks like sender-specified routing or an evasion, or None when it is plain."""
    local = rcpt.local
    if local.startswith('"'):
        inner = local[1:-1]
        if "@" in inner:
            return "quoted local part containing @"
        if "%" in inner or "!" in inner:
            return "quoted local part containing routing characters"
    else:
        if "%" in local:
            return "percent hack"
        if "!" in local:
            return "bang path"
    if rcpt.domain.startswith("["):
        return "address literal"
    if rcpt.domain.endswith("."):
        return "trailing dot in domain"
    return None


@implementer(IReceivePolicy)
class DefaultReceivePolicy:
    """Accepted domains plus relay networks; see the module docstring.

    ``accepted_domain`` maps a domain (lower case, no trailing dot) to its
    AcceptedDomain or None, e.g. ``Config.accepted_domain``.
    ``relay_networks`` are CIDRs (v4 or v6; a bare address is a /32 or /128).
    """

    def __init__(
        self,
        accepted_domain: Callable[[str], AcceptedDomain | None],
        relay_networks: Sequence[str],
        relay_authenticated: bool = True,
    ) -> None:
        self.accepted_domain = accepted_domain
        self.relay_networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(n.strip(), strict=False) for n in relay_networks
        )
        self.relay_authenticated = relay_authenticated

    def may_relay(self, session: Any) -> bool:
        """Whether this client may send to any domain."""
        if self.relay_authenticated and getattr(session, "auth_identity", None):
            return True
        ip = _parse_ip(session.peer_ip)
        if ip is None:
            return False
        return any(ip.version == net.version and ip in net for net in self.relay_networks)

    def check_connect(self, session: Any) -> Verdict:
        return Verdict.CONTINUE

    def check_mail(self, session: Any, sender: Address, params: Any) -> Verdict:
        return Verdict.CONTINUE

    def authorize_rcpt(self, session: Any, txn: Any, rcpt: Address, params: Any) -> Verdict:
        if self.may_relay(session):
            return Verdict.ACCEPT
        trick = routing_trick(rcpt)
        if trick is not None:
            log.info(
                "session {session_id}: recipient <{rcpt}> refused for {peer_ip}: {trick}",
                session_id=session.session_id, rcpt=str(rcpt), peer_ip=session.peer_ip, trick=trick,
            )
            return RELAY_DENIED
        if rcpt.domain and self.accepted_domain(rcpt.domain_key) is not None:
            return Verdict.ACCEPT
        log.info(
            "session {session_id}: relay denied for {peer_ip} to <{rcpt}>",
            session_id=session.session_id, rcpt=str(rcpt), peer_ip=session.peer_ip,
        )
        return RELAY_DENIED
