"""Writing a reply or command straight to a plain TCP socket.

Twisted's ``transport.write`` buffers the data and sends it from the next
poll, switching the socket's epoll interest on and off around it: two
epoll_ctl calls and a loop iteration per SMTP line, on every message. When
nothing is waiting in the transport's buffer, :func:`write_now` sends at
once and hands only what the kernel did not take to ``transport.write``.
TLS and anything that is not a plain ``twisted.internet.tcp`` connection
(under pass-through wrappers) always go through ``transport.write``.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.protocols.policies import ProtocolWrapper

__all__ = ["plain_tcp", "write_now"]


def plain_tcp(transport: Any) -> Any:
    """The twisted.internet.tcp connection under pass-through wrappers, or None."""
    t = transport
    for _ in range(4):  # the connector dispatcher and the PROXY-protocol wrapper may sit in between
        if isinstance(t, tcp.Connection):
            return t if hasattr(t, "TLS") and hasattr(t, "_tempDataBuffer") else None
        if not isinstance(t, ProtocolWrapper) or type(t).write is not ProtocolWrapper.write:
            return None
        t = t.transport
    return None


def write_now(transport: Any, conn: Any, data: bytes) -> None:
    """Send ``data`` on ``conn`` (from :func:`plain_tcp`) if its buffer is empty, the rest via transport."""
    sent = 0
    if conn is not None and not (conn.dataBuffer or conn._tempDataBuffer or conn.disconnecting or conn.TLS):
        try:
            sent = conn.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error that write() meets and reports as usual
    if sent < len(data):
        transport.write(data[sent:] if sent else data)
