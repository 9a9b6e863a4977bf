"""The Received header that heads every message exmta accepts (RFC 5321 4.4, RFC 3848 protocol names).

Built once per message, when the store writer opens and before any content arrives, from the
session (HELO name, peer address, TLS, AUTH) and the transaction (SMTPUTF8, the one recipient).
"""
from __future__ import annotations

import email.utils
import functools
import ipaddress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exmta.smtp.server import ESMTPServer

__all__ = ["received_header"]


def _printable(text: str, utf8: bool = False) -> str:
    """Text safe for a header field: printable, no CR/LF; ASCII unless the message is SMTPUTF8."""
    if text.isprintable() and (utf8 or text.isascii()):
        return text  # the usual case, without a Python loop over the characters
    return "".join(c if c.isprintable() and (utf8 or c.isascii()) else "?" for c in text)


@functools.lru_cache(maxsize=4)  # a new string once a second, not once per message
def _header_date(second: int) -> str:
    """The RFC 5322 date of the Received header, local time (seconds resolution)."""
    return email.utils.formatdate(second, localtime=True)


@functools.lru_cache(maxsize=4096)  # once per message, with the same few peers
def _address_literal(peer_ip: str) -> str:
    """The peer as an address literal for the Received header: ``[192.0.2.1]``, ``[IPv6:2001:db8::1]``."""
    try:
        ip = ipaddress.ip_address(peer_ip)
    except ValueError:
        return f"[{_printable(peer_ip) or 'unknown'}]"
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


def received_header(server: ESMTPServer, queue_id: str) -> bytes:
    """The Received header exmta writes first into a message (RFC 5321 4.4), with its CRLF."""
    assert server.session is not None and server.txn is not None
    s = server.session
    literal = _address_literal(s.peer_ip)
    if not s.esmtp:
        proto = "SMTP"
    else:
        proto = "ESMTP"
        if server.txn.params.smtputf8:
            proto = "UTF8SMTP"
        suffix = ("S" if server.tls_active else "") + ("A" if s.auth_identity else "")
        proto += suffix
    utf8 = server.txn.params.smtputf8
    lines = [f"Received: from {_printable(s.helo_name or 'unknown', utf8)} ({literal})"]
    if s.tls is not None:
        lines.append(f"\t(using {_printable(s.tls.version)} with cipher {_printable(s.tls.cipher)})")
    lines.append(f"\tby {server.config.hostname} (exmta) with {proto} id {queue_id}")
    date = _header_date(int(server.clock.seconds()))
    if len(server.txn.recipients) == 1:
        rcpt = server.txn.recipients[0][0]
        lines.append(f"\tfor <{_printable(str(rcpt), utf8)}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
