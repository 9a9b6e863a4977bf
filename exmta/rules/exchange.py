"""Import Exchange's rule collection export into an exmta rules file.

``Export-TransportRuleCollection`` writes XML: ``<rules><rule name=...>
<version><commandBlock><![CDATA[New-TransportRule -Name '...' -SentToScope
'NotInOrganization' ...]]></commandBlock></version></rule></rules>``. Each
command block is tokenised as PowerShell arguments (quoted strings, ``$true``
/``$false``, comma-separated arrays, ``@(...)``), and each parameter mapped
to the exmta key of the same meaning. A parameter with no equivalent is
listed with the reason; a rule that lost a condition or exception is written
disabled (it would otherwise match more mail than in Exchange), and so is a
rule that lost an action (it would do less).
"""
from __future__ import annotations

import datetime as dt
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from exmta.rules.actions import ACTIONS
from exmta.rules.conditions import CONDITIONS

__all__ = ["ImportResult", "ImportedRule", "import_collection", "parse_command", "to_toml"]

#: New-TransportRule parameters that describe the rule rather than test or act
_RULE_PARAMS = {"Name", "Priority", "Enabled", "Mode", "ActivationDate", "ExpiryDate", "StopRuleProcessing",
                "SenderAddressLocation", "Comments"}
#: parameters whose value changes nothing here (defaults, reporting knobs of Exchange's UI)
_IGNORED = {"SetAuditSeverity": "the audit severity is for Exchange's reports; exmta logs every hit",
            "RuleErrorAction": "exmta always tempfails (451) when a rule cannot be evaluated",
            "RuleSubType": "only plain transport rules exist here",
            "UseLegacyRegex": "patterns are Python regular expressions",
            "DlpPolicy": "no DLP policies"}
