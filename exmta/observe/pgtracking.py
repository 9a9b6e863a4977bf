"""Message tracking events of every node in the cluster's PostgreSQL database, searchable from any node.

With ``[queue] store = "postgres"`` each node still writes its own
tracking log file (the record of truth that survives a database outage),
and also hands every event to :class:`ClusterTracking`, which keeps them in
memory for at most ``flush_interval`` and inserts them in one batch on the
queue store's thread pool. ``exmta track`` then searches the
``exmta_tracking`` table, so it finds a message on whichever node it went
through. The table is partitioned by UTC day; partitions for today and
tomorrow are made ahead and those older than ``[logs] keep_age`` are
dropped whole (no row-by-row deletes, nothing for vacuum to chase).

A database that is away costs no mail: the batch waits (bounded by
``max_buffered``; past it the oldest events are dropped from the database
copy only, counted and logged once per outage).
"""
from __future__ import annotations

import json
import time
from collections import deque
from typing import Any, Iterator

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from exmta.interfaces import IMessageTracker
from exmta.model import TrackingEvent
from exmta.observe.tracking import record_of

__all__ = ["ClusterTracking", "day_partitions", "search_cluster", "wrap_tracker"]

DAY = 86400.0


def day_partitions(now: float, days_ahead: int = 1) -> list[tuple[str, float, float]]:
    """(name, start, end) of the daily partitions for today and ``days_ahead`` more (UTC)."""
    start = now - now % DAY
    out = []
    for i in range(days_ahead + 1):
        s = start + i * DAY
        out.append((time.strftime("exmta_tracking_%Y%m%d", time.gmtime(s)), s, s + DAY))
    return out


@implementer(IMessageTracker)
class ClusterTracking:
    """IMessageTracker that batches events into ``exmta_tracking``; ``service`` flushes and keeps partitions."""

    log = Logger(namespace="exmta.observe.pgtracking")

    def __init__(self, store: Any, clock: Any, *, keep_age: float = 30 * DAY, flush_interval: float = 1.0,
                 max_buffered: int = 100_000) -> None:
        self.store = store            # an exmta.queue.postgres.PostgresStore: its connections and threads
        self.clock = clock
        self.keep_age = keep_age
        self.max_buffered = max_buffered
        self._buffer: deque[tuple[float, str, str | None, str | None, str]] = deque()
        self._flushing = False
        self.dropped = 0
        self.written = 0
        self.service = _FlushingService(self)
        for name, interval, call in (("flush", flush_interval, self.flush), ("partitions", 3600.0, self.maintain)):
            timer = TimerService(interval, call)
            timer.clock = clock
            timer.setName(name)
            timer.setServiceParent(self.service)

    def track(self, event: TrackingEvent) -> None:
        """Buffer one event (never blocks, never raises)."""
        try:
            rec = record_of(event)
            text = json.dumps(rec, ensure_ascii=False, separators=(",", ":"), default=str)
        except Exception:
            self.log.failure("cannot encode a tracking event for the cluster")
            return
        if len(self._buffer) >= self.max_buffered:
            self._buffer.popleft()
            if not self.dropped:
                self.log.warn("the cluster's tracking table is behind by {count} events; dropping the oldest "
                              "from it (every node's tracking log file still has them)", count=self.max_buffered)
            self.dropped += 1
        self._buffer.append((float(rec.get("timestamp") or self.clock.seconds()), str(rec.get("event_id", "")),
                             rec.get("queue_id") or None, rec.get("message_id") or None, text))

    def flush(self) -> Deferred[int]:
        """Insert what is buffered in one transaction; on failure it stays buffered for the next flush."""
        if self._flushing or not self._buffer:
            return succeed(0)
        batch = list(self._buffer)
        self._flushing = True
        node = self.store.node

        def work(cur: Any) -> int:
            cur.executemany("INSERT INTO exmta_tracking (at, node, event_id, queue_id, message_id, record)"
                            " VALUES (%s, %s, %s, %s, %s, %s::jsonb)",
                            [(at, node, event, qid, mid, text) for at, event, qid, mid, text in batch])
            return len(batch)

        def done(count: int) -> int:
            self._flushing = False
            for _ in range(count):
                self._buffer.popleft()
            self.written += count
            if self.dropped:
                self.log.info("the cluster's tracking table caught up ({dropped} events were dropped from it)",
                              dropped=self.dropped)
                self.dropped = 0
            return count

        def failed(f: Any) -> int:
            self._flushing = False
            self.log.warn("tracking events not yet stored in PostgreSQL ({count} waiting): {error}",
                          count=len(self._buffer), error=f.getErrorMessage())
            return 0
        return self.store._in_pool(self.store._tx, work).addCallbacks(done, failed)

    def maintain(self) -> Deferred[Any]:
        """Make today's and tomorrow's partitions; drop the partitions older than keep_age."""
        now = self.clock.seconds()
        keep_age = self.keep_age

        def work(cur: Any) -> list[str]:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('exmta_tracking partitions'))")
            for name, start, end in day_partitions(now):
                cur.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
                if not cur.fetchone()[0]:
                    # rows already in the default partition for that day move into the new one
                    cur.execute("CREATE TABLE " + name + " (LIKE exmta_tracking INCLUDING DEFAULTS)")
                    cur.execute("WITH moved AS (DELETE FROM exmta_tracking_default WHERE at >= %s AND at < %s"
                                " RETURNING *) INSERT INTO " + name + " SELECT * FROM moved", (start, end))
                    cur.execute("ALTER TABLE exmta_tracking ATTACH PARTITION " + name
                                + f" FOR VALUES FROM ({start!r}) TO ({end!r})")
            dropped = []
            if keep_age > 0:
                cutoff = now - keep_age
                cur.execute("SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
                            " JOIN pg_class c ON c.oid = i.inhrelid"
                            " WHERE i.inhparent = 'exmta_tracking'::regclass AND c.relname <> 'exmta_tracking_default'")
                for name, bound in cur.fetchall():
                    end = float(bound.rsplit("TO (", 1)[1].rstrip(")").strip("'"))
                    if end <= cutoff:
                        cur.execute("DROP TABLE " + name)
                        dropped.append(name)
                cur.execute("DELETE FROM exmta_tracking_default WHERE at < %s", (cutoff,))
            return dropped

        def failed(f: Any) -> None:
            self.log.warn("tracking partitions not maintained: {error}", error=f.getErrorMessage())
        return self.store._in_pool(self.store._tx, work).addErrback(failed)


