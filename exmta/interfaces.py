"""Every zope interface of exmta in one place: the map of the system.

A message's path, and the seam at each step (providers are checked with
``verifyObject`` when the process is assembled, :mod:`exmta.assembly`):

1. **Connect.** A listener hands the connection to a receive connector's
   SMTP server (:mod:`exmta.smtp.server`). The connector's
   :class:`IReceivePolicy` and each :class:`IMessageFilter` (built by an
   :class:`IFilterFactory`) judge the connection; the
   :class:`ISessionObserver` counts it and the :class:`IProtocolLog` writes
   its transcript. Implicit TLS or STARTTLS goes through the
   :class:`ITLSGate` (required TLS, client certificates).
2. **EHLO, AUTH, MAIL.** The :class:`IAuthenticator` offers and runs SMTP
   AUTH and checks send-as on MAIL FROM; the TLS gate refuses MAIL without
   the TLS it requires; policy and filters judge the sender.
3. **RCPT.** The policy alone may accept a recipient (relay rights from
   :class:`ISessionTrust`, existence from the :class:`IRecipientLookup`);
   filters may only narrow that.
4. **DATA / BDAT.** Content streams into an :class:`IMessageWriter` from the
   :class:`IQueueStore`. At end of data, filters see an :class:`IMessageView`;
   the header firewall asks :class:`ISessionTrust`, send-as on From: asks the
   authenticator; then ``IQueueStore.commit`` makes the message durable
   before the 250. Every step is reported to the :class:`IMessageTracker`.
5. **Queue.** The delivery scheduler (:mod:`exmta.queue.scheduler`) claims
   due messages from the store (what a receive worker process committed
   reaches the claiming process through :class:`IIncomingFeed`), routes
   recipients with the :class:`IRouter` and hands them to
   :class:`ISendConnector` providers;
   results, retries and DSNs go back through ``IQueueStore.update`` /
   ``submit`` / ``hold``. Operators act through :class:`IQueueAdmin` (the
   store) and :class:`ISchedulerAdmin` (the scheduler); a configuration
   reload reaches the scheduler through :class:`IReconfigurable`.
6. **Transport rules** (third party): :class:`IRuleExtension` builds
   :class:`IRuleCondition` and :class:`IRuleAction` providers.

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


class ISessionTrust(Interface):
    """What a receive policy says about a session beyond single verdicts.

    The SMTP server asks it for the header firewall (``trusted``) and for
    backscatter control (``may_relay``); a policy without it trusts nobody.
    """

    def may_relay(session):
        """-> bool: may this client send to any domain (relay right)."""

    def trusted(session):
        """-> bool: does the header firewall let this client's organization headers through."""


class IRecipientLookup(Interface):
    """Whether a recipient of an accepted domain exists (the recipient list, directory lookups)."""

    enabled = Attribute("True when anything (a list or a lookup) can answer.")

    def validates(kind):
        """-> bool: are recipients of an accepted domain of ``kind`` ("authoritative", ...) checked."""

    def exists(rcpt, kind):
        """-> bool | None for an Address: None when nothing could answer (the caller tempfails)."""


class IAuthenticator(Interface):
    """SMTP AUTH and send-as for one receive connector (``ESMTPServerFactory.authenticator``)."""

    def ehlo_keywords(proto):
        """-> list[str] of EHLO keywords to offer this session (``AUTH PLAIN LOGIN`` or none)."""

    def command(proto, argument):
        """Run ``AUTH argument`` for the session ``proto``; replies are sent on it."""

    def response(proto, line):
        """Feed one client line of a running SASL exchange."""

    def check_mail(proto, sender, params):
        """-> (Reply | None, MailParams): refuse MAIL FROM the session may not send as (None: go on)."""

    def check_message(proto, view):
        """-> Reply | None: refuse a message whose From: the session may not send as."""


class ITLSGate(Interface):
    """Required TLS and client certificate checks of one receive connector (``factory.tls_gate``)."""

    def handshake_done(server):
        """The session's TLS handshake completed: check the client certificate."""

    def check_mail(server):
        """-> Reply | None: refuse MAIL on a session without the TLS this connector requires."""

    def connection_lost(server, reason):
        """The TLS connection closed (log a failed handshake)."""


class IProtocolLog(Interface):
    """The SMTP transcript of one connector (``factory.protocol_log``; None when it is off)."""

    def for_server(session):
        """-> a protocol session (record/command/reply/data/tls/end) for a received session."""

    def for_transport(transport, label):
        """-> a protocol session for an outgoing connection on ``transport``."""


class ISessionObserver(Interface):
    """Counts receive sessions (``factory.session_observer``): metrics, or a worker's relay to them.

    Each method takes the receive connector's name first; none may raise or block.
    """

    def session_opened(connector):
        """A session started."""

    def session_timed_out(connector):
        """A session was closed for idling."""

    def tls_started(connector, version):
        """A session completed its TLS handshake with protocol ``version``."""

    def auth_failed(connector):
        """An AUTH attempt failed."""


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


class IIncomingFeed(Interface):
    """How the claiming process learns of mail that its receive worker processes committed.

    The spool and the PostgreSQL store both provide it, beside IQueueStore.
    """

    def notice(queue_id):
        """Another process of this node committed ``queue_id``: make it due here (listeners are told)."""

    def scan_incoming():
        """-> Deferred[int]: find committed mail the notices missed (a lost line); fires with that count."""


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


class ISchedulerAdmin(Interface):
    """Operator actions on the delivery scheduler (exmta.admin): Exchange's queue cmdlets."""

    redirect = Attribute("(connector name, target) of the redirect (drain) in force, or None.")

    def routes_for(envelope):
        """-> list[Route]: where the pending recipients would go now (the redirect target if one is set)."""

    def is_active(queue_id):
        """-> bool: is this message being delivered right now."""

    def destination_state(connector, nexthop):
        """-> dict: failures, last error and suspension of one destination (empty when healthy and idle)."""

    def suspend_destination(connector, nexthop, reason):
        """Stop delivering to one destination until resume_destination (survives a restart)."""

    def resume_destination(connector, nexthop):
        """-> bool: undo suspend_destination; True when it was suspended."""

    def suspended_destinations():
        """-> dict[(connector, nexthop), reason] of the operator's suspensions."""

    def clear_backoff(connector, nexthop):
        """Forget a destination's failures and automatic suspension (before a retry now)."""

    def set_redirect(name, connector, nexthop):
        """Send every message from now on through ``connector`` to ``nexthop``; name None stops it."""

    def remove_message(queue_id, ndr, reason):
        """-> Deferred[dict]: delete a queued message, with or without a non-delivery report.

        KeyError when there is none, ValueError while it is being delivered.
        """

    def wake():
        """Claim due mail on the next reactor turn (retry now)."""


class IReconfigurable(Interface):
    """A long-lived service that applies a new configuration live where it can (buildbot's reconfigService).

    SIGHUP (:mod:`exmta.observe.reload`) stays all or nothing: it calls
    ``prepare_reconfigure`` for every service first, and only when every one
    of them could be prepared runs the steps they returned.
    """

    def prepare_reconfigure(new_config, old_config):
        """-> Reconfiguration (exmta.reconfig): what ``new_config`` would change, and its ``apply`` step.

        Builds every new object and changes nothing; raises ValueError (nothing
        changed) when ``new_config`` cannot be used. What cannot change live is
        listed in ``needs_restart``; the old value stays in use.
        """

    def reconfigure(new_config):
        """Apply ``new_config`` now (prepare, then apply); -> the Reconfiguration, also logged."""


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
