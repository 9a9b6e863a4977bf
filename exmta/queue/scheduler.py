"""The delivery scheduler: Postfix's queue manager, done as objects.

:class:`DeliveryScheduler` claims due messages from an
:class:`~exmta.interfaces.IQueueStore`, routes their pending recipients with
an :class:`~exmta.interfaces.IRouter`, hands them to
:class:`~exmta.interfaces.ISendConnector` providers, records per-recipient
results, generates DSNs (:mod:`exmta.queue.bounce`) and writes the new state
back with ``store.update``. Every timer runs on the injected clock.

Rules, in one place:

* **Active window.** At most ``QueueConfig.max_active`` messages are claimed
  at once. ``wake()`` (called by the store listener after each commit) asks
  for a claim on the next reactor turn; several wakes coalesce into one.
  The store alternates new and deferred mail inside a claim.
* **Destinations.** A delivery goes to a destination keyed by
  ``(connector, nexthop)``. Each destination has its own queue of waiting
  deliveries and a concurrency limit, ``SendConnectorConfig.max_per_destination``
  of its connector (``send_configs``; 20 when unknown). A destination whose
  attempt failed (every recipient deferred, or the connector crashed or timed
  out) drops to concurrency 1 and doubles on every successful attempt back up
  to the limit (slow start, as Postfix's destination concurrency feedback).
  An attempt is successful when the next hop gave any final answer (delivered
  or failed). The state is forgotten ``destination_ttl`` seconds after the
  last failure once the destination is idle. ``suspend_after`` (3) failed
  attempts in a row suspend a destination for ``retry_schedule[0]``
  seconds: its waiting and new deliveries are deferred at once with
  ``451 4.4.1 Delivery to X temporarily suspended: <last reply>``, without a
  connection and without counting an attempt (Postfix's dead destination).
* **Fairness.** Destinations do not share a queue, so a slow destination only
  occupies its own slots. So that one destination cannot fill the whole
  active window with waiting messages, a destination keeps at most
  ``max_waiting_per_destination`` waiting deliveries (default
  ``max(1, max_active // 2)``); more are put back to the deferred queue due
  in ``requeue_delay`` (10) seconds without counting an attempt. (With a
  quarter of the window and 60 s, a burst to one smart host stalled for a
  minute once receiving outpaced delivery: benchmarks/PERFORMANCE.rst.)
* **Retries.** A DEFERRED recipient stays pending with
  ``next_attempt = now + backoff(attempts - 1, retry_schedule)``, capped at the
  expiry time, so the last try happens when the message expires. The
  message's next attempt is its earliest pending recipient's; only recipients
  whose own time has come are tried when it is claimed.
* **Expiry.** A recipient deferred at or after ``received_at + max_lifetime``
  becomes EXPIRED (``550 5.4.7 QUEUE.Expired``) and bounces.
* **Delay warnings.** When ``delay_warning`` > 0, a recipient deferred at or
  after ``received_at + delay_warning`` gets one ``action=delayed`` DSN if its
  NOTIFY includes DELAY or it had no NOTIFY (RFC 3461 leaves the default to
  the server; we warn, as Exchange does). The retry before the warning is
  brought forward to the warning time, so the warning is not late by up to
  one retry interval.
* **DSNs.** FAILED and EXPIRED recipients bounce when NOTIFY includes FAILURE
  or is absent. Recipients delivered by a *local* connector (Maildir or LMTP:
  ``send_configs[name].kind`` in ``{"lmtp", "maildir"}``, or a ``kind``
  attribute on the connector object) with NOTIFY=SUCCESS get an
  ``action=delivered`` DSN. A remote SMTP hop that offers DSN gets NOTIFY
  and reports delivery itself; one that does not makes us send an
  ``action=relayed`` DSN for NOTIFY=SUCCESS recipients (RFC 3461 5.2.2, as
  Exchange does). No DSN ever goes to the null sender or is made
  for a message of kind ``"dsn"``. DSNs are queued with ``store.submit``
  before the original's state is updated (a crash in between may duplicate a
  DSN, never lose one). A DSN that cannot be built or queued (disk full, a
  bug) is never dropped: its recipients keep ``dsn_due`` in the stored
  envelope, the message stays queued (due again within ``dsn_retry``
  seconds) and the DSN is retried on every claim until it is committed. A
  DSN that fails to *build* counts as a crash, so a bug ends in the hold
  queue (poison threshold) rather than in an endless loop.
* **Crashes.** A connector that raises or errbacks counts as DEFERRED
  ``451 4.3.0`` for its recipients and the message's ``crashes`` goes up by
  one for that attempt; at ``poison_threshold`` the message is moved to the
  hold queue with ``store.hold`` and a POISONMESSAGE event. A claimed message
  whose ``crashes`` already reached the threshold (a store's ``recover()``
  may count process crashes there) is held without another attempt. A connector that
  does not answer within ``delivery_timeout`` is cancelled and counts as
  DEFERRED ``451 4.4.2`` (not a crash).
* **Routing.** Recipients in a route to :data:`~exmta.routing.router.UNREACHABLE`
  fail with ``550 5.4.4 Unable to route``. A route to a connector name that
  is not in ``connectors`` (a wiring mistake) defers ``451 4.4.0``.
* **Tracking.** One event per recipient and outcome: SEND (remote 250) or
  DELIVER (local connector, same rule as above), DEFER, FAIL, EXPIRE; DSN per
  generated report; POISONMESSAGE when held.
* **Store errors.** A failed claim is retried after ``claim_retry`` seconds.
  A failed ``update``/``hold`` is retried with doubling delays
  (``claim_retry`` * 2^n, at most ``STORE_RETRY_CAP``) for as long as it
  fails, while the message keeps its slot in the active window: a message is
  never stranded in the store's active state while the process runs (a disk
  full for minutes, issue 10 item 7). Only a store that says the message is
  gone or elsewhere (KeyError, ValueError) ends the retries.
* **Stopping.** ``stopService`` stops claiming, cancels timers, returns
  deliveries that have not started to the queue unchanged, and waits up to
  ``stop_timeout`` seconds for running ones. After the deadline the rest are
  cancelled and left leased in the store, which ``recover()`` returns to
  the queue on the next start. The scheduler does not call ``recover()``;
  the store's owner does before starting it.

This module holds the service, the claim loop, routing and live
reconfiguration; the rest are mixins of :class:`DeliveryScheduler` in modules
of their own: destinations (:mod:`exmta.queue.destinations`), results, DSNs
and tracking (:mod:`exmta.queue.outcomes`) and the operator's actions
(:mod:`exmta.queue.scheduleradmin`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from exmta.config.schema import Config, QueueConfig, SendConnectorConfig
from exmta.interfaces import (
    IMessageTracker,
    IQueueStore,
    IReconfigurable,
    IRouter,
    ISchedulerAdmin,
    ISendConnector,
)
from exmta.model import (
    Outcome,
    QueueEntry,
    Recipient,
    RecipientResult,
    Reply,
    Route,
    TrackingEventId,
)
from exmta.queue.destinations import REPLY_NO_RESULT, DestinationQueues, _Delivery, _Destination
from exmta.queue.errors import StoreUnavailable
from exmta.queue.outcomes import Outcomes, _Message, backoff, wants_notify
from exmta.queue.scheduleradmin import SchedulerAdmin
from exmta.reconfig import Reconfiguration
from exmta.routing.router import UNREACHABLE, StaticRouter
from exmta.routing.split import transfer_details

REPLY_UNROUTABLE = Reply.make(550, "5.4.4", "Unable to route")
REPLY_ROUTER_ERROR = Reply.make(451, "4.3.0", "Routing failed")


@implementer(ISchedulerAdmin, IReconfigurable)
class DeliveryScheduler(DestinationQueues, Outcomes, SchedulerAdmin, Service):
    """Claims, routes and delivers queued mail; see the module docstring for the rules.

    ``connectors`` maps send connector names (as routes name them) to
    ISendConnector providers. ``send_configs`` maps the same names to their
    :class:`SendConnectorConfig`, for ``max_per_destination`` and to tell
    local (LMTP/Maildir) connectors from SMTP ones.
    """

    name = "scheduler"
    _log = Logger()

    def __init__(
        self,
        store: IQueueStore,
        router: IRouter,
        connectors: Mapping[str, ISendConnector],
        config: QueueConfig,
        clock: IReactorTime,
        tracker: IMessageTracker | None = None,
        hostname: str = "localhost",
        postmaster: str = "postmaster",
        *,
        send_configs: Mapping[str, SendConnectorConfig] | None = None,
        stop_timeout: float = 30.0,
        delivery_timeout: float = 3600.0,
        max_waiting_per_destination: int | None = None,
        requeue_delay: float = 10.0,
        destination_ttl: float = 300.0,
        suspend_after: int = 3,
        claim_retry: float = 5.0,
        dsn_retry: float = 60.0,
    ) -> None:
        if not config.retry_schedule:
            raise ValueError("QueueConfig.retry_schedule must not be empty")
        self._store = store
        self._router = router
        self._connectors = dict(connectors)
        self._config = config
        self._clock = clock
        self._tracker = tracker
        self._hostname = hostname
        self._postmaster = postmaster
        self._send_configs = dict(send_configs or {})
        self._stop_timeout = stop_timeout
        self._delivery_timeout = delivery_timeout
        self._max_waiting = (
            max_waiting_per_destination if max_waiting_per_destination is not None
            else max(1, config.max_active // 2)
        )
        self._requeue_delay = requeue_delay
        self._destination_ttl = destination_ttl
        self._suspend_after = max(1, suspend_after)
        self._claim_retry = claim_retry
        self._dsn_retry = dsn_retry

        self._messages: dict[str, _Message] = {}
        self._in_flight: set[_Delivery] = set()
        self._destinations: dict[tuple[str, str | None], _Destination] = {}
        self._pumping: set[tuple[str, str | None]] = set()
        self._store_retries: dict[str, IDelayedCall] = {}
        self._claim_call: IDelayedCall | None = None
        self._timer: IDelayedCall | None = None
        self._claiming = False
        self._claim_again = False
        self._listening = False
        self._drained: defer.Deferred[None] | None = None
        self._deadline: IDelayedCall | None = None
        self._generation = 0
        # operator actions (exmta.admin): suspended destinations and a redirect (drain) target
        self._operator_suspended: dict[tuple[str, str | None], str] = {}
        self._redirect: tuple[str, str | None] | None = None
        self.operator_state: Any = None  # exmta.queue.operator_state.OperatorStateFile: survives restarts
        #: the Config this scheduler was built or last reconfigured from (None: built from parts)
        self._config_source: Config | None = None

    @classmethod
    def from_config(
        cls,
        config: Config,
        store: IQueueStore,
        connectors: Mapping[str, ISendConnector],
        clock: IReactorTime,
        tracker: IMessageTracker | None = None,
        router: IRouter | None = None,
        **options: Any,
    ) -> DeliveryScheduler:
        """The usual wiring: a StaticRouter over ``config.routes`` unless ``router`` is given."""
        send = send_configs_by_name(config.send)
        scheduler = cls(
            store,
            router if router is not None else StaticRouter(config.routes, send),
            connectors,
            config.queue,
            clock,
            tracker,
            hostname=config.hostname,
            postmaster=config.postmaster,
            send_configs=send,
            **options,
        )
        scheduler._config_source = config
        return scheduler

    def set_router(self, router: IRouter) -> None:
        """Swap the router (configuration reload); deliveries already routed keep their route."""
        self._router = router

    def set_queue_config(self, config: QueueConfig) -> None:
        """Swap the queue settings (configuration reload); they apply from the next decision on."""
        if not config.retry_schedule:
            raise ValueError("QueueConfig.retry_schedule must not be empty")
        self._config = config
        self.wake()

    # ------------------------------------------------------------ live reconfiguration (IReconfigurable)

    def prepare_reconfigure(self, new_config: Config, old_config: Config | None = None) -> Reconfiguration:
        """What ``new_config`` changes here, built but not applied (see IReconfigurable).

        Routes and queue settings apply live; routes to a send connector
        this process does not run, and the pickup interval, need a restart.
        ``old_config`` defaults to the Config this scheduler was built or last
        reconfigured from; it names the send connectors that are running.
        ValueError (nothing changed) for queue settings the scheduler cannot use.
        """
        if old_config is None:
            old_config = self._config_source
        old_queue = old_config.queue if old_config is not None else self._config
        plan = Reconfiguration("scheduler")
        steps: list[Callable[[], None]] = []
        old_send = ({s.name: s for s in old_config.send} if old_config is not None else dict(self._send_configs))
        new_send = {s.name: s for s in new_config.send}
        usable = set(old_send) & set(new_send)
        if (old_config is None or new_config.routes != old_config.routes
                or new_config.accepted_domains != old_config.accepted_domains):
            missing = {c for r in new_config.routes for c in (r.connector, r.internal_connector) if c} - usable
            if missing:
                plan.needs_restart.append(f"routes to new send connector(s) {', '.join(sorted(missing))}")
            else:
                router = StaticRouter(new_config.routes, send_configs_by_name([old_send[n] for n in sorted(usable)]))
                steps.append(lambda: self.set_router(router))
                plan.applied.append(f"routes: {len(new_config.routes)} route(s) applied")
        if new_config.queue != old_queue:
            if not new_config.queue.retry_schedule:
                raise ValueError("QueueConfig.retry_schedule must not be empty")
            steps.append(lambda: self.set_queue_config(new_config.queue))
            plan.applied.append("queue settings applied")
            if new_config.queue.pickup_interval != old_queue.pickup_interval:
                plan.needs_restart.append("queue.pickup_interval")

        def apply() -> None:
            for step in steps:
                step()
            self._config_source = new_config

        plan.apply = apply
        return plan

    def reconfigure(self, new_config: Config) -> Reconfiguration:
        """Apply ``new_config``'s routes and queue settings now; -> what was applied and what needs a restart."""
        plan = self.prepare_reconfigure(new_config)
        plan.apply()
        self._log.info("reconfigured: {description}", description=plan.describe())
        return plan

    # ------------------------------------------------------------ service

    def startService(self) -> None:
        super().startService()
        if not self._listening:
            self._store.add_listener(self._on_commit)
            self._listening = True
        self._log.info("delivery scheduler started, window {max_active}", max_active=self._config.max_active)
        self.wake()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._cancel(self._claim_call)
        self._claim_call = None
        self._cancel(self._timer)
        self._timer = None
        for dest in list(self._destinations.values()):
            while dest.waiting:
                self._skip(dest.waiting.popleft(), None)
        if not self._messages:
            self._log.info("delivery scheduler stopped")
            return defer.succeed(None)
        self._log.info(
            "delivery scheduler stopping, waiting up to {timeout}s for {count} messages",
            timeout=self._stop_timeout, count=len(self._messages),
        )
        self._drained = defer.Deferred()
        self._deadline = self._clock.callLater(self._stop_timeout, self._abandon)
        return self._drained

    def _abandon(self) -> None:
        """Stop deadline: cancel what is still running and leave it leased in the store."""
        self._deadline = None
        self._generation += 1  # results that still arrive are ignored
        ids = sorted(self._messages)
        self._log.warn(
            "stop deadline passed; {count} messages left for recover(): {queue_ids}",
            count=len(ids), queue_ids=ids,
        )
        calls = [d.call for d in self._in_flight if d.call is not None]
        for retry in self._store_retries.values():
            self._cancel(retry)
        self._store_retries.clear()
        self._in_flight.clear()
        self._messages.clear()
        self._destinations.clear()
        drained, self._drained = self._drained, None
        for call in calls:
            call.cancel()
        if drained is not None:
            drained.callback(None)

    def _check_drained(self) -> None:
        if self.running or self._drained is None or self._messages:
            return
        self._cancel(self._deadline)
        self._deadline = None
        drained, self._drained = self._drained, None
        self._log.info("delivery scheduler stopped")
        drained.callback(None)

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()

    # ------------------------------------------------------------ claiming

    def _on_commit(self, queue_id: str) -> None:
        self.wake()

    def wake(self) -> None:
        """New mail, free room or an operator's retry: claim on the next reactor turn. Coalesced.

        A commit or a stored state just succeeded, or an operator asks: state writes waiting to be
        retried (a full disk) are tried at once too, not after their backoff.
        """
        for call in self._store_retries.values():
            if call.active():
                call.reset(0)
        self._wake()

    def _wake(self) -> None:
        if not self.running:
            return
        if self._claiming:
            self._claim_again = True
            return
        if self._claim_call is None or not self._claim_call.active():
            self._claim_call = self._clock.callLater(0, self._claim)

    def _claim(self) -> None:
        self._claim_call = None
        if not self.running:
            return
        if self._claiming:
            self._claim_again = True
            return
        limit = self._config.max_active - len(self._messages)
        if limit <= 0:
            self._reschedule_timer()
            return
        self._claiming = True
        generation = self._generation
        d = defer.maybeDeferred(self._store.claim, self._clock.seconds(), limit)
        d.addCallback(self._cb_claimed, generation)
        d.addCallbacks(self._claim_done, self._eb_claim)

    def _cb_claimed(self, entries: list[QueueEntry], generation: int) -> None:
        for entry in entries:
            if not self.running or generation != self._generation:
                # stopped while claiming: hand it straight back, due now
                self._put_back(entry)
                continue
            try:
                self._process(entry)
            except Exception:
                self._log.failure("processing {queue_id} failed", queue_id=entry.queue_id)

    def _eb_claim(self, failure: Failure) -> None:
        self._claiming = False
        self._claim_again = False
        if failure.check(StoreUnavailable):  # the queue's database is away: expected, no traceback
            self._log.warn("claiming from the queue failed: {error}; retrying in {delay}s",
                           error=failure.getErrorMessage(), delay=self._claim_retry)
        else:
            self._log.failure("claiming from the queue failed; retrying in {delay}s", failure,
                              delay=self._claim_retry)
        if self.running:
            self._set_timer(self._clock.seconds() + self._claim_retry)

    def _claim_done(self, _: object) -> None:
        self._claiming = False
        if self._claim_again:
            self._claim_again = False
            self._wake()
        else:
            self._reschedule_timer()

    def _put_back(self, entry: QueueEntry) -> None:
        d = defer.maybeDeferred(self._store.update, entry.queue_id, entry.envelope, self._clock.seconds())
        d.addErrback(lambda f: self._log.failure("returning {queue_id} failed", f, queue_id=entry.queue_id))

    def _reschedule_timer(self) -> None:
        """Arm the retry timer for the store's earliest deferred message."""
        if not self.running:
            return
        if len(self._messages) >= self._config.max_active:
            # the window is full; a finishing message wakes us
            self._cancel(self._timer)
            self._timer = None
            return
        d = defer.maybeDeferred(self._store.next_due)
        d.addCallbacks(self._cb_next_due, self._eb_next_due)

    def _eb_next_due(self, failure: Failure) -> None:
        if failure.check(StoreUnavailable):  # the queue's database is away: the next wake asks again
            self._log.warn("next_due failed: {error}", error=failure.getErrorMessage())
            if self.running:
                self._set_timer(self._clock.seconds() + self._claim_retry)
        else:
            self._log.failure("next_due failed", failure)

    def _cb_next_due(self, due: float | None) -> None:
        if not self.running:
            return
        if due is None:
            self._cancel(self._timer)
            self._timer = None
            return
        now = self._clock.seconds()
        # something due now that the claim did not return: don't spin
        self._set_timer(due if due > now else now + 1.0)

    def _set_timer(self, when: float) -> None:
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() == when:
                return
            self._timer.cancel()
        self._timer = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._wake()

    # ------------------------------------------------------------ one message

    def _process(self, entry: QueueEntry) -> None:
        now = self._clock.seconds()
        env = entry.envelope
        if not env.received_at:
            env.received_at = now
        msg = _Message(entry)
        self._messages[entry.queue_id] = msg
        for r in env.recipients:  # DSNs that an earlier attempt could not queue
            if r.dsn_due in ("failed", "delayed", "delivered", "relayed"):
                getattr(msg, r.dsn_due).append(r)
        if env.crashes >= self._config.poison_threshold:
            # counted by the store's recover() after process crashes: do not try again
            self._finalize(msg)
            return
        msg.outstanding += 1  # guard: deliveries may finish synchronously while we route
        try:
            due = [r for r in env.pending() if r.next_attempt is None or r.next_attempt <= now]
            if due:
                self._route(msg, due, now)
        finally:
            msg.outstanding -= 1
        if msg.outstanding == 0:
            self._finalize(msg)

    def _route(self, msg: _Message, due: list[Recipient], now: float) -> None:
        by_address: dict[str, list[Recipient]] = {}
        for r in due:
            by_address.setdefault(r.address, []).append(r)
        try:
            if self._redirect is not None:
                routes = [Route(self._redirect[0], tuple(by_address), self._redirect[1])]
                self._track(TrackingEventId.REDIRECT, msg, tuple(by_address), connector=self._redirect[0],
                            source="ADMIN", details={"target": self._redirect[1]})
            else:
                routes = list(self._router.route(msg.envelope, list(by_address)))
                fork = transfer_details(routes, {a: rs[0].attempts == 0 for a, rs in by_address.items()})
                if fork is not None:  # a split route forked the recipients (exmta.routing.split)
                    self._track(TrackingEventId.TRANSFER, msg, fork[0], source="ROUTING", details=fork[1])
        except Exception:
            self._log.failure("router failed for {queue_id}", queue_id=msg.queue_id)
            routes = []
        seen: set[str] = set()
        for route in routes:
            addresses = [a for a in route.recipients if a in by_address and a not in seen]
            seen.update(addresses)
            if not addresses:
                continue
            if route.connector == UNREACHABLE:
                for a in addresses:
                    self._apply_all(msg, by_address[a], RecipientResult(a, Outcome.FAILED, REPLY_UNROUTABLE), None)
                continue
            if route.connector not in self._connectors:
                self._log.error(
                    "route to unknown send connector {connector} for {queue_id}",
                    connector=route.connector, queue_id=msg.queue_id,
                )
                reply = Reply.make(451, "4.4.0", f"Send connector {route.connector} is not available")
                for a in addresses:
                    self._apply_all(msg, by_address[a], RecipientResult(a, Outcome.DEFERRED, reply), route.connector)
                continue
            delivery = _Delivery(
                msg, route.connector, route.nexthop,
                [by_address[a][0] for a in addresses], {a: by_address[a] for a in addresses},
            )
            msg.outstanding += 1
            self._enqueue(delivery, now)
        for a, rcpts in by_address.items():
            if a not in seen:
                reply = REPLY_ROUTER_ERROR if not routes else REPLY_NO_RESULT
                self._apply_all(msg, rcpts, RecipientResult(a, Outcome.DEFERRED, reply), None)

    # ------------------------------------------------------------ operations

    def stats(self) -> dict[str, Any]:
        """A snapshot for operations: window use and per-destination state."""
        return {
            "running": bool(self.running),
            "active_messages": len(self._messages),
            "max_active": self._config.max_active,
            "in_flight": len(self._in_flight),
            "destinations": {
                f"{c}/{n or '*'}": {
                    "connector": c,
                    "nexthop": n,
                    "active": d.active,
                    "window": d.window,
                    "limit": d.limit,
                    "waiting": len(d.waiting),
                    "failures": d.failures,
                    "suspended_until": d.suspended_until,
                }
                for (c, n), d in self._destinations.items()
            },
        }


def send_configs_by_name(configs: Sequence[SendConnectorConfig]) -> dict[str, SendConnectorConfig]:
    """``{name: config}`` for :class:`DeliveryScheduler`'s ``send_configs`` and the router."""
    return {c.name: c for c in configs}


__all__ = ["DeliveryScheduler", "backoff", "send_configs_by_name", "wants_notify"]
