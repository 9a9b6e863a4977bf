"""LMTP send connector (RFC 2033), e.g. to Dovecot's LMTP service.

A thin variant of :class:`~exmta.send.smtp.SMTPSendConnector`: LHLO instead
of EHLO, one reply per accepted recipient after the data, and a single
fixed target from ``config.lmtp`` ("host:port", "[v6]:port" or
"unix:/path"). No DNS.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from twisted.internet.interfaces import IReactorTime

from exmta.config.schema import SendConnectorConfig
from exmta.send.smtp import SMTPSendConnector
from exmta.smtp.client import ClientTimeouts

__all__ = ["LMTPSendConnector"]


class LMTPSendConnector(SMTPSendConnector):
    """ISendConnector over LMTP; ``config.lmtp`` names the server."""

    def __init__(
        self,
        config: SendConnectorConfig,
        reactor: Any,
        clock: IReactorTime,
        hostname: str,
        tls_context: Any = None,
        *,
        timeouts: ClientTimeouts | None = None,
        idle_timeout: float = 10.0,
    ) -> None:
        if not config.lmtp:
            raise ValueError(f"send connector {config.name}: kind lmtp needs an lmtp target")
        if config.kind != "lmtp":
            config = dataclasses.replace(config, kind="lmtp")
        super().__init__(config, reactor, clock, None, hostname, tls_context,
                         timeouts=timeouts, idle_timeout=idle_timeout)
