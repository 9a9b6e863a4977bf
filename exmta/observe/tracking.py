"""The message tracking log: one JSON object per line per :class:`~exmta.model.TrackingEvent`.

Like Exchange's message tracking log, it answers "what happened to this
message" (RECEIVE, SEND, DELIVER, DEFER, FAIL, DSN, ...). Lines are appended
with line buffering: each line is handed to the kernel as it is written (no
fsync per line; a tracking line is not worth a disk flush, and the queue
itself is durable). :meth:`TrackingLog.reopen` closes the file so that the
next event opens it again, for rotation (rename the file, then reopen).
"""
from __future__ import annotations

import json
import os
from typing import IO, Any

from twisted.logger import Logger
from zope.interface import implementer

from exmta.interfaces import IMessageTracker
from exmta.model import TrackingEvent

__all__ = ["MultiTracker", "TrackingLog"]


@implementer(IMessageTracker)
class TrackingLog:
    """Appends each event as one JSON line to ``path`` (created with its directory).

    track() never raises: a write error is logged once per failure streak and
    the file is reopened at the next event.
    """

    log = Logger()

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._failing = False
        self.written = 0

    def _open(self) -> IO[str]:
        if self._file is None:
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8", buffering=1, newline="\n")
        return self._file

    def track(self, event: TrackingEvent) -> None:
        try:
            line = json.dumps(event.to_json(), ensure_ascii=False, separators=(",", ":"), default=str)
            self._open().write(line + "\n")
        except Exception:
            if not self._failing:
                self.log.failure(
                    "Cannot write the tracking log {path}", path=self.path, queue_id=getattr(event, "queue_id", None)
                )
            self._failing = True
            self._close_quietly()
            return
        self._failing = False
        self.written += 1

    def reopen(self) -> None:
        """Close the file; the next event opens ``path`` again (log rotation)."""
        self._close_quietly()

    close = reopen

    def _close_quietly(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass


@implementer(IMessageTracker)
class MultiTracker:
    """Fans each event out to several trackers; one that raises is logged and skipped."""

    log = Logger()

    def __init__(self, *trackers: Any) -> None:
        self.trackers = list(trackers)

    def track(self, event: TrackingEvent) -> None:
        for tracker in self.trackers:
            try:
                tracker.track(event)
            except Exception:
                self.log.failure(
                    "Tracker {tracker!r} failed", tracker=tracker, queue_id=getattr(event, "queue_id", None)
                )
