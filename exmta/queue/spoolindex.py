"""The spool's in-memory index of due mail and its claims (:mod:`exmta.queue.spool`).

New mail is due first come, first served; deferred mail is due at its retry
time (a heap, cleaned lazily); a claim alternates the two and renames each
envelope into ``active/``. Mail that another process (a receive worker)
committed is indexed through ``notice`` and ``scan_incoming`` (IIncomingFeed).
:class:`SpoolIndex` is a mixin of :class:`~exmta.queue.spool.SpoolStore`; the
attributes annotated on it are the store's, for the type checker.
"""
from __future__ import annotations

import heapq
import os
from collections import OrderedDict
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from exmta.model import Envelope, QueueEntry
from exmta.queue.spoolfiles import _QUEUE_ID, _check_id

__all__ = ["SpoolIndex"]


class SpoolIndex:
    """Indexing, ``notice``/``scan_incoming`` and ``claim`` of :class:`~exmta.queue.spool.SpoolStore`."""

    log: Logger
    _claims: bool
    _new: OrderedDict[str, None]
    _retry: dict[str, float]
    _heap: list[tuple[float, str]]
    _prefer_new: bool
    _tails: dict[str, Deferred[None]]
    _dirs: dict[str, str]
    _in_pool: Callable[..., Deferred[Any]]
    _serial: Callable[..., Deferred[Any]]
    _notify: Callable[[str], None]
    _read_envelope: Callable[[str, str], tuple[Envelope, float | None]]
    _env_path: Callable[[str, str], str]
    _content_path: Callable[[str], str]

    def _due_now(self, queue_id: str) -> bool:
        """Index queue_id as new mail; True when it was not indexed as such yet."""
        if not self._claims:
            return True
        self._retry.pop(queue_id, None)
        if queue_id in self._new:
            return False
        self._new[queue_id] = None
        return True

    def _forget(self, queue_id: str) -> None:
        self._new.pop(queue_id, None)
        self._retry.pop(queue_id, None)

    def _schedule(self, queue_id: str, when: float) -> None:
        if not self._claims:
            return
        self._new.pop(queue_id, None)
        self._retry[queue_id] = when
        heapq.heappush(self._heap, (when, queue_id))

    # ------------------------------------------------------------ several processes

    def notice(self, queue_id: str) -> None:
        """Another process committed queue_id into incoming/: index it as due."""
        try:
            _check_id(queue_id)
        except ValueError:
            self.log.warn("ignoring bad queue id {queue_id!r} from notice()", queue_id=queue_id)
            return
        if self._due_now(queue_id):
            self._notify(queue_id)

    def scan_incoming(self) -> Deferred[int]:
        """List incoming/ and index what the in-memory index missed; fires with that count."""
        def listing() -> list[str]:
            names = os.listdir(self._dirs["incoming"])
            return sorted(n[:-5] for n in names if n.endswith(".json") and _QUEUE_ID.match(n[:-5]))

        def found(ids: list[str]) -> int:
            count = 0
            for queue_id in ids:
                if queue_id not in self._tails and self._due_now(queue_id):
                    count += 1
                    self._notify(queue_id)
            return count

        return self._in_pool(listing).addCallback(found)

    # ------------------------------------------------------------ claiming

    def _take_new(self) -> tuple[str, str] | None:
        if self._new:
            return self._new.popitem(last=False)[0], "incoming"
        return None

    def _take_deferred(self, now: float) -> tuple[str, str] | None:
        while self._heap and self._heap[0][0] <= now:
            when, queue_id = heapq.heappop(self._heap)
            if self._retry.get(queue_id) == when:
                del self._retry[queue_id]
                return queue_id, "deferred"
        return None

    def next_due(self) -> float | None:
        """The earliest retry time of deferred mail (new mail is due at once)."""
        while self._heap and self._retry.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def due_count(self) -> int:
        """Indexed new mail plus deferred mail (due or not)."""
        return len(self._new) + len(self._retry)

    def claim(self, now: float, limit: int) -> Deferred[list[QueueEntry]]:
        """Lease up to limit due messages, alternating new and deferred mail."""
        picked: list[tuple[str, str]] = []
        while len(picked) < limit:
            if self._prefer_new:
                item = self._take_new() or self._take_deferred(now)
            else:
                item = self._take_deferred(now) or self._take_new()
            if item is None:
                break
            picked.append(item)
            self._prefer_new = not self._prefer_new
        if not picked:
            return succeed([])
        return self._serial(
            [q for q, _ in picked], lambda: self._in_pool(self._claim_files, picked)
        ).addCallback(self._claimed)

    def _claim_files(self, picked: list[tuple[str, str]]) -> list[tuple[str, Envelope | None, str | None]]:
        out: list[tuple[str, Envelope | None, str | None]] = []
        for queue_id, source in picked:
            path = self._env_path("active", queue_id)
            try:
                os.rename(self._env_path(source, queue_id), path)
            except FileNotFoundError:
                continue  # claimed, moved or removed since it was indexed
            try:
                envelope, _ = self._read_envelope(path, queue_id)
                if not os.path.exists(self._content_path(queue_id)):
                    raise ValueError("content file is missing")
            except (OSError, ValueError) as e:
                dest = self._to_corrupt("active", queue_id)
                out.append((queue_id, None, f"Moved corrupt message {path} to {dest}: {e}"))
                continue
            out.append((queue_id, envelope, None))
        return out

    def _claimed(self, results: list[tuple[str, Envelope | None, str | None]]) -> list[QueueEntry]:
        entries = []
        for queue_id, envelope, problem in results:
            if envelope is None:
                self.log.error("{problem}", problem=problem, queue_id=queue_id)
            else:
                entries.append(QueueEntry(queue_id, envelope))
        return entries

    def _to_corrupt(self, state: str, queue_id: str) -> str:
        """Move an envelope (and its content) to corrupt/; returns where it went (thread pool)."""
        src = self._env_path(state, queue_id)
        dest = os.path.join(self._dirs["corrupt"], queue_id + ".json")
        if os.path.exists(dest):
            dest = os.path.join(self._dirs["corrupt"], f"{queue_id}.{state}.{os.urandom(3).hex()}.json")
        os.rename(src, dest)
        content = self._content_path(queue_id)
        if os.path.exists(content):
            os.rename(content, os.path.join(self._dirs["corrupt"], queue_id + ".msg"))
        return dest
