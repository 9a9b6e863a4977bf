"""Operator actions on the delivery scheduler (exmta.admin): suspend, resume, redirect, remove.

Exchange's Suspend-Queue, Resume-Queue, Retry-Queue -Redirect and
Remove-Message -WithNDR. :class:`SchedulerAdmin` is a mixin of
:class:`~exmta.queue.scheduler.DeliveryScheduler`; the attributes annotated on
it are the scheduler's, for the type checker. Suspensions and the redirect
survive a restart through ``operator_state`` (:mod:`exmta.queue.operator_state`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from exmta.config.smarthost import smarthost as _smarthost
from exmta.interfaces import IRouter, ISendConnector
from exmta.model import Envelope, QueueEntry, Reply, Route, TrackingEventId
from exmta.queue.bounce import make_dsn
from exmta.queue.destinations import _Destination
from exmta.queue.outcomes import _Message

__all__ = ["SchedulerAdmin"]


class SchedulerAdmin:
    """The operator methods of :class:`~exmta.queue.scheduler.DeliveryScheduler`."""

    _log: Logger
    _clock: IReactorTime
    _store: Any  # an IQueueStore that also provides IQueueAdmin (read, remove)
    _router: IRouter
    _connectors: dict[str, ISendConnector]
    _messages: dict[str, _Message]
    _destinations: dict[tuple[str, str | None], _Destination]
    _operator_suspended: dict[tuple[str, str | None], str]
    _redirect: tuple[str, str | None] | None
    _hostname: str
    _postmaster: str
    operator_state: Any
    _bounceable: Callable[[Envelope], bool]
    _track: Callable[..., None]

    def routes_for(self, envelope: Envelope) -> list[Route]:
        """Where the pending recipients of ``envelope`` would go now (the redirect target if one is set)."""
        addresses = list(dict.fromkeys(r.address for r in envelope.pending()))
        if not addresses:
            return []
        if self._redirect is not None:
            return [Route(self._redirect[0], tuple(addresses), self._redirect[1])]
        try:
            return list(self._router.route(envelope, addresses))
        except Exception:
            self._log.failure("router failed for {queue_id}", queue_id=envelope.queue_id)
            return []

    def is_active(self, queue_id: str) -> bool:
        """Is this message claimed by the scheduler (being delivered) right now?"""
        return queue_id in self._messages

    def destination_state(self, connector: str, nexthop: str | None) -> dict[str, Any]:
        """Failures, last reply and suspension of one destination (empty when healthy and idle)."""
        out: dict[str, Any] = {}
        dest = self._destinations.get((connector, nexthop))
        if dest is not None:
            out.update(active=dest.active, failures=dest.failures, suspended_until=dest.suspended_until,
                       last_error=str(dest.last_reply) if dest.last_reply is not None else None)
        reason = self._operator_suspended.get((connector, nexthop))
        if reason is not None:
            out["suspended_by_operator"] = reason
        return out

    def suspend_destination(self, connector: str, nexthop: str | None,
                            reason: str = "suspended by an operator") -> None:
        """Stop delivering to one destination until :meth:`resume_destination` (Exchange Suspend-Queue)."""
        self._operator_suspended[(connector, nexthop)] = reason
        self._log.info("destination {connector}/{nexthop} suspended: {reason}", connector=connector,
                       nexthop=nexthop, reason=reason)
        self._save_operator_state()

    def resume_destination(self, connector: str, nexthop: str | None) -> bool:
        """Undo :meth:`suspend_destination`; True when it was suspended. Call retry_destination after it."""
        found = self._operator_suspended.pop((connector, nexthop), None) is not None
        self._log.info("destination {connector}/{nexthop} resumed", connector=connector, nexthop=nexthop)
        if found:
            self._save_operator_state()
        return found

    def suspended_destinations(self) -> dict[tuple[str, str | None], str]:
        return dict(self._operator_suspended)

    def clear_backoff(self, connector: str, nexthop: str | None) -> None:
        """Forget a destination's failures and automatic suspension (before a retry now)."""
        dest = self._destinations.get((connector, nexthop))
        if dest is not None:
            dest.window, dest.failures, dest.suspended_until = dest.limit, 0, None

    def set_redirect(self, name: str | None, connector: ISendConnector | None = None,
                     nexthop: str | None = None) -> None:
        """Send every message from now on through ``connector`` to ``nexthop`` (drain); None stops it."""
        if name is None:
            self._redirect = None
            self._save_operator_state()
            return
        if connector is not None:
            self._connectors[name] = connector
        self._redirect = (name, nexthop)
        self._save_operator_state()

    def restore_operator_state(self, state: Any, make_connector: Callable[[str, int], Any] | None = None) -> None:
        """Adopt ``state`` (an OperatorStateFile) and what it holds: suspensions, and the redirect when
        ``make_connector(host, port)`` can rebuild its connector. Call before startService."""
        self.operator_state = state
        suspended, redirect = state.load()
        self._operator_suspended.update(suspended)
        for (connector, nexthop), reason in suspended.items():
            self._log.info("destination {connector}/{nexthop} still suspended: {reason}", connector=connector,
                           nexthop=nexthop, reason=reason)
        if redirect is not None and make_connector is not None:
            name, target = redirect
            try:
                smarthost = _smarthost(target)
                built = make_connector(smarthost.host, smarthost.port)
            except Exception:
                self._log.failure("cannot restore the redirect to {target}", target=target)
                return
            name = getattr(built, "name", None) or name
            self._connectors[name] = built
            self._redirect = (name, target)
            self._log.info("queued mail still redirected to {target}", target=target)

    def _save_operator_state(self) -> None:
        if self.operator_state is None:
            return
        try:
            self.operator_state.save(self._operator_suspended, self._redirect)
        except Exception:
            self._log.failure("saving the operator state failed: this change holds only until a restart")

    @property
    def redirect(self) -> tuple[str, str | None] | None:
        return self._redirect

    def remove_message(self, queue_id: str, ndr: bool,
                       reason: str = "removed by an administrator") -> defer.Deferred[dict[str, Any]]:
        """Delete a queued message, with or without a non-delivery report (Exchange Remove-Message -WithNDR).

        KeyError when there is no such message, ValueError while it is being
        delivered. Tracking: FAIL per pending recipient and DSN with an NDR,
        DROP without.
        """
        if queue_id in self._messages:
            return defer.fail(ValueError(f"{queue_id} is being delivered right now; try again in a moment"))
        return defer.Deferred.fromCoroutine(self._remove_message(queue_id, ndr, reason))

    async def _remove_message(self, queue_id: str, ndr: bool, reason: str) -> dict[str, Any]:
        state, env = await defer.maybeDeferred(self._store.read, queue_id)
        if state == "active" or queue_id in self._messages:
            raise ValueError(f"{queue_id} is being delivered right now; try again in a moment")
        msg = _Message(QueueEntry(queue_id, env))
        pending = env.pending()
        reply = Reply.make(550, "5.3.0", f"Message {reason}")
        dsn_id = None
        if ndr and pending and self._bounceable(env):
            for r in pending:
                r.last_reply = reply
            content = self._store.open_content(queue_id)
            try:
                data, dsn_env = make_dsn(env, pending, "failed", self._hostname, content, self._clock.seconds(),
                                         self._postmaster)
            finally:
                content.close()
            dsn_id = await defer.maybeDeferred(self._store.submit, data, dsn_env)
        await defer.maybeDeferred(self._store.remove, queue_id)
        addresses = tuple(r.address for r in pending)
        if ndr:
            self._track(TrackingEventId.FAIL, msg, addresses, source="ADMIN", reply=str(reply),
                        details={"reason": reason})
            if dsn_id is not None:
                self._track(TrackingEventId.DSN, msg, addresses, source="DSN",
                            details={"dsn_queue_id": dsn_id, "action": "failed"})
        else:
            self._track(TrackingEventId.DROP, msg, addresses, source="ADMIN", details={"reason": reason})
        self._log.info("{queue_id} removed from {state} ({ndr}): {reason}", queue_id=queue_id, state=state,
                       ndr="with NDR" if ndr else "without NDR", reason=reason)
        return {"queue_id": queue_id, "state": state, "ndr": dsn_id is not None, "dsn_queue_id": dsn_id,
                "recipients": list(addresses)}
