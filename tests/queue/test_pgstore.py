"""The PostgreSQL queue store against a real PostgreSQL (tests/support/postgres.py): the IQueueStore and
IQueueAdmin contracts, leases with fencing tokens, takeover of a dead node's mail, checksums, recovery,
and a database that goes away and comes back."""
from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from twisted.internet import task
from zope.interface.verify import verifyObject

from exmta.interfaces import IMessageWriter, IQueueAdmin, IQueueStore
from exmta.model import Envelope, Recipient
from exmta.queue.postgres import PostgresStore, StoreUnavailable, _map_error
from exmta.queue.spool import SpoolStore
from exmta.testing.memstore import MemoryStore
from support.postgres import PostgresCluster
from support.sync import SyncPool, SyncReactor, failure, result as fired

START = 1_700_000_000.0
CONTENT = b"From: a@sender.example\r\nSubject: pg\r\n\r\nbody\r\n"


def make_store(dsn: str, tmp_path: Path, node: str = "n1", lease: float = 60.0,
               clock: task.Clock | None = None) -> PostgresStore:
    if clock is None:
        clock = task.Clock()
        clock.advance(START)
    store = PostgresStore(dsn, node, str(tmp_path / f"pg-{node}"), SyncReactor(), clock=clock, lease=lease,
                          pool_size=2, connect_timeout=5.0, threadpool=SyncPool())
    store.open()
    return store


@pytest.fixture
def store(pg_dsn: str, tmp_path: Path) -> Any:
    s = make_store(pg_dsn, tmp_path)
    yield s
    s.close()


def envelope(*rcpts: str) -> Envelope:
    return Envelope("a@sender.example", [Recipient(r) for r in rcpts or ("b@remote.example",)],
                    received_at=START)


def test_every_store_provides_the_store_and_admin_interfaces(store: PostgresStore, tmp_path: Path) -> None:
    clock = task.Clock()
    spool = SpoolStore(str(tmp_path / "spool"), SyncReactor(), SyncPool(), clock)
    for s in (store, spool, MemoryStore(clock)):
        assert verifyObject(IQueueStore, s)
        assert verifyObject(IQueueAdmin, s)
    assert verifyObject(IMessageWriter, store.open_writer())


def test_commit_claim_defer_and_deliver(store: PostgresStore) -> None:
    seen: list[str] = []
    store.add_listener(seen.append)
    writer = store.open_writer()
    writer.write(CONTENT[:10])
    writer.write(CONTENT[10:])
    qid = fired(store.commit(writer, envelope()))
    assert seen == [qid] and qid == writer.queue_id
    assert [e.queue_id for e in fired(store.list_messages("incoming"))] == [qid]
    assert fired(store.next_due()) == 0.0
    [entry] = fired(store.claim(START, 10))
    assert entry.queue_id == qid and entry.envelope.size == len(CONTENT)
    with store.open_content(qid) as f:
        assert f.read() == CONTENT
    assert fired(store.claim(START, 10)) == []  # leased: nobody else gets it
    entry.envelope.recipients[0].attempts = 1
    fired(store.update(qid, entry.envelope, START + 300))
    assert fired(store.next_due()) == START + 300
    assert fired(store.claim(START + 299, 10)) == []
    [again] = fired(store.claim(START + 300, 10))
    assert again.envelope.recipients[0].attempts == 1
    fired(store.update(qid, again.envelope, None))
    for queue in ("incoming", "active", "deferred", "hold"):
        assert fired(store.list_messages(queue)) == []
    assert fired(store.next_due()) is None


def test_large_content_in_chunks_and_header_replacement(store: PostgresStore) -> None:
    body = b"".join(b"line %07d of a large message\r\n" % i for i in range(100_000))  # ~3.3 MB, 4 chunks
    writer = store.open_writer()
    writer.write(b"Subject: old\r\n\r\n" + body)
    writer.replace_headers(len(b"Subject: old\r\n"), b"Subject: new and longer\r\n")
    with writer.open_read() as f:
        assert f.read(25) == b"Subject: new and longer\r\n"
    qid = fired(store.commit(writer, envelope()))
    [entry] = fired(store.claim(START, 1))
    with store.open_content(qid) as f:
        assert f.read() == b"Subject: new and longer\r\n\r\n" + body
    assert entry.envelope.size == len(b"Subject: new and longer\r\n\r\n" + body)


