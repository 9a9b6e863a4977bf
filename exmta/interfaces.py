"""Every zope interface of exmta in one place: the map of the system.

A method documented as returning ``X`` may return ``X``, a ``Deferred`` of
``X`` or be ``async def``; the core always calls it through
``maybeDeferred`` (or ``Deferred.fromCoroutine``) with a timeout on the
injected clock. Value types come from :mod:`exmta.model`.
"""
from __future__ import annotations

from zope.interface import Attribute, Interface


class IReceivePolicy(Interface):
    """Admission control for one receive connector.

    The only component that may ACCEPT a recipient: a RCPT that the policy
    does not ACCEPT is refused (default deny).
    """

    def check_connect(session):
        """-> Verdict for a new connection (CONTINUE to go on)."""

    def check_mail(session, sender, params):
        """-> Verdict for MAIL FROM; sender is an Address, params MailParams."""

    def authorize_rcpt(session, txn, rcpt, params):
        """-> Verdict for one RCPT TO: ACCEPT (local domain, relay right) or REJECT/TEMPFAIL."""


class IMessageView(Interface):
    """A received message at end of data, as filters see it."""

    headers = Attribute("Parsed header block: an email.message.Message (read-only).")
    size = Attribute("Octets received.")
    edits = Attribute("HeaderEdits journal: add_header / replace_header / remove_header.")

    def open_body():
        """-> a binary file object reading the whole spooled message from its start."""

    def quarantine(reason):
        """Accept the message but queue it in the hold (quarantine) queue with ``reason``.

        An operator lists held messages and releases them (IQueueStore.release).
        The first reason given wins; the verdict still decides whether it is accepted.
        """


class IMessageFilter(Interface):
    """A hook point for built-in and third-party checks.

    Filters narrow what the policy allowed; they never ACCEPT. Each phase
    method returns a Verdict; the first one that is not CONTINUE wins.
    """

    name = Attribute("Instance name from the configuration; appears in logs and replies.")

    def on_connect(session):
        """-> Verdict"""

    def on_helo(session):
        """-> Verdict; session.helo_name is set."""

    def on_mail(session, sender, params):
        """-> Verdict"""

    def on_rcpt(session, txn, rcpt, params):
        """-> Verdict; runs after the policy ACCEPTed the recipient.

        txn is a frozen model.TransactionView of the recipients acknowledged so far.
        """

    def on_data(session, txn, message):
        """-> Verdict for the whole message (every recipient); message provides IMessageView.

        txn is a frozen model.TransactionView: the queued envelope is exactly the
        recipients the server acknowledged, whatever a filter does.
        """


class IFilterFactory(Interface):
    """What an ``exmta.filters`` entry point resolves to."""

    def from_config(name, config, env):
        """-> an IMessageFilter provider; config is this instance's TOML table (a dict).

        env is a FilterEnv giving the reactor, clock, thread pool and the server's hostname.
        """


class IMessageWriter(Interface):
    """A message being received into the store. Not durable until committed."""

    queue_id = Attribute("The queue id this message will have once committed.")
    size = Attribute("Octets written so far.")

    def write(data):
        """Append bytes (CRLF line endings, already dot-unstuffed)."""

    def open_read():
        """-> a binary file object reading everything written so far, from its start."""

    def replace_headers(old_length, new_header_block):
        """Replace the first old_length octets with new_header_block (header edits)."""

    def abort():
        """Throw the partial message away. Safe to call more than once, and after commit."""


