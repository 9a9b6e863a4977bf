"""Where the core runs the transport rules: SMTP end of data, the pickup directory, resubmission.

:class:`TransportRules` owns the live rules file (re-read when its mtime
changes; a bad file keeps the old rules and logs every problem), evaluates
the rules on a bounded thread pool (never on the reactor thread), and turns
the :class:`~exmta.rules.decision.Decision` into what the caller does:

* at SMTP end of data, :meth:`TransportRules.at_end_of_data` is the one
  call the server makes. It returns an :class:`EndOfData`: a reply to refuse
  the whole message with (the rule's 5xx, or ``451 4.3.0`` when the rules
  themselves failed), a discard, or edits: header operations go into the
  view's byte-preserving journal, a new body into the spool writer, and
  :meth:`EndOfData.envelope` applies the envelope edits before commit;
  after commit :meth:`EndOfData.committed` writes the tracking events and
  queues the DSN of recipients a rule refused and any incident report;
* for a message submitted whole (pickup, resubmission), :meth:`TransportRules.submit`
  does all of that and returns the queue id (or None when a rule deleted or
  refused it; a refusal sends the sender an NDR).
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from email.utils import formatdate, make_msgid
from typing import Any, Callable

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from exmta.config.reader import ConfigError
from exmta.message import Limits, MimeMessage
from exmta.model import (Envelope, Recipient, RecipientStatus, Reply, TrackingEvent, TrackingEventId)
from exmta.rules.context import RuleContext
from exmta.rules.decision import Decision
from exmta.rules.ruleset import RuleSet, load_rules

__all__ = ["EndOfData", "RULES_ERROR", "TransportRules"]

log = Logger()

#: what a failure inside the rules becomes: never a 5xx, never an unchecked message
RULES_ERROR = Reply.make(451, "4.3.0", "Error: temporary failure in transport rules")


@dataclass
class EndOfData:
    """The rules' answer at end of data (see the module docstring)."""

    decision: Decision | None = None
    reply: Reply | None = None
    discard: bool = False
    rules: TransportRules | None = field(default=None, repr=False)
    #: the envelope before the rules' edits (refused recipients keep their NOTIFY and ORCPT for the NDR)
    original: Envelope | None = field(default=None, repr=False)

    def envelope(self, env: Envelope) -> Envelope:
        """The envelope to commit: recipients refused or dropped taken out, added ones in, route, TLS, hold."""
        d = self.decision
        self.original = env
        if d is None or not (d.envelope_changed or d.quarantine):
            return env
        return _edit_envelope(env, d)

    def committed(self, queue_id: str, env: Envelope, source: str = "SMTP") -> None:
        """After the commit: tracking, per-rule counters, DSN for refused recipients, incident reports."""
        if self.decision is not None and self.rules is not None:
            try:
                self.rules.after_commit(queue_id, env, self.decision, source, original=self.original)
            except Exception:  # the message is queued: nothing here may turn its 250 into an error
                log.failure("transport rules: after-commit work for {queue_id} failed", queue_id=queue_id)


def _edit_envelope(env: Envelope, d: Decision) -> Envelope:
    by_address = {r.address: r for r in env.recipients}
    final = d.final_recipients([r.address for r in env.recipients])
    recipients = [by_address.get(a) or Recipient(a) for a in final]
    return dataclasses.replace(
        env, recipients=recipients,
        route_connector=d.route_connector or env.route_connector,
        require_tls=env.require_tls or d.require_tls,
        held_reason=env.held_reason or d.quarantine,
    )


