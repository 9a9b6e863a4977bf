"""Test helpers for transport rules and third-party rule extensions: no network, no reactor.

Example::

    from exmta.testing import RuleHarness

    def test_vip_tag():
        h = RuleHarness('''
            [[rule]]
            name = "VIP"
            [rule.conditions]
            SenderIsVip = true
            [rule.actions]
            PrependSubject = "[VIP] "
        ''', extensions={"SenderIsVip": VipCondition})
        d = h.run(b"From: ceo@example.test\\r\\nSubject: hi\\r\\n\\r\\nbody\\r\\n", "ceo@example.test", "a@b.test")
        assert d.hits[0].rule == "VIP"
        assert h.leaving(d).startswith(b"From: ceo@example.test\\r\\nSubject: [VIP] hi")

The harness loads the rules exactly as the server does (every problem is a
``ConfigError``) and evaluates them synchronously on the bytes given.
"""
from __future__ import annotations

import textwrap
import tomllib
from typing import Any, Mapping

from exmta.message import Limits, MimeMessage
from exmta.rules.context import RuleContext
from exmta.rules.decision import Decision
from exmta.rules.plugins import discover
from exmta.rules.ruleset import RuleSet, parse_rules

__all__ = ["RuleHarness"]


class RuleHarness:
    """Rules from TOML text plus optional extensions ``{key: IRuleExtension provider}``."""

    def __init__(self, rules_toml: str, extensions: Mapping[str, Any] | None = None, *,
                 internal_domains: tuple[str, ...] = ("example.test",), limits: Limits | None = None,
                 now: float = 1_800_000_000.0) -> None:
        found, problems = discover(lambda group: dict(extensions or {}))
        if problems:
            raise ValueError("; ".join(problems))
        self.ruleset: RuleSet = parse_rules(tomllib.loads(textwrap.dedent(rules_toml)), "<harness>",
                                            plugins=found, limits=limits)
        self.internal_domains = tuple(d.lower() for d in internal_domains)
        self.now = now
        self._raw = b""

    def context(self, raw: bytes, sender: str, *recipients: str, **kw: Any) -> RuleContext:
        kw.setdefault("internal_domain", lambda d: d in self.internal_domains)
        kw.setdefault("now", self.now)
        return RuleContext(MimeMessage(raw, self.ruleset.limits), sender, tuple(recipients), **kw)

    def run(self, raw: bytes, sender: str, *recipients: str, **kw: Any) -> Decision:
        """The Decision for a message; ``kw`` sets RuleContext fields (``trusted``, ``client_ip``, ...)."""
        self._raw = raw
        return self.ruleset.evaluate(self.context(raw, sender, *recipients, **kw))

    def leaving(self, decision: Decision, raw: bytes | None = None) -> bytes:
        """The message as it would leave after ``decision`` (the last message run by default)."""
        return decision.apply_to(self._raw if raw is None else raw)
