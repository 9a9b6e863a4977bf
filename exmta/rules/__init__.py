"""Exchange-style transport (mail flow) rules: conditions, exceptions and actions on every message.

The pieces: :mod:`.ruleset` (the TOML rules file and evaluation),
:mod:`.conditions` and :mod:`.actions` (Exchange's predicate and action
names), :mod:`.decision` (what the core must do), :mod:`.hook` (where the
core calls in: SMTP end of data, pickup, resubmission), :mod:`.cli`
(``exmta rules test|check|import``), :mod:`.exchange` (import from
Export-TransportRuleCollection) and :mod:`.plugins` (third-party extensions).
"""
from exmta.rules.context import RuleContext
from exmta.rules.decision import Decision, DecisionBuilder, RuleHit
from exmta.rules.ruleset import Rule, RuleSet, load_rules, parse_rules

__all__ = ["Decision", "DecisionBuilder", "Rule", "RuleContext", "RuleHit", "RuleSet", "load_rules", "parse_rules"]