class TransportRules:
    """The live rules of one process, and the glue between them and the queue (see the module docstring).

    ``internal_domain(domain)`` decides FromScope/SentToScope; ``trusted(session)``
    says whether an SMTP session counts as inside the organisation (authenticated,
    or a connector whose permission groups make it internal).
    """

    def __init__(
        self,
        path: str,
        clock: Any,
        reactor: Any = None,
        threadpool: Any = None,
        *,
        internal_domain: Callable[[str], bool] = lambda domain: False,
        trusted: Callable[[Any], bool] = lambda session: bool(getattr(session, "auth_identity", None)),
        send_connector_known: Callable[[str], bool] | None = None,
        plugins: dict[str, dict[str, Any]] | None = None,
        limits: Limits | None = None,
        reload_interval: float = 2.0,
        tracker: Any = None,
        store: Any = None,
        hostname: str = "localhost",
        postmaster: str = "postmaster",
        member_of: Callable[[str, str], bool] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.clock = clock
        self.reactor = reactor if reactor is not None else clock
        self.threadpool = threadpool
        self.internal_domain = internal_domain
        self.trusted = trusted
        self.send_connector_known = send_connector_known
        self.plugins = plugins
        self.limits = limits or Limits()
        self.reload_interval = reload_interval
        self.tracker = tracker
        self.store = store
        self.hostname = hostname
        self.postmaster = postmaster
        self.member_of = member_of
        self.wall_clock = wall_clock
        self.ruleset = self._load()  # a bad file at start is a configuration error
        self._mtime = self._stat()
        self._checked = clock.seconds()
        #: the problems of the last reload that was refused (empty when the live file is in force)
        self.last_problems: list[str] = []

    # ------------------------------------------------------------ the live file

    def _load(self) -> RuleSet:
        return load_rules(self.path, send_connector_known=self.send_connector_known, plugins=self.plugins,
                          limits=self.limits)

    def _stat(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime, st.st_size

    def current(self) -> RuleSet:
        """The rules in force, re-reading the file when it changed (checked every ``reload_interval`` s)."""
        now = self.clock.seconds()
        if now - self._checked >= self.reload_interval:
            self._checked = now
            mark = self._stat()
            if mark != self._mtime:
                self._mtime = mark
                self.reload()
        return self.ruleset

    def watch(self) -> Any:
        """Check the file every ``reload_interval`` seconds even when no mail flows (a LoopingCall)."""
        from twisted.internet.task import LoopingCall
        loop = LoopingCall(self.current)
        loop.clock = self.clock
        d = loop.start(self.reload_interval, now=False)
        d.addErrback(lambda f: log.failure("transport rules: watching {path} failed", f, path=self.path))
        return loop

    def reload(self) -> bool:
        """Re-read the file now; on any problem keep the old rules, log every problem and return False."""
        try:
            new = self._load()
        except ConfigError as e:
            self.last_problems = list(e.problems)
            for problem in e.problems:
                log.error("transport rules {path}: {problem} (the previous rules stay in force)",
                          path=self.path, problem=problem)
            return False
        self.ruleset = new
        self.last_problems = []
        log.info("transport rules {path}: {count} rule(s) loaded", path=self.path, count=len(new))
        return True

    # ------------------------------------------------------------ evaluation

    def _evaluate(self, ruleset: RuleSet, raw: bytes | Callable[[], Any], ctx_kw: dict[str, Any]) -> Decision:
        """In a pool thread: read, parse lazily, run the rules."""
        if callable(raw):
            with raw() as f:
                raw = f.read()
        message = MimeMessage(raw, ruleset.limits)
        ctx = RuleContext(message=message, internal_domain=self.internal_domain, member_of=self.member_of,
                          now=self.wall_clock(), **ctx_kw)
        return ruleset.evaluate(ctx)

    async def evaluate(self, raw: bytes | Callable[[], Any], **ctx_kw: Any) -> Decision | None:
        """The rules' Decision for one message (None when no rule is loaded), off the reactor thread."""
        ruleset = self.current()
        if not ruleset.rules:
            return None
        if self.threadpool is None:
            return self._evaluate(ruleset, raw, ctx_kw)
        return await deferToThreadPool(self.reactor, self.threadpool, self._evaluate, ruleset, raw, ctx_kw)

    async def at_end_of_data(self, session: Any, txn: Any, view: Any, writer: Any,
                             trusted: bool | None = None, scl: int | None = None) -> EndOfData:
        """The one call of the SMTP server at end of data (see the module docstring). Never raises."""
        try:
            if trusted is None:
                trusted = bool(self.trusted(session))
            sender = str(txn.sender)
            recipients = tuple(str(a) for a, _ in txn.recipients)
            decision = await self.evaluate(
                writer.open_read, sender=sender, recipients=recipients, connector=getattr(session, "connector", ""),
                client_ip=getattr(session, "peer_ip", None),
                authenticated=bool(getattr(session, "auth_identity", None)), trusted=trusted, source="SMTP",
                scl=scl)
            if decision is None:
                return EndOfData()
            outcome = EndOfData(decision, rules=self)
            if decision.reject is not None or (recipients and not decision.final_recipients(list(recipients))
                                               and decision.rejected_recipients):
                outcome.reply = decision.reject or next(iter(decision.rejected_recipients.values()))
                self._track_refusal(writer, sender, recipients, decision, outcome.reply, session)
                return outcome
            if decision.delete or not decision.final_recipients(list(recipients)):
                outcome.discard = True
                self._track_refusal(writer, sender, recipients, decision, None, session)
                return outcome
            if decision.body is not None:
                # the whole content after the header block is replaced; the header block itself
                # stays for the journal (view.edits), which keeps untouched fields byte for byte
                head = view.raw_headers
                writer.replace_headers(writer.size, head + b"\r\n" + decision.body)
            for op in decision.header_ops:
                view.edits.ops.append(tuple(op))
            if decision.quarantine:
                view.quarantine(decision.quarantine)
            return outcome
        except Exception:
            log.failure("transport rules failed at end of data")
            return EndOfData(reply=RULES_ERROR)

    async def submit(self, content: bytes, envelope: Envelope, source: str = "PICKUP") -> str | None:
        """Run the rules on a whole message and queue it (pickup, resubmission).

        Returns the queue id, or None when a rule deleted or refused it (a
        refusal sends the sender an NDR). Raises when the store fails, so the
        caller keeps its file and tries again.
        """
        decision = await self.evaluate(content, sender=envelope.sender,
                                       recipients=tuple(r.address for r in envelope.recipients),
                                       connector=source.lower(), source=source, trusted=True)
        if decision is None:
            return await self.store.submit(content, envelope)
        if decision.content_changed:
            content = decision.apply_to(content)
        env = _edit_envelope(envelope, decision)
        if decision.reject is not None:
            refused = {r.address: decision.reject for r in envelope.recipients}
            decision = dataclasses.replace(decision, rejected_recipients=refused)
            self._after_refusal(envelope, content, decision, source)
            return None
        if decision.delete or not env.recipients:
            self._after_refusal(envelope, content, decision, source)
            return None
        queue_id = await self.store.submit(content, env)
        self.after_commit(queue_id, env, decision, source, original=envelope, content=content)
        return queue_id

    # ------------------------------------------------------------ after the decision

    def _track_refusal(self, writer: Any, sender: str, recipients: tuple[str, ...], decision: Decision,
                       reply: Reply | None, session: Any) -> None:
        self._track_hits(getattr(writer, "queue_id", ""), sender, recipients, decision,
                         getattr(session, "connector", None), reply=reply)

    def _after_refusal(self, envelope: Envelope, content: bytes, decision: Decision, source: str) -> None:
        self._track_hits(envelope.queue_id, envelope.sender, tuple(r.address for r in envelope.recipients),
                         decision, source.lower())
        self._send_ndr(envelope, content, decision)
        self._send_incident_reports(content, decision)

    def after_commit(self, queue_id: str, env: Envelope, decision: Decision, source: str = "SMTP",
                     original: Envelope | None = None, content: bytes | None = None) -> None:
        """Tracking (AGENTINFO per hit), the NDR for refused recipients, incident reports, events."""
        self._track_hits(queue_id, env.sender, tuple(r.address for r in env.recipients), decision, env.connector)
        for text in decision.events:
            log.info("transport rule event for {queue_id}: {text}", queue_id=queue_id, text=text)
        if not (decision.rejected_recipients or decision.incident_reports):
            return
        if content is None and self.store is not None:
            try:
                with self.store.open_content(queue_id) as f:
                    content = f.read()
            except Exception:
                log.failure("transport rules: cannot read {queue_id} for its reports", queue_id=queue_id)
                return
        base = original or env
        if decision.rejected_recipients:
            known = {r.address: r for r in base.recipients}
            refused = [known.get(a) or Recipient(a) for a in decision.rejected_recipients]
            self._send_ndr(dataclasses.replace(base, queue_id=queue_id, recipients=refused), content or b"",
                           decision)
        self._send_incident_reports(content or b"", decision)

    def _track_hits(self, queue_id: str, sender: str, recipients: tuple[str, ...], decision: Decision,
                    connector: str | None, reply: Reply | None = None) -> None:
        if self.tracker is None:
            return
        now = self.clock.seconds()
        for hit in decision.hits:
            try:
                self.tracker.track(TrackingEvent(
                    TrackingEventId.AGENTINFO, queue_id, now, sender=sender,
                    recipients=hit.recipients or recipients, connector=connector, source="AGENT",
                    reply=str(reply) if reply is not None else None,
                    details={"agent": "TransportRule", "rule": hit.rule, "mode": hit.mode,
                             "actions": list(hit.actions), "matched": list(hit.matched)},
                ))
            except Exception:
                log.failure("tracker failed for transport rule {rule}", rule=hit.rule)

    def _send_ndr(self, envelope: Envelope, content: bytes, decision: Decision) -> None:
        """An NDR for the recipients a rule refused (not for the null sender or our own reports)."""
        if self.store is None or not decision.rejected_recipients or envelope.sender in ("", "<>") \
                or envelope.kind == "dsn":
            return
        from exmta.queue.bounce import make_dsn
        now = self.clock.seconds()
        rcpts = []
        from exmta.queue.scheduler import wants_notify
        for r in envelope.recipients:
            reply = decision.rejected_recipients.get(r.address)
            if reply is not None and wants_notify(r.notify, "FAILURE"):
                rcpts.append(dataclasses.replace(r, status=RecipientStatus.FAILED, last_reply=reply, last_attempt=now))
        if not rcpts:
            return
        try:
            data, dsn_env = make_dsn(envelope, rcpts, "failed", self.hostname, content, now, self.postmaster)
        except Exception:
            log.failure("transport rules: building an NDR failed")
            return
        d = self.store.submit(data, dsn_env)
        d.addErrback(lambda f: log.failure("transport rules: queueing an NDR failed", f))

    def _send_incident_reports(self, content: bytes, decision: Decision) -> None:
        if self.store is None:
            return
        for address, text in decision.incident_reports:
            postmaster = self.postmaster if "@" in self.postmaster else f"{self.postmaster}@{self.hostname}"
            subject = "Incident report: " + (decision.hits[-1].rule if decision.hits else "transport rule")
            body = text.replace("\r\n", "\n").replace("\n", "\r\n")
            data = (f"From: {postmaster}\r\nTo: {address}\r\nSubject: {_ascii(subject)}\r\n"
                    f"Date: {formatdate(self.wall_clock())}\r\nMessage-ID: {make_msgid(domain=self.hostname)}\r\n"
                    f"Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\n"
                    f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                    f"{body}\r\n").encode("utf-8")
            env = Envelope(sender="", recipients=[Recipient(address)], kind="dsn", connector="rules",
                           received_at=self.clock.seconds(), size=len(data))
            d = self.store.submit(data, env)
            d.addErrback(lambda f: log.failure("transport rules: queueing an incident report failed", f))


def _ascii(text: str) -> str:
    import email.header
    return text if text.isascii() else email.header.Header(text, "utf-8").encode()
