"""Applying delivery results: per-recipient state, retries, expiry, DSNs, tracking, the stored state.

:class:`Outcomes` is a mixin of :class:`~exmta.queue.scheduler.DeliveryScheduler`
(the rules are in the module docstring of :mod:`exmta.queue.scheduler`); the
attributes annotated on it are the scheduler's, for the type checker.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from exmta.config.schema import QueueConfig
from exmta.interfaces import IMessageTracker, IQueueStore
from exmta.model import (
    Envelope,
    Outcome,
    QueueEntry,
    Recipient,
    RecipientResult,
    RecipientStatus,
    Reply,
    TrackingEvent,
    TrackingEventId,
)
from exmta.observe.tracking import event_details
from exmta.queue.bounce import make_dsn
from exmta.queue.errors import StoreUnavailable

__all__ = ["Outcomes", "STORE_RETRY_CAP", "backoff", "wants_notify"]

STORE_RETRY_CAP = 60.0  # seconds: the longest wait between two tries to write a message's state

REPLY_EXPIRED = Reply.make(550, "5.4.7", "QUEUE.Expired; message expired")


def backoff(attempt: int, schedule: Sequence[float]) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (0 = the first).

    Attempt n uses ``schedule[min(n, len(schedule) - 1)]``: the last entry
    repeats forever. Pure, so retry timing is testable without a clock.
    """
    if not schedule:
        raise ValueError("retry schedule is empty")
    return float(schedule[min(max(attempt, 0), len(schedule) - 1)])


def wants_notify(notify: tuple[str, ...] | None, what: str) -> bool:
    """Does a recipient's NOTIFY ask for a DSN of type ``what`` (SUCCESS/FAILURE/DELAY)?

    Without NOTIFY we report FAILURE and DELAY, never SUCCESS.
    """
    if notify is None:
        return what in ("FAILURE", "DELAY")
    upper = {n.upper() for n in notify}
    return "NEVER" not in upper and what in upper


@dataclass(eq=False)
class _Message:
    entry: QueueEntry
    outstanding: int = 0
    crashed: bool = False
    failed: list[Recipient] = field(default_factory=list)
    delayed: list[Recipient] = field(default_factory=list)
    delivered: list[Recipient] = field(default_factory=list)
    relayed: list[Recipient] = field(default_factory=list)
    remote_hosts: dict[str, str] = field(default_factory=dict)

    @property
    def queue_id(self) -> str:
        return self.entry.queue_id

    @property
    def envelope(self) -> Envelope:
        return self.entry.envelope


