"""Receive rate limits counted across nodes through PostgreSQL (exmta.receive.sharedrates): a sender gets
the limit once for the cluster, not once per process; the database is away -> local counting goes on."""
from __future__ import annotations

from pathlib import Path

from twisted.internet import task

from exmta.queue.postgres import PostgresStore
from exmta.receive.policy import DefaultReceivePolicy
from exmta.receive.sharedrates import RateExchange
from support.sync import SyncPool, SyncReactor, result as fired

START = 1_796_601_600.0 + 10  # ten seconds into a minute


def node(dsn: str, tmp_path: Path, name: str, clock: task.Clock) -> tuple[PostgresStore, RateExchange]:
    store = PostgresStore(dsn, name, str(tmp_path / name), SyncReactor(), clock=clock, pool_size=2,
                          threadpool=SyncPool())
    store.open()
    return store, RateExchange(store, clock)


def test_two_nodes_share_one_limit(pg_dsn: str, tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(START)
    store_a, a = node(pg_dsn, tmp_path, "mx1", clock)
    store_b, b = node(pg_dsn, tmp_path, "mx2", clock)
    try:
        on_a, on_b = a.counter("inbound/messages_per_ip", 5), b.counter("inbound/messages_per_ip", 5)
        for _ in range(3):
            assert on_a.allows("192.0.2.7")
            on_a.add("192.0.2.7")
        assert on_b.allows("192.0.2.7", 5)      # before an exchange, mx2 knows only its own counts
        fired(a.exchange())
        fired(b.exchange())
        assert on_b.current("192.0.2.7") == 3.0
        on_b.add("192.0.2.7", 2)
        assert not on_b.allows("192.0.2.7")     # 3 on mx1 + 2 on mx2 = the limit of 5
        fired(b.exchange())
        fired(a.exchange())
        assert not on_a.allows("192.0.2.7")
        assert on_a.allows("198.51.100.1")       # another sender is unaffected
        # a minute later the counts slide out of the window
        clock.advance(120)
        fired(a.exchange())
        assert on_a.allows("192.0.2.7", 5)
    finally:
        store_a.close()
        store_b.close()


def test_the_policy_counts_through_the_exchange(pg_dsn: str, tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(START)
    store, rates = node(pg_dsn, tmp_path, "mx1", clock)
    try:
        policy = DefaultReceivePolicy(lambda d: None, [], clock=clock, messages_per_minute_per_ip=2,
                                      connector="inbound", rates=rates)
        policy.messages_per_ip.add("192.0.2.9")
        fired(rates.exchange())
        with store._pool.connection() as conn:
            rows = conn.execute("SELECT name, key, count FROM exmta_rate").fetchall()
        assert rows == [("inbound/messages_per_ip", "192.0.2.9", 1)]
    finally:
        store.close()


def test_a_database_away_keeps_counting_locally(pg_cluster, tmp_path: Path) -> None:
    from exmta.queue.postgres import migrate_dsn

    dsn = pg_cluster.create_database()
    migrate_dsn(dsn)
    clock = task.Clock()
    clock.advance(START)
    store, rates = node(dsn, tmp_path, "mx1", clock)
    try:
        c = rates.counter("inbound/messages_per_ip", 2)
        c.add("192.0.2.1")
        pg_cluster.stop()
        try:
            fired(rates.exchange())              # fails: a warning, the count is kept for the next exchange
        finally:
            pg_cluster.start()
        c.add("192.0.2.1")
        assert not c.allows("192.0.2.1")         # the local counts still apply
        fired(rates.exchange())
        with store._pool.connection() as conn:
            assert conn.execute("SELECT sum(count) FROM exmta_rate").fetchone()[0] == 2
    finally:
        store.close()
