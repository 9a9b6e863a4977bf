"""Spool recovery at start: active mail back to incoming, corrupt envelopes aside, orphans removed.

A mixin of :class:`exmta.queue.spool.SpoolStore` (its ``recover()``); the
attributes annotated below are the store's, for the type checker. The spool's
module docstring says which files recovery may delete and when.
"""
from __future__ import annotations

import heapq
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from exmta.coroutines import run_coroutine
from exmta.model import Envelope
from exmta.queue.groupsync import GroupSync
from exmta.queue.spoolfiles import _QUEUE_ID, _encode, _unlink_quiet
from exmta.queue.writerlock import WriterLock

__all__ = ["SpoolRecovery"]


@dataclass
class _Recovery:
    """What recover()'s thread job found; logged and applied on the reactor thread."""

    incoming: list[str] = field(default_factory=list)
    deferred: dict[str, float] = field(default_factory=dict)
    returned: int = 0
    held: int = 0
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    orphans: int = 0
    temps: int = 0
    unknown: list[str] = field(default_factory=list)
    by_reference: bool = True  # False: the writer lock was busy, young files were left alone

class SpoolRecovery:
    """``recover()`` of :class:`~exmta.queue.spool.SpoolStore`."""

    log: Logger
    root: str
    syncer: GroupSync
    last_recovery: dict[str, int]
    _dirs: dict[str, str]
    _claims: bool
    _count_crashes: bool
    _tmp_grace: float
    _created_at: float
    _recover_wait: float
    _exclusive: bool
    _new: OrderedDict[str, None]
    _retry: dict[str, float]
    _heap: list[tuple[float, str]]
    _in_thread: Callable[..., Deferred[Any]]
    _in_pool: Callable[..., Deferred[Any]]
    _read_envelope: Callable[[str, str], tuple[Envelope, float | None]]
    _env_path: Callable[[str, str], str]
    _content_path: Callable[[str], str]
    _to_corrupt: Callable[[str, str], str]
    _move_rewritten: Callable[[str, bytes, str, str], None]

    def recover(self) -> Deferred[int]:
        """Return active/ to incoming/, quarantine corrupt envelopes, drop orphans, rebuild the index.

        Fires with the number of messages returned from active/. Details of
        the last run are in ``last_recovery``.
        """
        return run_coroutine(self._recover())

    async def _recover(self) -> int:
        lock = WriterLock(self.root)
        # waiting for the writers of an earlier run is a blocking poll: always in a thread
        self._exclusive = await self._in_thread(lock.exclusive, self._recover_wait)
        try:
            report = await self._in_pool(self._recover_files)
        finally:
            self._exclusive = False
            lock.release()
        if not report.by_reference:
            self.log.warn("Spool {root}: another process kept the writer lock for {wait}s; files younger than "
                          "the store were left alone", root=self.root, wait=self._recover_wait)
        for path, reason in report.corrupt:
            self.log.error("Corrupt message {path}: {reason}", path=path, reason=reason)
        for path in report.unknown:
            self.log.warn("Unknown file {path} in the spool left alone", path=path)
        if self._claims:
            # found on disk first (oldest id first), then anything indexed meanwhile
            new = OrderedDict((q, None) for q in sorted(report.incoming) if q not in self._retry)
            new.update(self._new)
            self._new = new
            self._retry = {**report.deferred, **self._retry}
            for q in self._new:
                self._retry.pop(q, None)
            self._heap = [(t, q) for q, t in self._retry.items()]
            heapq.heapify(self._heap)
        await self.syncer.sync(self._dirs.values())
        self.last_recovery = {
            "returned": report.returned,
            "incoming": len(report.incoming),
            "deferred": len(report.deferred),
            "held": report.held,
            "corrupt": len(report.corrupt),
            "orphan_content": report.orphans,
            "temp_files": report.temps,
        }
        self.log.info(
            "Spool {root} recovered: {incoming} new, {deferred} deferred, {held} held, "
            "{returned} returned from active, {corrupt} corrupt, {orphan_content} orphan content "
            "and {temp_files} temp files removed",
            root=self.root,
            **self.last_recovery,
        )
        return report.returned

    def _recover_files(self) -> _Recovery:
        report = _Recovery(by_reference=self._exclusive)
        if self._exclusive:
            # no writer of an earlier run is left and this process takes no session before recovery:
            # whatever no envelope references is an orphan, however young (a restart within a second)
            cutoff = time.time() - self._tmp_grace if self._tmp_grace else float("inf")
        else:
            # the writer lock was busy: a file younger than this store may still be written by another
            # process. (1 s of slack: file times are coarse.)
            cutoff = min(time.time() - self._tmp_grace, self._created_at - 1.0)
        live: set[str] = set()
        for state in ("hold", "deferred", "incoming", "active"):
            for name in sorted(os.listdir(self._dirs[state])):
                queue_id = name[:-5]
                path = os.path.join(self._dirs[state], name)
                if not name.endswith(".json") or not _QUEUE_ID.match(queue_id):
                    report.unknown.append(path)
                    continue
                if queue_id in live:  # cannot happen with this store's renames; keep the first
                    dest = os.path.join(self._dirs["corrupt"], f"{queue_id}.{state}.json")
                    os.rename(path, dest)
                    report.corrupt.append((path, f"duplicate envelope; moved to {dest}"))
                    continue
                try:
                    envelope, next_attempt = self._read_envelope(path, queue_id)
                    if not os.path.exists(self._content_path(queue_id)):
                        raise ValueError("content file is missing")
                except (OSError, ValueError) as e:
                    dest = self._to_corrupt(state, queue_id)
                    report.corrupt.append((path, f"{e}; moved to {dest}"))
                    continue
                live.add(queue_id)
                if state == "active":
                    if self._count_crashes:
                        envelope.crashes += 1
                        self._move_rewritten(queue_id, _encode(envelope, None), "active", "incoming")
                    else:
                        os.rename(path, self._env_path("incoming", queue_id))
                    report.returned += 1
                    report.incoming.append(queue_id)
                elif state == "incoming":
                    report.incoming.append(queue_id)
                elif state == "deferred":
                    report.deferred[queue_id] = next_attempt if next_attempt is not None else 0.0
                else:
                    report.held += 1

        def old(path: str) -> bool:
            try:
                return os.lstat(path).st_mtime <= cutoff
            except FileNotFoundError:
                return False

        for name in os.listdir(self._dirs["msg"]):
            path = os.path.join(self._dirs["msg"], name)
            if name not in live and old(path) and _unlink_quiet(path):
                report.orphans += 1
        for name in os.listdir(self._dirs["tmp"]):
            path = os.path.join(self._dirs["tmp"], name)
            if old(path) and _unlink_quiet(path):
                report.temps += 1
        return report
