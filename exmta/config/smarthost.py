"""The ``smarthosts`` converter: ``"host"``, ``"host:port"`` or ``"[host]:port"`` -> SmartHost.

Used by the loader for ``[send.NAME] smarthosts``, and by the admin API and the scheduler for
operator-given hosts, so that all three accept the same forms with the same error texts.
"""
from __future__ import annotations

from typing import Any

from exmta.config.reader import nonempty_string
from exmta.config.schema import SmartHost

__all__ = ["smarthost"]


def smarthost(v: Any) -> SmartHost:
    s = nonempty_string(v).strip()
    host, port = s, 25
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"{s!r}: unmatched '['")
        host, rest = s[1:end], s[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{s!r}: expected \"[host]:port\"")
            port = _port(rest[1:], s)
    elif s.count(":") == 1:
        host, p = s.split(":")
        port = _port(p, s)
    if not host:
        raise ValueError(f"{s!r}: the host is empty")
    return SmartHost(host, port)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r}: {text!r} is not a port number")
    return int(text)