def test_abort_leaves_nothing(store: PostgresStore, tmp_path: Path) -> None:
    writer = store.open_writer()
    writer.write(CONTENT)
    writer.abort()
    writer.abort()
    assert list((tmp_path / "pg-n1" / "tmp").iterdir()) == []
    assert fired(store.list_messages("incoming")) == []


def test_quarantined_commit_goes_to_hold_and_release_makes_it_due(store: PostgresStore) -> None:
    env = envelope()
    env.held_reason = "quarantined by a filter"
    qid = fired(store.submit(CONTENT, env))
    assert fired(store.claim(START, 10)) == []
    assert fired(store.read(qid))[0] == "hold"
    fired(store.release_now(qid, START + 5))
    state, env2 = fired(store.read(qid))
    assert state == "incoming" and env2.held_reason is None and env2.recipients[0].next_attempt == START + 5


def test_admin_read_remove_reschedule(store: PostgresStore) -> None:
    qid = fired(store.submit(CONTENT, envelope()))
    assert isinstance(failure(store.read("nosuch")).value, KeyError)
    [entry] = fired(store.claim(START, 1))
    assert isinstance(failure(store.remove(qid)).value, ValueError)  # being delivered
    assert fired(store.reschedule(qid, START)) is False             # active, not deferred
    entry.envelope.recipients[0].next_attempt = START + 900
    fired(store.update(qid, entry.envelope, START + 900))
    assert fired(store.reschedule(qid, START + 1)) is True
    assert fired(store.next_due()) == START + 1
    assert fired(store.read(qid))[1].recipients[0].next_attempt == START + 1
    env = fired(store.remove(qid))
    assert env.queue_id == qid
    assert isinstance(failure(store.remove(qid)).value, KeyError)


def test_operator_hold_during_delivery_keeps_it_held(store: PostgresStore) -> None:
    qid = fired(store.submit(CONTENT, envelope()))
    [entry] = fired(store.claim(START, 1))
    fired(store.hold(qid, None, "suspended by an operator"))
    fired(store.update(qid, entry.envelope, START + 300))
    state, env = fired(store.read(qid))
    assert state == "hold" and env.held_reason
    assert store.lost_leases == 0


def test_corrupt_content_is_held_not_delivered(store: PostgresStore, pg_dsn: str) -> None:
    qid = fired(store.submit(CONTENT, envelope()))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE exmta_content SET data = %s WHERE queue_id = %s", (b"tampered", qid))
    assert fired(store.claim(START, 10)) == []
    state, env = fired(store.read(qid))
    assert state == "hold" and "checksum" in env.held_reason