class Outcomes:
    """Results, DSNs and tracking of :class:`~exmta.queue.scheduler.DeliveryScheduler`."""

    running: int
    _log: Logger
    _clock: IReactorTime
    _config: QueueConfig
    _store: IQueueStore
    _tracker: IMessageTracker | None
    _hostname: str
    _postmaster: str
    _messages: dict[str, _Message]
    _store_retries: dict[str, IDelayedCall]
    _claim_retry: float
    _dsn_retry: float
    _is_local: Callable[[str], bool]
    wake: Callable[[], None]
    _check_drained: Callable[[], None]

    def _apply_all(
        self, msg: _Message, rcpts: list[Recipient], result: RecipientResult, connector: str | None,
        retry_at: float | None = None,
    ) -> None:
        for r in rcpts:
            self._apply(msg, r, result, connector, retry_at)

    def _apply(
        self, msg: _Message, r: Recipient, result: RecipientResult, connector: str | None,
        retry_at: float | None = None,
    ) -> None:
        now = self._clock.seconds()
        env = msg.envelope
        r.last_reply = result.reply
        if result.outcome is not Outcome.DEFERRED and r.dsn_due == "delayed":  # final: no warning now
            r.dsn_due = None
            msg.delayed = [d for d in msg.delayed if d is not r]
        if result.remote_host:
            msg.remote_hosts[r.address] = result.remote_host
        if result.outcome is Outcome.DELIVERED:
            r.status = RecipientStatus.DELIVERED
            r.next_attempt = None
            local = connector is not None and self._is_local(connector)
            self._track(
                TrackingEventId.DELIVER if local else TrackingEventId.SEND, msg, (r.address,),
                connector=connector, result=result, source="STOREDRIVER" if local else "SMTP",
            )
            if wants_notify(r.notify, "SUCCESS"):
                if local:
                    msg.delivered.append(r)
                elif result.peer_dsn is False:  # RFC 3461 5.2.2: the next hop cannot report delivery
                    msg.relayed.append(r)
        elif result.outcome is Outcome.FAILED:
            r.status = RecipientStatus.FAILED
            r.next_attempt = None
            self._track(
                TrackingEventId.FAIL, msg, (r.address,), connector=connector, result=result,
                source="ROUTING" if connector is None else "SMTP",
            )
            if wants_notify(r.notify, "FAILURE"):
                msg.failed.append(r)
        else:
            expires = env.received_at + self._config.max_lifetime
            if now >= expires:
                r.status = RecipientStatus.EXPIRED
                r.next_attempt = None
                self._track(
                    TrackingEventId.EXPIRE, msg, (r.address,), connector=connector, result=result,
                    source="QUEUE", details={"last_reply": str(result.reply)},
                    reply=str(REPLY_EXPIRED),
                )
                if wants_notify(r.notify, "FAILURE"):
                    msg.failed.append(r)
                return
            if retry_at is None:
                retry_at = now + backoff(r.attempts - 1, self._config.retry_schedule)
            warn_at = env.received_at + self._config.delay_warning
            warn = (
                self._config.delay_warning > 0 and not r.delay_notified
                and wants_notify(r.notify, "DELAY") and self._bounceable(env)
            )
            if warn and now >= warn_at:
                r.delay_notified = True
                msg.delayed.append(r)
            elif warn:
                retry_at = min(retry_at, warn_at)  # try again when the warning is due, so it is on time
            r.next_attempt = min(retry_at, expires)
            self._track(
                TrackingEventId.DEFER, msg, (r.address,), connector=connector, result=result, source="QUEUE",
                details={"next_attempt": r.next_attempt},
            )

    @staticmethod
    def _bounceable(env: Envelope) -> bool:
        return env.kind != "dsn" and env.sender not in ("", "<>")

    def _finalize(self, msg: _Message) -> None:
        """Every delivery of this attempt is done: DSNs, then store.update or hold."""
        if msg.crashed:
            msg.envelope.crashes += 1
        d = self._send_dsns(msg)
        d.addCallback(lambda _: self._store_final(msg))
        d.addErrback(lambda f: self._log.failure("finalizing {queue_id} failed", f, queue_id=msg.queue_id))

    def _store_final(self, msg: _Message) -> None:
        """After the DSNs: hold a poison message, else store the new state (kept while a DSN is due)."""
        env = msg.envelope
        if env.crashes >= self._config.poison_threshold:
            reason = f"poison message: delivery crashed {env.crashes} times"
            self._log.warn("{queue_id} moved to hold: {reason}", queue_id=msg.queue_id, reason=reason)

            def hold_done(_: object) -> None:
                self._track(
                    TrackingEventId.POISONMESSAGE, msg, tuple(r.address for r in env.pending()),
                    source="QUEUE", details={"reason": reason},
                )

            def store_state() -> defer.Deferred[Any]:
                return defer.maybeDeferred(self._store.hold, msg.queue_id, env, reason).addCallback(hold_done)
        else:
            pending = env.pending()
            now = self._clock.seconds()
            times = [r.next_attempt if r.next_attempt is not None else now for r in pending]
            if any(r.dsn_due for r in env.recipients):
                times.append(now + self._dsn_retry)  # keep the message until its DSN is committed
            next_attempt = min(times) if times else None

            def store_state() -> defer.Deferred[Any]:
                return defer.maybeDeferred(self._store.update, msg.queue_id, env, next_attempt)

        self._store_state(msg, store_state, 0)

    def _store_state(self, msg: _Message, store_state: Callable[[], defer.Deferred[Any]], tries: int) -> None:
        """Write the message's new state; retry with backoff for as long as the store fails.

        Giving up would strand the message in the store's active state until a
        restart (issue 10 item 7), so only a store that no longer has it as
        active (KeyError, ValueError: removed or moved meanwhile) ends this.
        """
        self._store_retries.pop(msg.queue_id, None)
        if self._messages.get(msg.queue_id) is not msg:
            return  # abandoned at the stop deadline

        def failed(f: Failure) -> None:
            if self._messages.get(msg.queue_id) is not msg:
                return
            if f.check(KeyError, ValueError):
                self._log.failure("storing the state of {queue_id} failed: it is no longer active", f,
                                  queue_id=msg.queue_id)
                self._message_done(msg)
                return
            delay = min(self._claim_retry * 2 ** min(tries, 16), STORE_RETRY_CAP)
            if f.check(StoreUnavailable):  # the queue's database is away: expected, no traceback
                self._log.warn("storing the state of {queue_id} failed: {error}; retrying in {delay}s",
                               queue_id=msg.queue_id, error=f.getErrorMessage(), delay=delay)
            else:
                self._log.failure("storing the state of {queue_id} failed; retrying in {delay}s", f,
                                  queue_id=msg.queue_id, delay=delay)
            self._store_retries[msg.queue_id] = self._clock.callLater(
                delay, self._store_state, msg, store_state, tries + 1,
            )

        d = store_state()
        d.addCallbacks(lambda _: self._message_done(msg), failed)

    def _message_done(self, msg: _Message) -> None:
        if self._messages.get(msg.queue_id) is msg:
            del self._messages[msg.queue_id]
        if self.running:
            self.wake()
        else:
            self._check_drained()

    # ------------------------------------------------------------ DSNs and tracking

    def _send_dsns(self, msg: _Message) -> defer.Deferred[None]:
        env = msg.envelope
        d: defer.Deferred[None] = defer.succeed(None)
        if not self._bounceable(env):
            for r in env.recipients:
                r.dsn_due = None
            return d
        retry_until = env.received_at + self._config.max_lifetime
        for kind, rcpts in (("failed", msg.failed), ("delayed", msg.delayed), ("delivered", msg.delivered),
                            ("relayed", msg.relayed)):
            if rcpts:
                for r in rcpts:
                    r.dsn_due = kind  # stored with the message until the DSN is committed
                d.addCallback(lambda _, k=kind, rs=list(rcpts): self._send_dsn(msg, k, rs, retry_until))
        return d

    def _send_dsn(self, msg: _Message, kind: str, rcpts: list[Recipient], retry_until: float) -> defer.Deferred[None]:
        now = self._clock.seconds()
        try:
            content = self._store.open_content(msg.queue_id)
            try:
                data, dsn_env = make_dsn(
                    msg.envelope, rcpts, kind, self._hostname, content, now, self._postmaster,
                    remote_hosts=msg.remote_hosts, retry_until=retry_until,
                )
            finally:
                content.close()
        except Exception:
            # a bug, most likely: count it as a crash so that it ends in the hold queue, not in a loop
            msg.envelope.crashes += 1
            self._log.failure("building a {kind} DSN for {queue_id} failed; kept, retried in {delay}s",
                              kind=kind, queue_id=msg.queue_id, delay=self._dsn_retry)
            return defer.succeed(None)

        def submitted(dsn_id: str) -> None:
            for r in rcpts:
                if r.dsn_due == kind:
                    r.dsn_due = None
            self._track(
                TrackingEventId.DSN, msg, tuple(r.address for r in rcpts), source="DSN",
                details={"dsn_queue_id": dsn_id, "action": kind, "related_recipient": msg.envelope.sender},
            )

        d = defer.maybeDeferred(self._store.submit, data, dsn_env)
        d.addCallback(submitted)
        d.addErrback(lambda f: self._log.failure(
            "queueing a {kind} DSN for {queue_id} failed; the message is kept and the DSN retried in {delay}s", f,
            kind=kind, queue_id=msg.queue_id, delay=self._dsn_retry,
        ))
        return d

    def _track(
        self,
        event_id: TrackingEventId,
        msg: _Message,
        recipients: tuple[str, ...],
        *,
        connector: str | None = None,
        result: RecipientResult | None = None,
        source: str | None = None,
        details: Mapping[str, Any] | None = None,
        reply: str | None = None,
    ) -> None:
        if self._tracker is None:
            return
        env = msg.envelope
        event = TrackingEvent(
            event_id=event_id,
            queue_id=msg.queue_id,
            timestamp=self._clock.seconds(),
            sender=env.sender,
            recipients=recipients,
            message_id=env.message_id,
            size=env.size,
            connector=connector,
            source=source,
            remote_host=result.remote_host if result else None,
            reply=reply if reply is not None else (str(result.reply) if result else None),
            tls=result.tls if result else None,
            details=event_details(event_id, env.received_at, self._clock.seconds(), result, details),
        )
        try:
            self._tracker.track(event)
        except Exception:
            self._log.failure("message tracker failed on {event_id}", event_id=event_id.value)
