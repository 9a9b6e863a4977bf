# -*- test-case-name: tests.admin.test_textsafe -*-
"""Text from other hosts made safe to store and to print on an operator's terminal.

A next hop's reply (or a header) can carry terminal escape sequences: ESC
(``\\x1b``), the 8-bit CSI (``\\x9b``), bell, backspace, carriage return, or
bidirectional overrides that reorder what is shown. :func:`escape_controls`
replaces each with a visible ``\\xNN`` / ``\\uNNNN`` escape; ordinary text,
UTF-8 included, is unchanged.
"""
from __future__ import annotations

import re

__all__ = ["escape_controls", "escape_controls_json"]

# C0 controls, DEL, C1 controls, and the Unicode bidi embedding/override/isolate controls
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group(0))
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def escape_controls(text: str, keep: str = "") -> str:
    """``text`` with every control character not in ``keep`` shown as an escape (``"\\x1b"``)."""
    if not keep:
        return _CONTROLS.sub(_escape, text)
    return _CONTROLS.sub(lambda m: m.group(0) if m.group(0) in keep else _escape(m), text)


def escape_controls_json(text: str) -> str:
    """JSON text (as ``json.dumps(..., ensure_ascii=False)`` writes it) with the control characters
    JSON leaves raw (DEL, C1, bidi) as ``\\uNNNN``; still valid JSON, the same values. Newlines stay."""
    return _CONTROLS.sub(lambda m: m.group(0) if m.group(0) == "\n" else f"\\u{ord(m.group(0)):04x}", text)