#: why a known parameter cannot be imported
_WHY = {
    "ModerateMessageByUser": "moderation needs an approval workflow exmta does not have",
    "ModerateMessageByManager": "moderation needs an approval workflow exmta does not have",
    "ApplyRightsProtectionTemplate": "rights management (Azure RMS) is not available",
    "ApplyOME": "Office Message Encryption is not available",
    "ApplyClassification": "message classifications are an Outlook/Exchange feature",
    "MessageContainsDataClassifications": "DLP sensitive information types are not available",
    "HasSenderOverride": "DLP policy tips are not available",
    "SenderADAttributeContainsWords": "directory attribute lookups are not available",
    "SenderADAttributeMatchesPatterns": "directory attribute lookups are not available",
    "RecipientADAttributeContainsWords": "directory attribute lookups are not available",
    "RecipientADAttributeMatchesPatterns": "directory attribute lookups are not available",
    "ManagerIsUser": "directory manager lookups are not available",
    "AddManagerAsRecipientType": "directory manager lookups are not available",
    "SenderManagementRelationship": "directory manager lookups are not available",
    "BetweenMemberOf1": "directory group pairs are not available",
    "NotifySender": "sender notifications (policy tips) are not available",
    "ApplyRightsProtectionCustomizationTemplate": "rights management (Azure RMS) is not available",
    "GenerateNotification": "notification messages are not available",
}
_DATE_FORMATS = ("%m/%d/%Y %I:%M:%S %p", "%m/%d/%Y %H:%M:%S", "%m/%d/%Y", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d")


@dataclass
class ImportedRule:
    name: str
    priority: int
    settings: dict[str, Any] = field(default_factory=dict)
    conditions: dict[str, Any] = field(default_factory=dict)
    exceptions: dict[str, Any] = field(default_factory=dict)
    actions: dict[str, Any] = field(default_factory=dict)
    unmapped: list[tuple[str, str]] = field(default_factory=list)  #: (parameter, why)


@dataclass
class ImportResult:
    rules: list[ImportedRule]

    @property
    def unmapped(self) -> list[tuple[str, str, str]]:
        """(rule, parameter, why) for everything that could not be carried over."""
        return [(r.name, p, why) for r in self.rules for p, why in r.unmapped]


# ---------------------------------------------------------------- PowerShell arguments

_TOKEN = re.compile(r"""
    (?P<param>-[A-Za-z][A-Za-z0-9]*)(?=[\s:]|$)
  | '(?P<single>(?:[^']|'')*)'
  | "(?P<double>(?:[^"`]|`.|"")*)"
  | (?P<comma>,)
  | (?P<hash>@\{[^}]*\})
  | (?P<open>@\()
  | (?P<close>\))
  | (?P<bare>[^\s,'"()]+)
""", re.VERBOSE | re.DOTALL)


def _tokens(command: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(command):
        if command[pos].isspace() or command[pos] == ":" and out and out[-1][0] == "param":
            pos += 1
            continue
        m = _TOKEN.match(command, pos)
        if m is None:
            raise ValueError(f"cannot read the command at {command[pos:pos + 30]!r}")
        kind = m.lastgroup or ""
        text = m.group(kind)
        if kind == "single":
            text = text.replace("''", "'")
        elif kind == "double":
            text = re.sub(r"`(.)", r"\1", text).replace('""', '"')
        out.append((kind, text))
        pos = m.end()
    return out


def _scalar(kind: str, text: str) -> Any:
    if kind in ("single", "double"):
        return text
    low = text.lower()
    if low == "$true":
        return True
    if low == "$false":
        return False
    if low == "$null":
        return None
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


def parse_command(command: str) -> dict[str, Any]:
    """``{parameter: value}`` of one ``New-TransportRule`` command; arrays become lists."""
    tokens = _tokens(command.strip())
    if not tokens or tokens[0][1].lower() != "new-transportrule":
        raise ValueError("not a New-TransportRule command")
    params: dict[str, Any] = {}
    i = 1
    while i < len(tokens):
        kind, text = tokens[i]
        if kind != "param":
            raise ValueError(f"unexpected value {text!r} without a parameter")
        name = text[1:]
        i += 1
        values: list[Any] = []
        while i < len(tokens) and tokens[i][0] != "param":
            k, t = tokens[i]
            i += 1
            if k in ("open", "close"):
                continue
            if k == "comma":
                continue
            values.append(_scalar(k, t))
        if not values:
            params[name] = True  # a switch
        elif len(values) == 1 and not _is_array(tokens, name):
            params[name] = values[0]
        else:
            params[name] = values
    return params


def _is_array(tokens: list[tuple[str, str]], name: str) -> bool:
    for j, (k, t) in enumerate(tokens):
        if k == "param" and t[1:] == name:
            return j + 1 < len(tokens) and tokens[j + 1][0] == "open"
    return False


# ---------------------------------------------------------------- mapping


def _date(value: Any) -> dt.datetime:
    for fmt in _DATE_FORMATS:
        try:
            return dt.datetime.strptime(str(value).strip(), fmt).replace(tzinfo=dt.timezone.utc)
        except ValueError:
            continue
    raise ValueError(f"unreadable date {value!r}")


def _map_rule(params: dict[str, Any], name: str, priority: int) -> ImportedRule:
    rule = ImportedRule(str(params.get("Name", name)), int(params.get("Priority", priority)))
    s = rule.settings
    if params.get("Enabled") is False:
        s["enabled"] = False
    if "Mode" in params:
        s["mode"] = {"enforce": "enforce", "audit": "audit", "auditandnotify": "audit_and_notify"}.get(
            str(params["Mode"]).lower(), "enforce")
    if params.get("StopRuleProcessing") is True:
        s["stop_processing"] = True
    if "SenderAddressLocation" in params:
        s["sender_address_location"] = {"header": "header", "envelope": "envelope",
                                        "headerorenvelope": "header_or_envelope"}.get(
            str(params["SenderAddressLocation"]).lower(), "header")
    if params.get("Comments"):
        s["comments"] = str(params["Comments"])
    for key, target in (("ActivationDate", "activation"), ("ExpiryDate", "expiry")):
        if params.get(key):
            try:
                s[target] = _date(params[key])
            except ValueError as e:
                rule.unmapped.append((key, str(e)))
    lost_test = lost_action = False
    for key, value in params.items():
        if key in _RULE_PARAMS or key in ("Confirm", "WhatIf", "DomainController"):
            continue
        if key in _IGNORED:
            continue
        if value is False and not _looks_like_action(key):
            continue  # an Exchange Boolean predicate set to $false tests nothing (HasSenderOverride $false, ...)
        if key.startswith("ExceptIf"):
            base = key[len("ExceptIf"):]
            if base in CONDITIONS:
                rule.exceptions[base] = _value(base, value)
            else:
                rule.unmapped.append((key, _WHY.get(base) or "no equivalent condition in exmta"))
                lost_test = True
            continue
        if key in CONDITIONS:
            rule.conditions[key] = _value(key, value)
        elif key in ACTIONS:
            rule.actions[key] = _value(key, value)
        else:
            rule.unmapped.append((key, _WHY.get(key) or "no equivalent in exmta"))
            if _looks_like_action(key):
                lost_action = True
            else:
                lost_test = True
    if lost_test or lost_action or not rule.actions:
        s["enabled"] = False
        if not rule.actions:
            rule.unmapped.append(("(actions)", "no action could be imported"))
            rule.actions["LogEventText"] = f"imported rule {rule.name} had no importable action"
    return rule


_ACTION_WORDS = ("Apply", "Add", "Set", "Remove", "Redirect", "Route", "Moderate", "Notify", "Generate", "Reject",
                 "Delete", "Quarantine", "Prepend", "BlindCopy", "CopyTo", "Log", "SmtpReject", "StopRule")


def _looks_like_action(key: str) -> bool:
    return key.startswith(_ACTION_WORDS)


def _value(key: str, value: Any) -> Any:
    if key in ("SCLOver", "SetSCL") and isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    if isinstance(value, list):
        return [str(v) for v in value]
    return value


def import_collection(xml_text: str | bytes) -> ImportResult:
    """Every rule of an Export-TransportRuleCollection file, mapped (see the module docstring)."""
    if isinstance(xml_text, bytes):
        for enc in ("utf-8-sig", "utf-16"):
            try:
                xml_text = xml_text.decode(enc)
                break
            except UnicodeDecodeError:
                continue
        else:
            raise ValueError("the file is neither UTF-8 nor UTF-16")
    xml_text = re.sub(r"^\s*<\?xml[^>]*\?>", "", xml_text)  # the declared encoding is the file's, not ours
    root = ET.fromstring(xml_text)
    rules = []
    for index, el in enumerate(root.iter("rule")):
        block = None
        for child in el.iter():
            if child.tag.lower() == "commandblock":
                block = child.text or ""
        name = el.get("name") or f"rule {index + 1}"
        if block is None:
            r = ImportedRule(name, index, {"enabled": False})
            r.unmapped.append(("(rule)", "no commandBlock (a legacy Exchange 2007/2010 rule?)"))
            r.actions["LogEventText"] = f"imported rule {name} was empty"
            rules.append(r)
            continue
        rules.append(_map_rule(parse_command(block), name, index))
    return ImportResult(rules)


# ---------------------------------------------------------------- TOML out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def to_toml(result: ImportResult, source: str = "") -> str:
    """The rules file text; every unmapped parameter is a comment above its rule."""
    lines = [f"# Imported by `exmta rules import` from {source or 'an Exchange rule collection'}.",
             "# Check every rule marked enabled = false: it lost a condition, an exception or an action.", ""]
    used: set[int] = set()
    for rule in sorted(result.rules, key=lambda r: r.priority):
        priority = rule.priority
        while priority in used:
            priority += 1
        used.add(priority)
        for param, why in rule.unmapped:
            lines.append(f"# NOT IMPORTED: -{param}: {why}")
        lines.append("[[rule]]")
        lines.append(f"name = {_toml_value(rule.name)}")
        lines.append(f"priority = {priority}")
        for k, v in rule.settings.items():
            lines.append(f"{k} = {_toml_value(v)}")
        for table, items in (("conditions", rule.conditions), ("exceptions", rule.exceptions),
                             ("actions", rule.actions)):
            if items:
                lines.append(f"[rule.{table}]")
                lines.extend(f"{_key(k)} = {_toml_value(v)}" for k, v in items.items())
        lines.append("")
    return "\n".join(lines)
