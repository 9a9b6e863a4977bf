"""Helpers for the transport rule tests: a context from bytes and a rules file from TOML text."""
from __future__ import annotations

import tomllib

from exmta.message import MimeMessage
from exmta.rules import RuleContext, parse_rules

ACCEPTED = ("example.test",)


def ctx(raw: bytes, sender: str = "alice@example.test", *recipients: str, **kw) -> RuleContext:
    kw.setdefault("internal_domain", lambda d: d in ACCEPTED or d.endswith(".example.test"))
    kw.setdefault("now", 1_800_000_000.0)
    return RuleContext(MimeMessage(raw), sender, tuple(recipients or ("bob@partner.test",)), **kw)


def rules(text: str, **kw):
    return parse_rules(tomllib.loads(text), "<test>", **kw)