class IQueueStore(Interface):
    """The durable queue. The embedded spool and the PostgreSQL store both provide it."""

    def open_writer():
        """-> IMessageWriter (synchronous, cheap)."""

    def commit(writer, envelope):
        """-> Deferred[str queue id]. Fires only once content and envelope are on stable storage.

        An envelope with ``held_reason`` set (a quarantine) is committed to the hold queue.
        """

    def submit(content, envelope):
        """-> Deferred[str queue id]: commit a complete message held in memory (DSNs, pickup)."""

    def claim(now, limit):
        """-> Deferred[list[QueueEntry]]: up to limit messages that are due, leased to the caller.

        New mail and deferred mail whose retry time has come are both due.
        """

    def next_due():
        """-> float | None: the earliest retry time of deferred mail, for the scheduler's timer."""

    def open_content(queue_id):
        """-> a binary file object with the message content (synchronous)."""

    def update(queue_id, envelope, next_attempt):
        """-> Deferred[None]: store per-recipient state after an attempt.

        next_attempt None means every recipient is final and the message is removed.
        Otherwise the message goes back to the deferred queue until next_attempt.
        """

    def hold(queue_id, envelope, reason):
        """-> Deferred[None]: move a message to the hold (poison) queue, out of the scheduler's way."""

    def release(queue_id):
        """-> Deferred[None]: bring a held message back as due now."""

    def recover():
        """-> Deferred[int]: on start, return messages left claimed by a crash to the queue."""

    def add_listener(callback):
        """Call callback(queue_id) after each commit or submit in this process."""

    def list_messages(queue):
        """-> Deferred[list[Envelope]] for queue in {"incoming", "active", "deferred", "hold"}."""


class IQueueAdmin(Interface):
    """Operator actions on a queue store (exmta.admin and the scheduler's DSN paths).

    The spool and the PostgreSQL store both provide it, beside IQueueStore.
    """

    def read(queue_id):
        """-> Deferred[(state, Envelope)] of one message wherever it is; KeyError when there is none."""

    def remove(queue_id):
        """-> Deferred[Envelope]: delete a message that is not being delivered.

        KeyError when there is none; ValueError while it is active (being delivered).
        """

    def reschedule(queue_id, when):
        """-> Deferred[bool]: bring a deferred message's pending recipients forward to ``when``.

        False when the message is not deferred.
        """

    def release_now(queue_id, when):
        """-> Deferred[None]: release() for an operator, the pending recipients due at ``when``."""


class IRouter(Interface):
    """Maps recipients to send connectors."""

    def route(envelope, recipients):
        """-> list[Route]: each recipient in exactly one Route. Synchronous; no DNS here."""


class ISendConnector(Interface):
    """Delivers messages somewhere: SMTP (smart host or MX), LMTP, Maildir."""

    name = Attribute("Connector name referenced by routes.")

    def deliver(request):
        """-> Deferred[list[RecipientResult]], one per recipient of the request.

        Remote, TLS and DNS failures are results (DEFERRED or FAILED with a
        Reply); only bugs errback, and the scheduler treats those as DEFERRED.
        """


class IMessageTracker(Interface):
    """Receives message tracking events. Synchronous; must not block or raise."""

    def track(event):
        """Record one TrackingEvent."""


class IRuleExtension(Interface):
    """What an ``exmta.rules`` entry point resolves to: a third-party rule condition or action.

    The entry point's name is the key administrators write in a rule's
    ``[rule.conditions]``/``[rule.exceptions]`` (kind "condition") or
    ``[rule.actions]`` (kind "action") table.
    """

    kind = Attribute('"condition" or "action".')

    def build(value):
        """-> an IRuleCondition (kind "condition") or IRuleAction (kind "action") for the TOML ``value``.

        Raise ValueError with a short message for a bad value: it is reported
        with the rule's name and the key, and the rules file is refused.
        """


class IRuleCondition(Interface):
    """A built third-party predicate. Runs on the rules' thread pool: it may block briefly, never hang."""

    recipient_scoped = Attribute("True when match returns the set of matching recipients, False for a bool.")

    def match(context):
        """-> bool, or a frozenset of recipients; ``context`` is an exmta.rules.context.RuleContext."""


class IRuleAction(Interface):
    """A built third-party action: records what to do, the core does it."""

    def apply(context, out):
        """Record changes on ``out`` (an exmta.rules.decision.DecisionBuilder): ``out.header_op(...)``,
        ``out.decision.add_recipients``, ``out.decision.quarantine``, ... Returns nothing."""
