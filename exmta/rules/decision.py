"""What the rules decided for one message: the core carries it out.

A :class:`Decision` is plain data: header operations for the byte-preserving
journal, a new body (or None), envelope edits (recipients added, redirected,
refused or dropped one by one; a send connector; TLS required), a quarantine
reason, an SCL, incident reports and the rule hits for tracking. Rules never
touch the spool or the SMTP transaction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from exmta.filters.base import HeaderEdits
from exmta.message import Limits, MimeMessage
from exmta.model import Reply

__all__ = ["Decision", "DecisionBuilder", "RuleHit"]


@dataclass
class RuleHit:
    """One rule that matched: why, in which mode, and what it did (or would have done, in audit)."""

    rule: str
    mode: str
    matched: list[str]
    actions: list[str] = field(default_factory=list)
    recipients: tuple[str, ...] = ()   #: the recipients the recipient predicates matched (all when none)

    def to_json(self) -> dict[str, object]:
        return {"rule": self.rule, "mode": self.mode, "matched": list(self.matched),
                "actions": list(self.actions), "recipients": list(self.recipients)}


@dataclass
class Decision:
    hits: list[RuleHit] = field(default_factory=list)
    reject: Reply | None = None                 #: refuse the whole message
    delete: bool = False                        #: drop it silently (accepted, never delivered)
    quarantine: str | None = None               #: queue it in hold/ with this reason
    header_ops: list[tuple[str, ...]] = field(default_factory=list)
    body: bytes | None = None                   #: the new body after the header block, None = unchanged
    add_recipients: list[str] = field(default_factory=list)
    redirect_to: list[str] | None = None        #: replaces every recipient
    rejected_recipients: dict[str, Reply] = field(default_factory=dict)  #: these get a DSN
    deleted_recipients: set[str] = field(default_factory=set)            #: these are dropped silently
    route_connector: str | None = None
    require_tls: bool = False
    scl: int | None = None
    incident_reports: list[tuple[str, str]] = field(default_factory=list)  #: (address, report text)
    events: list[str] = field(default_factory=list)                        #: LogEventText lines

    @property
    def content_changed(self) -> bool:
        return bool(self.header_ops) or self.body is not None

    @property
    def envelope_changed(self) -> bool:
        return bool(self.add_recipients or self.redirect_to is not None or self.rejected_recipients
                    or self.deleted_recipients or self.route_connector or self.require_tls)

    def header_edits(self) -> HeaderEdits:
        journal = HeaderEdits()
        journal.ops = list(self.header_ops)
        return journal

    def final_recipients(self, recipients: list[str]) -> list[str]:
        """The envelope recipients after redirect, additions, refusals and drops (order kept, no duplicates)."""
        base = list(self.redirect_to) if self.redirect_to is not None else list(recipients)
        gone = set(self.rejected_recipients) | self.deleted_recipients
        out = [r for r in base if r not in gone]
        for r in self.add_recipients:
            out.append(r)
        return list(dict.fromkeys(out))

    def apply_to(self, raw: bytes) -> bytes:
        """The message as it would leave: header journal applied, body replaced (tests, ``rules test``)."""
        msg = MimeMessage(raw)
        headers = self.header_edits().apply(msg.raw_headers) if self.header_ops else msg.raw_headers
        body = self.body if self.body is not None else msg.body
        return headers + raw[msg.header_end:msg.body_start] + body if msg.body_start > msg.header_end \
            else headers + b"\r\n" + body


class DecisionBuilder:
    """Collects actions while the rules run, and keeps the message as the next rule should see it."""

    def __init__(self, message: MimeMessage, limits: Limits | None = None) -> None:
        self.original = message
        self.limits = limits or message.limits
        self.decision = Decision()
        self._current: MimeMessage = message
        self._dirty = False

    @property
    def message(self) -> MimeMessage:
        """The message with the edits so far (re-parsed only after an edit)."""
        if self._dirty:
            d = self.decision
            headers = d.header_edits().apply(self.original.raw_headers) if d.header_ops else self.original.raw_headers
            body = d.body if d.body is not None else self.original.body
            self._current = MimeMessage(headers + b"\r\n" + body, self.limits, self.original.budget.clock)
            self._current.budget = self.original.budget  # one time and size budget per message
            self._dirty = False
        return self._current

    def header_op(self, *op: str) -> None:
        self.decision.header_ops.append(tuple(op))
        self._dirty = True

    def set_body(self, body: bytes, ops: list[tuple[str, ...]]) -> None:
        self.decision.header_ops.extend(ops)
        self.decision.body = body
        self._dirty = True

    @property
    def finished(self) -> bool:
        """Nothing more can change: the message is refused or deleted as a whole."""
        return self.decision.reject is not None or self.decision.delete