class _FlushingService(MultiService):
    """The flush and partition timers; one last flush at stop (before the store's connections close)."""

    def __init__(self, tracking: ClusterTracking) -> None:
        super().__init__()
        self.tracking = tracking

    def startService(self) -> None:
        super().startService()
        self.tracking.maintain()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self.tracking.flush()


def wrap_tracker(config: Any, store: Any, tracker: Any, clock: Any) -> tuple[Any, ClusterTracking | None]:
    """With the PostgreSQL queue: the tracker plus the cluster's table; else the tracker as it is."""
    if config.queue.store != "postgres":
        return tracker, None
    from exmta.observe.tracking import MultiTracker

    cluster = ClusterTracking(store, clock, keep_age=config.logs.keep_age)
    return MultiTracker(tracker, cluster), cluster


def search_cluster(dsn: str, queue_ids: set[str] | None = None, message_id: str | None = None,
                   start: float | None = None, end: float | None = None,
                   connect_timeout: float = 10.0, max_rows: int = 1_000_000) -> Iterator[dict[str, Any]]:
    """Records from the cluster's tracking table in time order, narrowed by the indexed columns
    (callers apply the full filter); read with a server-side cursor, so memory stays bounded."""
    import psycopg

    where, args = [], []
    if queue_ids:
        where.append("(queue_id = ANY(%s) OR record->>'dsn_queue_id' = ANY(%s))")
        args += [sorted(queue_ids), sorted(queue_ids)]
    if message_id is not None:
        where.append("message_id = %s")
        args.append(message_id)
    if start is not None:
        where.append("at >= %s")
        args.append(start)
    if end is not None:
        where.append("at <= %s")
        args.append(end)
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    with psycopg.connect(dsn, connect_timeout=max(1, int(connect_timeout))) as conn:
        with conn.cursor(name="exmta_track") as cur:
            cur.execute("SELECT record, node FROM exmta_tracking" + clause + " ORDER BY at LIMIT %s",
                        [*args, max_rows])
            for record, node in cur:
                if isinstance(record, dict):
                    record.setdefault("node", node)
                    yield record
