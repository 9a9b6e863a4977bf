"""Rule actions, named as Exchange names them (``New-TransportRule`` parameters).

:func:`build_actions` turns a rule's ``[rule.actions]`` table into a list
of :class:`RuleAction`; each ``apply(ctx, out, hit)`` records what to do in
the :class:`~exmta.rules.decision.DecisionBuilder` (the core does it after
the rules ran). Keys that belong together (``SetHeaderName`` and
``SetHeaderValue``, ``RejectMessageReasonText`` and
``RejectMessageEnhancedStatusCode``, the disclaimer's location and fallback)
are read as one action.
"""
from __future__ import annotations

import email.header
import re
from dataclasses import dataclass
from typing import Any, Callable

from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from exmta.interfaces import IRuleAction
from exmta.message import DisclaimerRejected, apply_disclaimer, remove_parts
from exmta.model import Reply
from exmta.rules.context import RuleContext
from exmta.rules.decision import DecisionBuilder, RuleHit

__all__ = ["ACTIONS", "RuleAction", "build_actions"]

_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+$")
_FIELD = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")
_STATUS = re.compile(r"^5\.7\.(1|9[0-9][0-9])$")


@dataclass(frozen=True)
class RuleAction:
    """One built action: a name for logs and what it does."""

    name: str
    describe: str
    run: Callable[[RuleContext, DecisionBuilder, RuleHit], None]

    def apply(self, ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        self.run(ctx, out, hit)


def _addresses(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("must be an address or a list of addresses")
    for a in items:
        if not isinstance(a, str) or not _ADDRESS.match(a.strip()):
            raise ValueError(f"{a!r} is not an address (local@domain)")
    return [a.strip() for a in items]


def _text(value: Any, what: str = "text") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty {what}")
    if "\r" in value or "\n" in value and what == "header value":
        raise ValueError("must be one line")
    return value


def _true(value: Any) -> bool:
    if value is not True:
        raise ValueError("must be true (leave the key out otherwise)")
    return True


def _encoded(text: str) -> str:
    """A header value: as is when ASCII, else RFC 2047 encoded words (UTF-8)."""
    return text if text.isascii() else email.header.Header(text, "utf-8").encode()


# ---------------------------------------------------------------- each action


def _reject(table: dict[str, Any]) -> RuleAction:
    text = table.get("RejectMessageReasonText", "Delivery not authorized, message refused")
    text = _text(text)
    status = table.get("RejectMessageEnhancedStatusCode", "5.7.1")
    if not isinstance(status, str) or not _STATUS.match(status):
        raise ValueError("RejectMessageEnhancedStatusCode must be 5.7.1 or 5.7.900 to 5.7.999")
    reply = Reply.make(550, status, text.replace("\r", " ").replace("\n", " "))

    def run(ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        if set(hit.recipients) >= set(ctx.recipients):
            out.decision.reject = reply
        else:
            for r in hit.recipients:
                out.decision.rejected_recipients[r] = reply
    return RuleAction("RejectMessage", f"reject {reply}", run)


def _delete(value: Any) -> RuleAction:
    _true(value)

    def run(ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        if set(hit.recipients) >= set(ctx.recipients):
            out.decision.delete = True
        else:
            out.decision.deleted_recipients.update(hit.recipients)
    return RuleAction("DeleteMessage", "delete silently", run)


def _quarantine(value: Any, rule: str) -> RuleAction:
    _true(value)

    def run(ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        if out.decision.quarantine is None:
            out.decision.quarantine = f"transport rule {rule}"
    return RuleAction("Quarantine", "quarantine (hold queue)", run)


def _redirect(value: Any) -> RuleAction:
    targets = _addresses(value)

    def run(ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        out.decision.redirect_to = list(targets)
    return RuleAction("RedirectMessageTo", f"redirect to {', '.join(targets)}", run)


def _add(kind: str, header: str | None, value: Any) -> RuleAction:
    targets = _addresses(value)

    def run(ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        out.decision.add_recipients.extend(t for t in targets if t not in out.decision.add_recipients)
        if header is not None:
            existing = ", ".join(out.message.header_values(header))
            known = existing.lower()
            new = [t for t in targets if t.lower() not in known]
            if new:
                out.header_op("replace", header, ", ".join(filter(None, [existing] + new)))
    return RuleAction(kind, f"{kind} {', '.join(targets)}", run)


def _prepend_subject(value: Any) -> RuleAction:
    prefix = _text(value)

    def run(ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        subject = out.message.subject
        if subject.startswith(prefix):
            return  # already tagged (a resubmitted or looping message)
        out.header_op("replace", "Subject", _encoded(prefix + subject))
    return RuleAction("PrependSubject", f"prepend subject {prefix!r}", run)


def _set_header(table: dict[str, Any]) -> RuleAction:
    name = table.get("SetHeaderName")
    if not isinstance(name, str) or not _FIELD.match(name):
        raise ValueError("SetHeaderName must be a header field name")
    if "SetHeaderValue" not in table:
        raise ValueError("SetHeaderName needs SetHeaderValue beside it")
    value = table["SetHeaderValue"]
    if not isinstance(value, str) or "\r" in value or "\n" in value:
        raise ValueError("SetHeaderValue must be one line of text")

    def run(ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        out.header_op("replace", name, _encoded(value))
    return RuleAction("SetHeader", f"set {name}: {value}", run)


def _remove_header(value: Any) -> RuleAction:
    name = value
    if not isinstance(name, str) or not _FIELD.match(name):
        raise ValueError("must be a header field name")

    def run(ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        if out.message.header_values(name):
            out.header_op("remove", name)
    return RuleAction("RemoveHeader", f"remove {name}", run)


def _disclaimer(table: dict[str, Any]) -> RuleAction:
    markup = _text(table["ApplyHtmlDisclaimerText"])
    location = str(table.get("ApplyHtmlDisclaimerLocation", "Append")).lower()
    if location not in ("append", "prepend"):
        raise ValueError("ApplyHtmlDisclaimerLocation must be Append or Prepend")
    fallback = str(table.get("ApplyHtmlDisclaimerFallbackAction", "Wrap")).lower()
    if fallback not in ("wrap", "ignore", "reject"):
        raise ValueError("ApplyHtmlDisclaimerFallbackAction must be Wrap, Ignore or Reject")
    text = table.get("ApplyHtmlDisclaimerTextPlain")  # exmta: the text/plain form, else derived from the HTML
    if text is not None:
        text = _text(text)
    looks_html = bool(re.search(r"<[a-zA-Z/][^>]*>", markup))
    html_text = markup if looks_html else None
    plain = text if text is not None else (None if looks_html else markup)

    def run(ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        msg = out.message
        marker = (plain or "")[:40] or re.sub(r"<[^>]+>", "", markup)[:40]
        if marker and marker in msg.body_text():
            hit.actions.append("disclaimer already present")
            return
        try:
            edit = apply_disclaimer(msg, plain, html_text, location, fallback)
        except DisclaimerRejected:
            out.decision.reject = Reply.make(550, "5.7.1", "Delivery not authorized, message refused "
                                             "(a disclaimer could not be added to a signed or encrypted message)")
            return
        if edit.changed:
            out.set_body(edit.body if edit.body is not None else msg.body, edit.header_ops)
        hit.actions.append(f"disclaimer: {edit.note}")
    return RuleAction("ApplyHtmlDisclaimer", f"disclaimer ({location}, fallback {fallback})", run)


def _remove_attachments(table: dict[str, Any], attachment_filter: Callable[[Any], bool] | None) -> RuleAction:
    _true(table["RemoveAttachments"])
    notice = table.get("RemoveAttachmentsNotice", "The attachment {name} was removed by the mail system's policy.")
    notice = _text(notice)

    def run(ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        msg = out.message
        parts = [p for p in msg.attachments() if attachment_filter is None or attachment_filter(p)]
        if parts:
            edit = remove_parts(msg, parts, notice)
            if edit.changed:
                out.set_body(edit.body if edit.body is not None else msg.body, edit.header_ops)
            hit.actions.append(edit.note)
    return RuleAction("RemoveAttachments", "remove attachments with a notice", run)


def _route(value: Any, known: Callable[[str], bool] | None) -> RuleAction:
    name = _text(value, "send connector name")
    if known is not None and not known(name):
        raise ValueError(f"no send connector {name!r}")

    def run(ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        out.decision.route_connector = name
    return RuleAction("RouteMessageOutboundConnector", f"route via {name}", run)


def _require_tls(value: Any) -> RuleAction:
    _true(value)

    def run(ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        out.decision.require_tls = True
    return RuleAction("RouteMessageOutboundRequireTls", "require TLS for the next hop", run)


def _set_scl(value: Any) -> RuleAction:
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= 9:
        raise ValueError("must be an integer from -1 (bypass spam filtering) to 9")

    def run(ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        out.decision.scl = value
        ctx.scl = value  # later rules' SCLOver see it
        out.header_op("replace", "X-MS-Exchange-Organization-SCL", str(value))
    return RuleAction("SetSCL", f"set SCL {value}", run)


_REPORT_CONTENT = ("Sender", "Recipients", "Subject", "CC", "BCC", "Severity", "Override", "RuleDetections",
                   "FalsePositive", "DataClassifications", "IdMatch", "AttachOriginalMail")


def _incident(table: dict[str, Any], rule: str) -> RuleAction:
    (to,) = _addresses(table["GenerateIncidentReport"])[:1]
    content = table.get("IncidentReportContent", ["Sender", "Recipients", "Subject", "RuleDetections"])
    content = [content] if isinstance(content, str) else content
    if not isinstance(content, list) or any(c not in _REPORT_CONTENT for c in content):
        raise ValueError(f"IncidentReportContent must list some of {', '.join(_REPORT_CONTENT)}")

    def run(ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        msg = out.message
        lines = [f"Transport rule {rule!r} matched a message."]
        if "Sender" in content:
            lines.append(f"Sender: {ctx.sender or '<>'}")
        if "Recipients" in content:
            lines.append(f"Recipients: {', '.join(ctx.recipients)}")
        if "Subject" in content:
            lines.append(f"Subject: {msg.subject}")
        if "CC" in content:
            lines.append(f"Cc: {', '.join(msg.header_values('Cc'))}")
        if "RuleDetections" in content:
            lines.append(f"Matched: {'; '.join(hit.matched)}")
        lines.append(f"Message-ID: {' '.join(msg.header_values('Message-ID'))}")
        out.decision.incident_reports.append((to, "\n".join(lines)))
    return RuleAction("GenerateIncidentReport", f"incident report to {to}", run)


def _log_event(value: Any) -> RuleAction:
    text = _text(value)

    def run(ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        out.decision.events.append(text)
    return RuleAction("LogEventText", f"log {text!r}", run)


#: the action keys of a rule's actions table (companion keys included)
ACTIONS = frozenset({
    "RejectMessageReasonText", "RejectMessageEnhancedStatusCode", "DeleteMessage", "Quarantine",
    "RedirectMessageTo", "BlindCopyTo", "AddToRecipients", "CopyTo", "PrependSubject", "SetHeaderName",
    "SetHeaderValue", "RemoveHeader", "ApplyHtmlDisclaimerText", "ApplyHtmlDisclaimerLocation",
    "ApplyHtmlDisclaimerFallbackAction", "ApplyHtmlDisclaimerTextPlain", "RemoveAttachments",
    "RemoveAttachmentsNotice", "RouteMessageOutboundConnector", "RouteMessageOutboundRequireTls", "SetSCL",
    "GenerateIncidentReport", "IncidentReportContent", "LogEventText",
})
_COMPANION_OF = {"SetHeaderValue": "SetHeaderName", "ApplyHtmlDisclaimerLocation": "ApplyHtmlDisclaimerText",
                 "ApplyHtmlDisclaimerFallbackAction": "ApplyHtmlDisclaimerText",
                 "ApplyHtmlDisclaimerTextPlain": "ApplyHtmlDisclaimerText",
                 "RemoveAttachmentsNotice": "RemoveAttachments", "IncidentReportContent": "GenerateIncidentReport"}


def build_actions(table: dict[str, Any], rule: str, problem: Callable[[str, str], None],
                  attachment_filter: Callable[[Any], bool] | None = None,
                  send_connector_known: Callable[[str], bool] | None = None,
                  plugins: dict[str, Any] | None = None) -> list[RuleAction]:
    """The actions of one rule, in a fixed order (edits before routing, reject/delete last).

    Every problem is reported through ``problem(key, message)``; bad keys are skipped.
    """
    out: list[RuleAction] = []

    def build(key: str, make: Callable[[], RuleAction]) -> None:
        try:
            out.append(make())
        except (ValueError, TypeError) as e:
            problem(key, str(e))

    for key in table:
        if key in _COMPANION_OF and _COMPANION_OF[key] not in table:
            problem(key, f"needs {_COMPANION_OF[key]} beside it")
        elif key not in ACTIONS and not (plugins and key in plugins):
            problem(key, "unknown action (see docs/rules.rst for the list)")
    t = table
    if "PrependSubject" in t:
        build("PrependSubject", lambda: _prepend_subject(t["PrependSubject"]))
    if "SetHeaderName" in t:
        build("SetHeaderName", lambda: _set_header(t))
    if "RemoveHeader" in t:
        build("RemoveHeader", lambda: _remove_header(t["RemoveHeader"]))
    if "SetSCL" in t:
        build("SetSCL", lambda: _set_scl(t["SetSCL"]))
    if "RemoveAttachments" in t:
        build("RemoveAttachments", lambda: _remove_attachments(t, attachment_filter))
    if "ApplyHtmlDisclaimerText" in t:
        build("ApplyHtmlDisclaimerText", lambda: _disclaimer(t))
    if "AddToRecipients" in t:
        build("AddToRecipients", lambda: _add("AddToRecipients", "To", t["AddToRecipients"]))
    if "CopyTo" in t:
        build("CopyTo", lambda: _add("CopyTo", "Cc", t["CopyTo"]))
    if "BlindCopyTo" in t:
        build("BlindCopyTo", lambda: _add("BlindCopyTo", None, t["BlindCopyTo"]))
    if "RedirectMessageTo" in t:
        build("RedirectMessageTo", lambda: _redirect(t["RedirectMessageTo"]))
    if "RouteMessageOutboundConnector" in t:
        build("RouteMessageOutboundConnector", lambda: _route(t["RouteMessageOutboundConnector"],
                                                              send_connector_known))
    if "RouteMessageOutboundRequireTls" in t:
        build("RouteMessageOutboundRequireTls", lambda: _require_tls(t["RouteMessageOutboundRequireTls"]))
    if "GenerateIncidentReport" in t:
        build("GenerateIncidentReport", lambda: _incident(t, rule))
    if "LogEventText" in t:
        build("LogEventText", lambda: _log_event(t["LogEventText"]))
    for key in t:
        if plugins and key in plugins and key not in ACTIONS:
            build(key, lambda k=key: plugin_action(k, plugins[k], t[k]))
    if "Quarantine" in t:
        build("Quarantine", lambda: _quarantine(t["Quarantine"], rule))
    if "RejectMessageReasonText" in t or "RejectMessageEnhancedStatusCode" in t:
        build("RejectMessageReasonText" if "RejectMessageReasonText" in t else "RejectMessageEnhancedStatusCode",
              lambda: _reject(t))
    if "DeleteMessage" in t:
        build("DeleteMessage", lambda: _delete(t["DeleteMessage"]))
    return out


def plugin_action(name: str, ext: Any, value: Any) -> RuleAction:
    """The action a third-party extension (exmta.rules.plugins) builds for ``value``, checked."""
    built = ext.build(value)
    try:
        verifyObject(IRuleAction, built)
    except Invalid as e:
        raise ValueError(f"extension built something that is not an IRuleAction: {e}") from None

    def run(ctx: RuleContext, out: DecisionBuilder, hit: RuleHit) -> None:
        built.apply(ctx, out)
    return RuleAction(name, f"{name}={value!r}", run)
