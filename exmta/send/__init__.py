"""Send connectors (ISendConnector): SMTP to smart hosts or MX, LMTP to mailbox servers.

The connector classes live in :mod:`exmta.send.smtp` and
:mod:`exmta.send.lmtp`.  :func:`build_wire_connector` picks one from a
config; it imports lazily, so importing this package costs nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exmta.config.schema import SendConnectorConfig
    from exmta.routing.dns import DNSResolver
    from exmta.send.smtp import SMTPSendConnector

__all__ = ["build_wire_connector"]


def build_wire_connector(
    config: SendConnectorConfig,
    reactor: Any,
    clock: Any,
    resolver: DNSResolver | None,
    hostname: str,
    tls_context: Any = None,
) -> SMTPSendConnector:
    """An SMTP or LMTP send connector for ``config.kind`` "smtp" / "lmtp".

    ``resolver`` is only used by SMTP connectors without smart hosts (MX);
    ``tls_context`` is a client context factory, or ``(hostname) -> factory``.
    """
    if config.kind == "smtp":
        from exmta.send.smtp import SMTPSendConnector
        return SMTPSendConnector(config, reactor, clock, resolver, hostname, tls_context)
    if config.kind == "lmtp":
        from exmta.send.lmtp import LMTPSendConnector
        return LMTPSendConnector(config, reactor, clock, hostname, tls_context)
    raise ValueError(f"send connector {config.name}: kind {config.kind!r} is not SMTP or LMTP")
