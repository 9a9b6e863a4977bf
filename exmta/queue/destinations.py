"""Per-destination concurrency, backoff and suspension of the delivery scheduler.

A delivery goes to a destination keyed by ``(connector, nexthop)``; each has
its own queue of waiting deliveries and a window that drops to 1 after a
failed attempt and doubles on success (the rules are in the module docstring
of :mod:`exmta.queue.scheduler`). :class:`DestinationQueues` is a mixin of
:class:`~exmta.queue.scheduler.DeliveryScheduler`; the attributes annotated on
it are the scheduler's, for the type checker.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from exmta.config.schema import QueueConfig, SendConnectorConfig
from exmta.interfaces import IQueueStore, ISendConnector
from exmta.model import DeliveryRequest, Outcome, Recipient, RecipientResult, Reply
from exmta.queue.outcomes import _Message

__all__ = ["DEFAULT_DESTINATION_LIMIT", "DestinationQueues", "LOCAL_KINDS"]

LOCAL_KINDS = frozenset({"lmtp", "maildir"})
DEFAULT_DESTINATION_LIMIT = 20

REPLY_CRASH = Reply.make(451, "4.3.0", "Internal error in the send connector")
REPLY_TIMEOUT = Reply.make(451, "4.4.2", "Delivery attempt timed out")
REPLY_NO_RESULT = Reply.make(451, "4.3.0", "Send connector returned no result for this recipient")


def _line_cut(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(eq=False)
class _Delivery:
    message: _Message
    connector: str
    nexthop: str | None
    recipients: list[Recipient]
    # every recipient object of the message with the same address shares the result
    same_address: dict[str, list[Recipient]]
    call: defer.Deferred[Any] | None = None


@dataclass(eq=False)
class _Destination:
    key: tuple[str, str | None]
    limit: int
    window: int
    active: int = 0
    waiting: collections.deque[_Delivery] = field(default_factory=collections.deque)
    failures: int = 0
    last_failure: float | None = None
    last_reply: Reply | None = None
    suspended_until: float | None = None

    @property
    def idle(self) -> bool:
        return self.active == 0 and not self.waiting


class DestinationQueues:
    """Destinations of :class:`~exmta.queue.scheduler.DeliveryScheduler`: enqueue, pump, start, feedback."""

    running: int
    _log: Logger
    _clock: IReactorTime
    _config: QueueConfig
    _store: IQueueStore
    _connectors: dict[str, ISendConnector]
    _send_configs: dict[str, SendConnectorConfig]
    _messages: dict[str, _Message]
    _in_flight: set[_Delivery]
    _destinations: dict[tuple[str, str | None], _Destination]
    _pumping: set[tuple[str, str | None]]
    _operator_suspended: dict[tuple[str, str | None], str]
    _generation: int
    _delivery_timeout: float
    _max_waiting: int
    _requeue_delay: float
    _destination_ttl: float
    _suspend_after: int
    _apply_all: Callable[..., None]
    _finalize: Callable[[_Message], None]

    def _limit_for(self, connector: str) -> int:
        cfg = self._send_configs.get(connector)
        return max(1, cfg.max_per_destination) if cfg is not None else DEFAULT_DESTINATION_LIMIT

    def _is_local(self, connector: str) -> bool:
        cfg = self._send_configs.get(connector)
        if cfg is not None:
            return cfg.kind in LOCAL_KINDS
        return getattr(self._connectors.get(connector), "kind", None) in LOCAL_KINDS

    def _destination(self, key: tuple[str, str | None], now: float) -> _Destination:
        dest = self._destinations.get(key)
        if dest is None:
            self._prune(now)
            limit = self._limit_for(key[0])
            dest = self._destinations[key] = _Destination(key, limit, limit)
        elif dest.idle and self._forgettable(dest, now):
            dest.window, dest.failures, dest.last_failure, dest.suspended_until = dest.limit, 0, None, None
        return dest

    def _prune(self, now: float) -> None:
        for key, dest in list(self._destinations.items()):
            if dest.idle and (dest.last_failure is None or self._forgettable(dest, now)):
                del self._destinations[key]

    def _forgettable(self, dest: _Destination, now: float) -> bool:
        """A failed destination's state is dropped destination_ttl after its last failure or suspension."""
        if dest.last_failure is None:
            return False
        since = max(dest.last_failure, dest.suspended_until or 0.0)
        return now - since >= self._destination_ttl

    def _enqueue(self, delivery: _Delivery, now: float) -> None:
        dest = self._destination((delivery.connector, delivery.nexthop), now)
        if dest.key in self._operator_suspended:
            # suspended by an operator: no attempt; looked at again after the first retry interval
            self._skip(delivery, now + self._config.retry_schedule[0])
            return
        if dest.suspended_until is not None and now < dest.suspended_until:
            self._defer_suspended(delivery, dest)
            return
        if dest.active >= dest.window and len(dest.waiting) >= self._max_waiting:
            self._log.debug(
                "destination {connector}/{nexthop} backlog full; {queue_id} requeued",
                connector=delivery.connector, nexthop=delivery.nexthop, queue_id=delivery.message.queue_id,
            )
            self._skip(delivery, now + self._requeue_delay)
            return
        dest.waiting.append(delivery)
        self._pump(dest)

    def _defer_suspended(self, delivery: _Delivery, dest: _Destination) -> None:
        """Defer without trying: the destination is suspended (not counted as an attempt)."""
        assert dest.suspended_until is not None
        where = delivery.nexthop or delivery.connector
        last = ""
        if dest.last_reply is not None:  # its codes only when they differ from ours (no "451 4.4.1 ...: 451 4.4.1")
            same = (dest.last_reply.code, dest.last_reply.status) == (451, "4.4.1")
            last = f": {dest.last_reply.text if same else dest.last_reply}"
        reply = Reply.make(451, "4.4.1", _line_cut(f"Delivery to {where} temporarily suspended{last}"))
        for address, rcpts in delivery.same_address.items():
            self._apply_all(
                delivery.message, rcpts, RecipientResult(address, Outcome.DEFERRED, reply),
                delivery.connector, retry_at=dest.suspended_until,
            )
        self._delivery_done(delivery)

    def _pump(self, dest: _Destination) -> None:
        if dest.key in self._pumping:
            return  # a delivery finished synchronously inside the loop below; it goes on
        self._pumping.add(dest.key)
        try:
            while dest.waiting and dest.active < dest.window:
                delivery = dest.waiting.popleft()
                if not self.running:
                    self._skip(delivery, None)
                    continue
                dest.active += 1
                self._start(delivery)
        finally:
            self._pumping.discard(dest.key)

    def _skip(self, delivery: _Delivery, retry_at: float | None) -> None:
        """Give up a delivery that was never started; recipients keep their state."""
        if retry_at is not None:
            for rcpts in delivery.same_address.values():
                for r in rcpts:
                    r.next_attempt = retry_at
        self._delivery_done(delivery)

    def _start(self, delivery: _Delivery) -> None:
        msg = delivery.message
        now = self._clock.seconds()
        for rcpts in delivery.same_address.values():
            for r in rcpts:
                r.attempts += 1
                r.last_attempt = now
                r.route = delivery.connector
        store, queue_id = self._store, msg.queue_id
        request = DeliveryRequest(
            queue_id=queue_id,
            envelope=msg.envelope,
            recipients=tuple(delivery.recipients),
            open_content=lambda: store.open_content(queue_id),
            nexthop=delivery.nexthop,
        )
        self._in_flight.add(delivery)
        generation = self._generation
        d = defer.maybeDeferred(self._connectors[delivery.connector].deliver, request)
        delivery.call = d
        d.addTimeout(self._delivery_timeout, self._clock)
        d.addCallbacks(
            self._cb_delivered, self._eb_delivered,
            callbackArgs=(delivery, generation), errbackArgs=(delivery, generation),
        )
        d.addErrback(lambda f: self._log.failure("handling a delivery result failed", f))

    def _cb_delivered(self, results: Any, delivery: _Delivery, generation: int) -> None:
        if generation != self._generation:
            return
        msg = delivery.message
        by_address: dict[str, RecipientResult] = {}
        try:
            for result in results:
                if result.recipient in delivery.same_address:
                    by_address.setdefault(result.recipient, result)
                else:
                    self._log.warn(
                        "connector {connector} reported unknown recipient {recipient} for {queue_id}",
                        connector=delivery.connector, recipient=result.recipient, queue_id=msg.queue_id,
                    )
        except Exception:
            self._log.failure("connector {connector} returned a bad result", connector=delivery.connector)
            msg.crashed = True
        answered = False
        last: Reply | None = None
        for address, rcpts in delivery.same_address.items():
            result = by_address.get(address) or RecipientResult(address, Outcome.DEFERRED, REPLY_NO_RESULT)
            answered = answered or result.outcome is not Outcome.DEFERRED
            last = result.reply
            self._apply_all(msg, rcpts, result, delivery.connector)
        self._feedback(delivery, answered, last)
        self._delivery_done(delivery)

    def _eb_delivered(self, failure: Failure, delivery: _Delivery, generation: int) -> None:
        if generation != self._generation:
            return
        msg = delivery.message
        if failure.check(defer.TimeoutError):
            self._log.warn(
                "connector {connector} timed out for {queue_id}", connector=delivery.connector, queue_id=msg.queue_id,
            )
            reply = REPLY_TIMEOUT
        else:
            self._log.failure(
                "connector {connector} crashed delivering {queue_id}", failure,
                connector=delivery.connector, queue_id=msg.queue_id,
            )
            msg.crashed = True
            reply = REPLY_CRASH
        for address, rcpts in delivery.same_address.items():
            self._apply_all(msg, rcpts, RecipientResult(address, Outcome.DEFERRED, reply), delivery.connector)
        self._feedback(delivery, False, reply)
        self._delivery_done(delivery)

    def _feedback(self, delivery: _Delivery, success: bool, reply: Reply | None) -> None:
        """Destination concurrency feedback: 1 after a failure, doubling on success.

        ``suspend_after`` failed attempts in a row suspend the destination for
        ``retry_schedule[0]`` seconds: its waiting and new deliveries are
        deferred without a connection (Postfix's "dead destination").
        """
        dest = self._destinations.get((delivery.connector, delivery.nexthop))
        if dest is None:
            return
        dest.active -= 1
        now = self._clock.seconds()
        if success:
            dest.window = min(dest.limit, dest.window * 2)
            dest.failures = 0
            dest.suspended_until = None
            if dest.window == dest.limit:
                dest.last_failure = None
        else:
            dest.window = 1
            dest.failures += 1
            dest.last_failure = now
            dest.last_reply = reply
            if dest.failures >= self._suspend_after:
                dest.suspended_until = now + self._config.retry_schedule[0]
                self._log.warn(
                    "destination {connector}/{nexthop} suspended until {until} after {failures} failures: {reply}",
                    connector=dest.key[0], nexthop=dest.key[1], until=dest.suspended_until,
                    failures=dest.failures, reply=str(reply),
                )
                while dest.waiting:
                    self._defer_suspended(dest.waiting.popleft(), dest)
        self._pump(dest)
        if dest.idle and dest.last_failure is None and self._destinations.get(dest.key) is dest:
            del self._destinations[dest.key]  # healthy and idle: nothing worth remembering

    def _delivery_done(self, delivery: _Delivery) -> None:
        self._in_flight.discard(delivery)
        msg = delivery.message
        msg.outstanding -= 1
        if msg.outstanding == 0 and self._messages.get(msg.queue_id) is msg:
            self._finalize(msg)
