"""The rules file: TOML in, an ordered :class:`RuleSet` out, every problem reported at once.

::

    [[rule]]
    name = "Tag external mail"
    priority = 0                          # lower runs first; unique
    mode = "enforce"                      # enforce | audit | audit_and_notify
    sender_address_location = "header_or_envelope"   # envelope | header | header_or_envelope
    [rule.conditions]
    FromScope = "NotInOrganization"
    [rule.exceptions]
    SenderDomainIs = ["partner.example"]
    [rule.actions]
    PrependSubject = "[EXTERNAL] "

Conditions are ANDed, the values of one condition ORed, any exception
vetoes (a recipient exception removes those recipients), and every action
of a matching rule runs (Exchange's semantics). :meth:`RuleSet.evaluate`
is pure and synchronous: the core runs it on a bounded thread pool.
"""
from __future__ import annotations

import datetime as dt
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from exmta.config.reader import ConfigError
from exmta.message import Limits
from exmta.rules.actions import RuleAction, build_actions
from exmta.rules.conditions import Condition, attachment_part_filter, build_condition
from exmta.rules.context import SENDER_LOCATIONS, RuleContext
from exmta.rules.decision import Decision, DecisionBuilder, RuleHit

__all__ = ["MODES", "Rule", "RuleSet", "load_rules", "parse_rules"]

MODES = ("enforce", "audit", "audit_and_notify")
_RULE_KEYS = {"name", "priority", "enabled", "mode", "activation", "expiry", "stop_processing",
              "sender_address_location", "comments", "conditions", "exceptions", "actions"}
#: the header an audit_and_notify rule adds instead of acting (its "test notice")
AUDIT_NOTICE_HEADER = "X-Exmta-Rule-Test"


@dataclass(frozen=True)
class Rule:
    name: str
    priority: int
    conditions: tuple[Condition, ...]
    exceptions: tuple[Condition, ...]
    actions: tuple[RuleAction, ...]
    enabled: bool = True
    mode: str = "enforce"
    activation: float | None = None
    expiry: float | None = None
    stop_processing: bool = False
    sender_address_location: str = "header_or_envelope"
    comments: str = ""

    def active(self, now: float) -> bool:
        return self.enabled and (self.activation is None or now >= self.activation) and \
            (self.expiry is None or now < self.expiry)

    def match(self, ctx: RuleContext) -> RuleHit | None:
        """A hit (with the conditions that matched and the recipients concerned), or None."""
        loc = self.sender_address_location
        matched: list[str] = []
        rcpts = set(ctx.recipients)
        for cond in self.conditions:
            result = cond.match(ctx, loc)
            if isinstance(result, frozenset):
                rcpts &= result
                if not rcpts:
                    return None
            elif not result:
                return None
            matched.append(cond.describe())
        for exc in self.exceptions:
            result = exc.match(ctx, loc)
            if isinstance(result, frozenset):
                rcpts -= result
                if not rcpts:
                    return None
            elif result:
                return None
        if not self.conditions:
            matched.append("(every message)")
        return RuleHit(self.name, self.mode, matched, recipients=tuple(r for r in ctx.recipients if r in rcpts))


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...] = ()
    source: str = "<none>"
    limits: Limits = field(default_factory=Limits)

    def __len__(self) -> int:
        return len(self.rules)

    def evaluate(self, ctx: RuleContext) -> Decision:
        """Run every active rule in priority order on ``ctx`` and say what to do (no I/O)."""
        out = DecisionBuilder(ctx.message, self.limits)
        for rule in self.rules:
            if not rule.active(ctx.now):
                continue
            ctx.message = out.message
            hit = rule.match(ctx)
            if hit is None:
                continue
            if rule.mode == "enforce":
                for action in rule.actions:
                    action.apply(ctx, out, hit)
                    hit.actions.append(action.describe)
                    if out.finished:
                        break
            else:
                hit.actions.extend(f"(audit) {a.describe}" for a in rule.actions)
                if rule.mode == "audit_and_notify":
                    out.header_op("add", AUDIT_NOTICE_HEADER, _header_safe(rule.name))
            out.decision.hits.append(hit)
            if rule.stop_processing or out.finished:
                break
        ctx.message = out.message
        return out.decision


def _header_safe(text: str) -> str:
    return re.sub(r"[\r\n]+", " ", text) if text.isascii() else text.encode("ascii", "replace").decode()


def _timestamp(value: Any) -> float:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc)
    if not isinstance(value, dt.datetime):
        raise ValueError("must be a date-time such as 2026-01-01T00:00:00Z")
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


