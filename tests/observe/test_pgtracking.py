"""The cluster's tracking table (exmta.observe.pgtracking) against a real PostgreSQL: batches, daily
partitions made ahead and dropped after keep_age, events kept while the database is away."""
from __future__ import annotations

from pathlib import Path

import psycopg
from twisted.internet import task

from exmta.model import TrackingEvent, TrackingEventId
from exmta.observe.pgtracking import ClusterTracking, day_partitions, search_cluster
from exmta.queue.postgres import PostgresStore
from support.sync import SyncPool, SyncReactor, result as fired

DAY = 86400.0
NOW = 1_796_601_600.0 + 3600  # 2026-12-07 01:00 UTC


def event(qid: str, when: float, kind: TrackingEventId = TrackingEventId.RECEIVE) -> TrackingEvent:
    return TrackingEvent(event_id=kind, timestamp=when, queue_id=qid, sender="a@example.test",
                         recipients=("b@example.test",), message_id=f"<{qid}@example.test>")


def setup(dsn: str, tmp_path: Path, keep_age: float = 30 * DAY) -> tuple[task.Clock, PostgresStore, ClusterTracking]:
    clock = task.Clock()
    clock.advance(NOW)
    store = PostgresStore(dsn, "mx1", str(tmp_path / "pg"), SyncReactor(), clock=clock, pool_size=2,
                          threadpool=SyncPool())
    store.open()
    return clock, store, ClusterTracking(store, clock, keep_age=keep_age)


def partitions(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return sorted(r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'exmta_tracking'::regclass").fetchall())


def test_events_are_batched_searchable_and_partitioned_by_day(pg_dsn: str, tmp_path: Path) -> None:
    clock, store, tracking = setup(pg_dsn, tmp_path)
    try:
        tracking.track(event("A1", NOW - 2 * DAY))   # before any partition existed: lands in the default one
        assert fired(tracking.flush()) == 1
        fired(tracking.maintain())
        assert partitions(pg_dsn) == ["exmta_tracking_20261207", "exmta_tracking_20261208", "exmta_tracking_default"]
        tracking.track(event("B2", NOW))
        tracking.track(event("B2", NOW + 1, TrackingEventId.DELIVER))
        assert fired(tracking.flush()) == 2 and tracking.written == 3
        found = list(search_cluster(pg_dsn, {"B2"}))
        assert [(r["event_id"], r["node"]) for r in found] == [("RECEIVE", "mx1"), ("DELIVER", "mx1")]
        assert [r["queue_id"] for r in search_cluster(pg_dsn, message_id="<A1@example.test>")] == ["A1"]
        assert [r["queue_id"] for r in search_cluster(pg_dsn, start=NOW - 10)] == ["B2", "B2"]
        assert day_partitions(NOW)[0][1] == NOW - 3600
    finally:
        store.close()


def test_old_partitions_are_dropped_whole(pg_dsn: str, tmp_path: Path) -> None:
    clock, store, tracking = setup(pg_dsn, tmp_path, keep_age=2 * DAY)
    try:
        fired(tracking.maintain())
        tracking.track(event("OLD", NOW))
        tracking.track(event("ODD", NOW - 10 * DAY))  # default partition
        fired(tracking.flush())
        clock.advance(3 * DAY)
        fired(tracking.maintain())
        assert "exmta_tracking_20261207" not in partitions(pg_dsn)
        assert "exmta_tracking_20261210" in partitions(pg_dsn)
        assert list(search_cluster(pg_dsn)) == []
    finally:
        store.close()


def test_a_database_away_keeps_the_events_for_the_next_flush(pg_cluster, tmp_path: Path) -> None:
    from exmta.queue.postgres import migrate_dsn

    dsn = pg_cluster.create_database()
    migrate_dsn(dsn)
    clock, store, tracking = setup(dsn, tmp_path)
    try:
        tracking.track(event("C3", NOW))
        pg_cluster.stop()
        try:
            assert fired(tracking.flush()) == 0
        finally:
            pg_cluster.start()
        tracking.track(event("C3", NOW + 1, TrackingEventId.DELIVER))
        assert fired(tracking.flush()) == 2
        assert [r["event_id"] for r in search_cluster(dsn, {"C3"})] == ["RECEIVE", "DELIVER"]
    finally:
        store.close()
