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
import time
from typing import Any, Mapping

from twisted.logger import Logger
from zope.interface import implementer

from exmta.interfaces import IMessageTracker
from exmta.model import TrackingEvent, TrackingEventId
from exmta.observe.rotation import RotatingLog

__all__ = ["MultiTracker", "TrackingLog", "event_details", "record_of"]

#: events that report how long the message has been in the queue (``latency``, seconds since received)
LATENCY_EVENTS = frozenset({
    TrackingEventId.SEND, TrackingEventId.DELIVER, TrackingEventId.FAIL, TrackingEventId.DEFER,
    TrackingEventId.EXPIRE, TrackingEventId.POISONMESSAGE, TrackingEventId.DROP,
})

#: events whose reply gets ``explanation`` (exmta.diagnose.explain: what it means, what to do)
EXPLAINED_EVENTS = frozenset({TrackingEventId.DEFER, TrackingEventId.FAIL})


def event_details(event_id: TrackingEventId, received_at: float, now: float, result: Any,
                  details: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``details`` of a queue event, with ``latency`` added for delivery outcomes and
    ``explanation`` for DEFER and FAIL replies that `exmta explain` knows."""
    out = dict(details or {})
    if received_at and event_id in LATENCY_EVENTS:
        out.setdefault("latency", round(max(0.0, now - received_at), 3))
    if event_id in EXPLAINED_EVENTS and result is not None and getattr(result, "reply", None) is not None:
        from exmta.diagnose.explain import short

        try:
            explanation = short(str(result.reply))
        except Exception:  # a catalogue problem must never cost a tracking line
            explanation = None
        if explanation:
            out.setdefault("explanation", explanation)
    return out


def record_of(event: TrackingEvent) -> dict[str, Any]:
    """The JSON object written for an event: ``tls`` is also split into ``tls_version`` and ``tls_cipher``."""
    d = event.to_json()
    tls = d.get("tls")
    if isinstance(tls, str) and tls and "tls_version" not in d:
        version, _, cipher = tls.partition(" ")
        d["tls_version"] = version
        if cipher:
            d["tls_cipher"] = cipher
    return d


class _WallClock:
    """``seconds()`` from the system clock, for callers that inject no clock."""

    @staticmethod
    def seconds() -> float:
        return time.time()


@implementer(IMessageTracker)
class TrackingLog:
    """Appends each event as one JSON line to ``path`` (created with its directory).

    Rotation and retention are :class:`~exmta.observe.rotation.RotatingLog`'s
    (``rotation`` holds its keyword arguments: max_size, max_age, keep_age,
    keep_size); without them the file grows until :meth:`reopen` after an
    external rename. track() never raises: a write error is logged once per
    failure streak and the file is reopened at the next event.
    """

    log = Logger()

    def __init__(self, path: str, clock: Any = None, **rotation: Any) -> None:
        self.path = path
        if not rotation:
            rotation = {"max_size": 0, "max_age": 0, "keep_age": 0, "keep_size": 0}
        self.file = RotatingLog(path, clock if clock is not None else _WallClock(), report_errors=False,
                                **rotation)

    @property
    def written(self) -> int:
        return self.file.written

    def track(self, event: TrackingEvent) -> None:
        try:
            line = json.dumps(record_of(event), ensure_ascii=False, separators=(",", ":"), default=str)
        except Exception:
            self.log.failure("Cannot encode a tracking event", queue_id=getattr(event, "queue_id", None))
            return
        was_failing = self.file.failing
        if not self.file.write_line(line) and not was_failing:
            self.log.failure("Cannot write the tracking log {path}", self.file.last_failure, path=self.path,
                             queue_id=getattr(event, "queue_id", None))

    def rotate(self) -> str | None:
        """Rotate now (operator request); returns the rotated file's name."""
        return self.file.rotate()

    def reopen(self) -> None:
        """Close the file; the next event opens ``path`` again (log rotation)."""
        self.file.reopen()

    def close(self) -> None:
        self.file.close()


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