def _mode(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be enforce, audit or audit_and_notify")
    v = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", value).lower()  # Exchange's AuditAndNotify
    if v not in MODES:
        raise ValueError("must be enforce, audit or audit_and_notify")
    return v


def _location(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be envelope, header or header_or_envelope")
    v = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", value).lower()
    if v not in SENDER_LOCATIONS:
        raise ValueError("must be envelope, header or header_or_envelope")
    return v


def parse_rules(raw: dict[str, Any], source: str = "<string>",
                send_connector_known: Callable[[str], bool] | None = None,
                plugins: dict[str, dict[str, Any]] | None = None,
                limits: Limits | None = None) -> RuleSet:
    """A RuleSet from a parsed rules file; ConfigError lists every problem with rule name and key."""
    problems: list[str] = []
    plugins = plugins or {}
    cond_plugins = plugins.get("condition", {})
    action_plugins = plugins.get("action", {})
    unknown_top = sorted(set(raw) - {"rule"})
    for key in unknown_top:
        problems.append(f"{key}: unknown setting (a rules file holds [[rule]] tables)")
    entries = raw.get("rule", [])
    if not isinstance(entries, list):
        problems.append("rule: must be an array of tables ([[rule]])")
        entries = []
    rules: list[Rule] = []
    names: set[str] = set()
    priorities: dict[int, str] = {}
    for index, entry in enumerate(entries):
        where = f"rule[{index + 1}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a table")
            continue
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{where}.name: is required (a unique rule name)")
            name = where
        else:
            where = f"rule {name!r}"
            if name in names:
                problems.append(f"{where}.name: another rule has this name")
            names.add(name)

        def problem(key: str, message: str, _where: str = where) -> None:
            problems.append(f"{_where}.{key}: {message}")

        for key in sorted(set(entry) - _RULE_KEYS):
            problem(key, "unknown setting")
        kw: dict[str, Any] = {}
        for key, convert in (("mode", _mode), ("activation", _timestamp), ("expiry", _timestamp),
                             ("sender_address_location", _location)):
            if key in entry:
                try:
                    kw[key] = convert(entry[key])
                except (ValueError, TypeError) as e:
                    problem(key, str(e))
        for key in ("enabled", "stop_processing"):
            if key in entry:
                if isinstance(entry[key], bool):
                    kw[key] = entry[key]
                else:
                    problem(key, "must be true or false")
        priority = entry.get("priority", index)
        if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
            problem("priority", "must be an integer 0 or more")
            priority = index
        elif priority in priorities and "priority" in entry:
            problem("priority", f"rule {priorities[priority]!r} has priority {priority} too (priorities are unique)")
        priorities.setdefault(priority, name)
        if isinstance(entry.get("comments"), str):
            kw["comments"] = entry["comments"]
        conditions = _predicates(entry, "conditions", problem, cond_plugins)
        exceptions = _predicates(entry, "exceptions", problem, cond_plugins)
        actions_table = entry.get("actions", {})
        if not isinstance(actions_table, dict) or not actions_table:
            problem("actions", "is required: a table with at least one action")
            actions_table = {}

        def action_problem(key: str, message: str, _p: Callable[[str, str], None] = problem) -> None:
            _p(f"actions.{key}", message)

        part_filter = attachment_part_filter(entry.get("conditions") or {})
        actions = build_actions(actions_table, name, action_problem, part_filter, send_connector_known,
                                action_plugins)
        rules.append(Rule(name, priority, tuple(conditions), tuple(exceptions), tuple(actions), **kw))
    if problems:
        raise ConfigError(source, problems)
    rules.sort(key=lambda r: r.priority)
    return RuleSet(tuple(rules), source, limits or Limits())


def _predicates(entry: dict[str, Any], key: str, problem: Callable[[str, str], None],
                plugins: dict[str, Any]) -> list[Condition]:
    table = entry.get(key, {})
    if not isinstance(table, dict):
        problem(key, "must be a table")
        return []
    out = []
    for name, value in table.items():
        try:
            cond = build_condition(name, value, table, plugins)
        except KeyError:
            problem(f"{key}.{name}", "unknown condition (see docs/rules.rst for the list)")
            continue
        except (ValueError, TypeError) as e:
            problem(f"{key}.{name}", str(e))
            continue
        if cond is not None:
            out.append(cond)
    return out


def load_rules(path: str, **kw: Any) -> RuleSet:
    """Read and check a rules file; ConfigError (with every problem) when it is unusable."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, [f"cannot read the rules file: {e.strerror or e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"]) from None
    return parse_rules(raw, path, **kw)
