"""Operator actions on the spool (exmta.admin): read, remove, retry now, release now.

A mixin of :class:`exmta.queue.spool.SpoolStore` (its IQueueAdmin half); the
attributes annotated below are the store's, for the type checker.
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, fail

from exmta.coroutines import run_coroutine
from exmta.model import Envelope
from exmta.queue.groupsync import GroupSync
from exmta.queue.spoolfiles import STATES, _check_id, _encode

__all__ = ["SpoolAdmin"]


class SpoolAdmin:
    """The IQueueAdmin methods of :class:`~exmta.queue.spool.SpoolStore`."""

    syncer: GroupSync
    _dirs: dict[str, str]
    _in_pool: Callable[..., Deferred[Any]]
    _serial: Callable[..., Deferred[Any]]
    _read_envelope: Callable[[str, str], tuple[Envelope, float | None]]
    _env_path: Callable[[str, str], str]
    _locate: Callable[..., str | None]
    _remove_files: Callable[..., str | None]
    _move_rewritten: Callable[[str, bytes, str, str], None]
    _forget: Callable[[str], None]
    _schedule: Callable[[str, float], None]
    _notify: Callable[[str], None]
    _release: Callable[[str, float | None], Deferred[None]]

    def read(self, queue_id: str) -> Deferred[tuple[str, Envelope]]:
        """-> (state, envelope) of one message wherever it is; KeyError when there is none."""
        try:
            _check_id(queue_id)
        except ValueError:
            return fail(KeyError(queue_id))

        def work() -> tuple[str, Envelope]:
            for state in STATES:
                try:
                    env, next_attempt = self._read_envelope(self._env_path(state, queue_id), queue_id)
                except FileNotFoundError:
                    continue
                env.queue_id = queue_id
                return state, env
            raise KeyError(queue_id)

        return self._in_pool(work)

    def remove(self, queue_id: str) -> Deferred[Envelope]:
        """Delete a message that is not being delivered (incoming, deferred or hold); fires with its envelope.

        KeyError when there is no such message, ValueError when it is active
        (claimed by the scheduler): try again once the attempt is over.
        """
        try:
            _check_id(queue_id)
        except ValueError:
            return fail(KeyError(queue_id))

        async def run() -> Envelope:
            def work() -> tuple[str, Envelope]:
                state = self._locate(queue_id, STATES)
                if state is None:
                    raise KeyError(queue_id)
                if state == "active":
                    raise ValueError(f"{queue_id} is being delivered right now; try again in a moment")
                env, _ = self._read_envelope(self._env_path(state, queue_id), queue_id)
                self._remove_files(queue_id, (state,))
                return state, env

            state, env = await self._in_pool(work)
            self._forget(queue_id)
            await self.syncer.sync({self._dirs[state], self._dirs["msg"]})
            return env

        return self._serial([queue_id], lambda: run_coroutine(run()))

    def reschedule(self, queue_id: str, when: float) -> Deferred[bool]:
        """Bring a deferred message's pending recipients forward to ``when`` (retry now).

        Fires True when the message was deferred and is now due at ``when``,
        False when it is not deferred (new mail is due already; held mail
        needs release; active mail is being tried).
        """
        try:
            _check_id(queue_id)
        except ValueError:
            return fail(KeyError(queue_id))

        async def run() -> bool:
            def work() -> bool:
                path = self._env_path("deferred", queue_id)
                try:
                    env, _ = self._read_envelope(path, queue_id)
                except FileNotFoundError:
                    if self._locate(queue_id, STATES) is None:
                        raise KeyError(queue_id) from None
                    return False
                for r in env.pending():
                    if r.next_attempt is None or r.next_attempt > when:
                        r.next_attempt = when
                env.queue_id = queue_id
                self._move_rewritten(queue_id, _encode(env, when), "deferred", "deferred")
                return True

            moved = await self._in_pool(work)
            if moved:
                await self.syncer.sync([self._dirs["deferred"]])
                self._schedule(queue_id, when)
                self._notify(queue_id)
            return moved

        return self._serial([queue_id], lambda: run_coroutine(run()))

    def release_now(self, queue_id: str, when: float) -> Deferred[None]:
        """release() for an operator: the pending recipients are also due at ``when`` (now), not at their retry time."""
        return self._release(queue_id, when)