def wait_lease_expired(dsn: str, qid: str, timeout: float = 30.0) -> None:
    """Poll the database's own clock until the message's lease has run out (bounded)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT lease_expires < now() FROM exmta_message WHERE queue_id = %s",
                               (qid,)).fetchone()
            if row and row[0]:
                return
            time.sleep(0.05)
    raise AssertionError(f"lease of {qid} did not expire within {timeout}s")


def test_a_dead_nodes_mail_is_taken_over_and_its_late_result_is_fenced_off(pg_dsn: str, tmp_path: Path) -> None:
    a = make_store(pg_dsn, tmp_path, "node-a", lease=0.5)
    b = make_store(pg_dsn, tmp_path, "node-b", lease=60.0)
    try:
        qid = fired(a.submit(CONTENT, envelope()))
        [entry_a] = fired(a.claim(START, 10))
        assert fired(b.claim(START, 10)) == []      # a holds the lease
        wait_lease_expired(pg_dsn, qid)             # a is "dead": it never renews
        [entry_b] = fired(b.claim(START, 10))
        assert entry_b.envelope.crashes == 1 and b.takeovers == 1
        with b.open_content(qid) as f:
            assert f.read() == CONTENT
        # a comes back and reports a result: refused by the fencing token, counted, nothing changed
        fired(a.update(qid, entry_a.envelope, START + 300))
        assert a.lost_leases == 1
        assert fired(b.read(qid))[0] == "active"
        fired(b.update(qid, entry_b.envelope, None))   # the new owner's result is recorded
        assert isinstance(failure(b.read(qid)).value, KeyError)
        # a node never claims again a message it still holds, even after its lease ran out
        qid3 = fired(a.submit(CONTENT, envelope()))
        [mine] = fired(a.claim(START, 10))
        assert mine.queue_id == qid3
        wait_lease_expired(pg_dsn, qid3)
        assert fired(a.claim(START, 10)) == []
        assert fired(a.renew_leases()) == 1         # same token: the lease is extended again
        fired(a.update(qid3, mine.envelope, None))
        assert a.lost_leases == 1
        # renewing keeps a lease alive
        qid2 = fired(b.submit(CONTENT, envelope()))
        fired(b.claim(START, 10))
        assert fired(b.renew_leases()) == 1
    finally:
        a.close()
        b.close()


def test_recover_returns_this_nodes_own_leases_only(pg_dsn: str, tmp_path: Path) -> None:
    a = make_store(pg_dsn, tmp_path, "node-a")
    b = make_store(pg_dsn, tmp_path, "node-b")
    try:
        q1 = fired(a.submit(CONTENT, envelope()))
        fired(a.claim(START, 10))
        q2 = fired(b.submit(CONTENT, envelope()))
        fired(b.claim(START, 10))
        a2 = make_store(pg_dsn, tmp_path, "node-a")  # node-a restarted
        assert fired(a2.recover()) == 1
        assert fired(a2.read(q1))[0] == "incoming" and fired(a2.read(q1))[1].crashes == 1
        assert fired(a2.read(q2))[0] == "active"
        a2.close()
    finally:
        a.close()
        b.close()


def test_heartbeat_and_cluster_view(pg_dsn: str, tmp_path: Path) -> None:
    a = make_store(pg_dsn, tmp_path, "node-a")
    b = make_store(pg_dsn, tmp_path, "node-b")
    try:
        fired(a.submit(CONTENT, envelope()))
        fired(a.claim(START, 10))
        assert fired(a.heartbeat()) is False
        fired(b.heartbeat())
        assert fired(a.set_draining("node-b", True)) is True
        assert fired(a.set_draining("nosuch", True)) is False
        assert fired(b.heartbeat()) is True
        assert b.draining and fired(b.submit(CONTENT, envelope()))
        assert fired(b.claim(START, 10)) == []      # a draining node claims nothing; the others deliver
        nodes = {n.name: n for n in fired(a.nodes())}
        assert set(nodes) == {"node-a", "node-b"}
        assert nodes["node-a"].claimed == 1 and nodes["node-a"].received == 1
        assert nodes["node-b"].draining and nodes["node-b"].claimed == 0
        assert fired(a.counts())["active"] == 1
        assert fired(a.release_leases()) == 1
        assert fired(a.counts()) == {"incoming": 2, "active": 0, "deferred": 0, "hold": 0}
    finally:
        a.close()
        b.close()


def test_database_away_is_a_temporary_error_and_the_pool_reconnects(tmp_path: Path) -> None:
    with PostgresCluster() as pg:
        from exmta.queue.postgres import migrate_dsn

        dsn = pg.create_database()
        migrate_dsn(dsn)
        store = make_store(dsn, tmp_path)
        try:
            fired(store.submit(CONTENT, envelope()))
            pg.stop()
            f = failure(store.submit(CONTENT, envelope()))
            assert isinstance(f.value, StoreUnavailable)
            assert list((tmp_path / "pg-n1" / "tmp").iterdir()) == []  # nothing left behind
            pg.start()
            deadline = time.monotonic() + 30
            while True:  # the pool notices the new server on its own
                d = store.submit(CONTENT, envelope())
                out: list[Any] = []
                d.addBoth(out.append)
                if isinstance(out[0], str) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert isinstance(out[0], str), out[0]
            assert len(fired(store.list_messages("incoming"))) == 2
        finally:
            store.close()


def test_disk_full_maps_to_insufficient_storage() -> None:
    class DiskFull(Exception):
        sqlstate = "53100"

    mapped = _map_error(DiskFull("could not extend file"))
    assert isinstance(mapped, OSError) and mapped.errno == errno.ENOSPC
    assert isinstance(_map_error(psycopg.OperationalError("connection refused")), StoreUnavailable)
    assert isinstance(_map_error(KeyError("x")), KeyError)
