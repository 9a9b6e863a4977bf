"""Metrics from receive worker processes: their events relayed to the main process.

A receive worker (exmta.receive.worker) writes its tracking events to the
shared tracking log itself; for the metrics it also writes each event, and
each session event (connection, timeout, TLS, failed AUTH, filter verdict),
as one JSON line on its stdout, beside the queue-id lines it already sends.
The main process (exmta.receive.workers) hands every line that starts with
``{`` to :func:`dispatch`, which counts it in the main process's metrics
and throughput (and never writes it to the tracking log again).

Lines are small (recipients are sent as a count and the first address) so
each is one atomic pipe write.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Iterable

from twisted.logger import Logger
from zope.interface import implementer

from exmta.interfaces import IMessageTracker, ISessionObserver
from exmta.model import TrackingEvent, TrackingEventId
from exmta.seams import require

__all__ = ["WorkerRelay", "WorkerTracker", "decode", "dispatch"]

log = Logger()

_FIELDS = ("message_id", "size", "connector", "source", "remote_host", "reply", "tls")
_SESSION_EVENTS = ("session_opened", "session_timed_out", "tls_started", "auth_failed", "connection_screened")
_MAX_LINE = 3500  # below PIPE_BUF (4096): one write, never interleaved


@implementer(ISessionObserver)
class WorkerRelay:
    """In a worker: writes events as JSON lines with ``write`` (os.write on fd 1)."""

    def __init__(self, write: Callable[[bytes], Any]) -> None:
        self.write = write

    def _send(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, default=str).encode("ascii")
        if len(line) > _MAX_LINE:
            obj.pop("reply", None)
            obj.pop("message_id", None)
            line = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, default=str).encode("ascii")[:_MAX_LINE]
            if not line.endswith(b"}"):
                return  # still too long: dropped rather than corrupting the pipe protocol
        try:
            self.write(line + b"\n")
        except OSError:
            log.failure("relaying an event to the main process failed")

    def track(self, event: TrackingEvent) -> None:
        obj: dict[str, Any] = {"t": "track", "id": event.event_id.value, "q": event.queue_id,
                               "ts": event.timestamp, "n": len(event.recipients)}
        for key in _FIELDS:
            value = getattr(event, key)
            if value is not None:
                obj[key] = value
        action = (event.details or {}).get("action")
        if action is not None:
            obj["action"] = str(action)[:40]
        self._send(obj)

    def _session(self, method: str, connector: str, *args: Any) -> None:
        self._send({"t": "session", "m": method, "c": connector, "a": [str(a)[:64] for a in args]})

    def session_opened(self, connector: str) -> None:
        self._session("session_opened", connector)

    def session_timed_out(self, connector: str) -> None:
        self._session("session_timed_out", connector)

    def tls_started(self, connector: str, version: str | None) -> None:
        self._session("tls_started", connector, version or "")

    def auth_failed(self, connector: str) -> None:
        self._session("auth_failed", connector)

    def connection_screened(self, connector: str, outcome: str) -> None:
        self._session("connection_screened", connector, outcome)

    def filter_verdict(self, filter_name: str, phase: str, action: str) -> None:
        self._send({"t": "verdict", "f": filter_name[:64], "p": phase[:16], "a": action[:16]})

    def wrap(self, tracking_log: Any) -> WorkerTracker:
        return WorkerTracker(tracking_log, self)

    def observe(self, factories: Iterable[Any]) -> None:
        """Report sessions and filter verdicts of these receive factories."""
        for factory in factories:
            factory.session_observer = require(ISessionObserver, self, "the session observer (worker)")
            chain = getattr(factory, "filters", None)
            if chain is not None:
                chain.verdict_observer = self.filter_verdict


@implementer(IMessageTracker)
class WorkerTracker:
    """The worker's tracker: the tracking log, then the relay; ``close`` closes the log."""

    def __init__(self, tracking_log: Any, relay: WorkerRelay) -> None:
        self.tracking_log = tracking_log
        self.relay = relay

    def track(self, event: TrackingEvent) -> None:
        self.tracking_log.track(event)
        try:
            self.relay.track(event)
        except Exception:
            log.failure("relaying a tracking event failed")

    def close(self) -> None:
        self.tracking_log.close()

    def reopen(self) -> None:
        reopen = getattr(self.tracking_log, "reopen", None)
        if reopen is not None:
            reopen()


def decode(obj: dict[str, Any]) -> TrackingEvent:
    """The TrackingEvent of a relayed ``track`` line (recipients as placeholders, for counting)."""
    n = max(0, min(int(obj.get("n", 0)), 100_000))
    details = {"action": obj["action"]} if "action" in obj else {}
    return TrackingEvent(
        TrackingEventId(obj["id"]), str(obj.get("q", "")), float(obj["ts"]),
        recipients=("",) * n, details=details,
        **{k: obj[k] for k in _FIELDS if k in obj},
    )


def dispatch(line: bytes, metrics: Any, trackers: Iterable[Any]) -> None:
    """In the main process: count one line from a worker; a malformed line is logged and ignored."""
    try:
        obj = json.loads(line)
        kind = obj.get("t")
        if kind == "track":
            event = decode(obj)
            for tracker in trackers:
                tracker.track(event)
        elif kind == "session" and metrics is not None:
            method = obj["m"]
            if method not in _SESSION_EVENTS:
                raise ValueError(f"unknown session event {method!r}")
            getattr(metrics, method)(str(obj["c"]), *[str(a) for a in obj.get("a", ())])
        elif kind == "verdict" and metrics is not None:
            metrics.filter_verdict(str(obj["f"]), str(obj["p"]), str(obj["a"]))
        elif kind not in ("session", "verdict"):
            raise ValueError(f"unknown line kind {kind!r}")
    except Exception as e:
        log.warn("ignored a malformed event line from a receive worker: {error}", error=str(e)[:200])
