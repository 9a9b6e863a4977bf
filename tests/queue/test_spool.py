"""SpoolStore: durability ordering, group commit, claim/update/hold, recovery, corruption."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger
from zope.interface.verify import verifyObject

from exmta.interfaces import IMessageWriter, IQueueStore
from exmta.model import Envelope, Recipient, RecipientStatus
from exmta.queue.spool import SpoolStore
from support.sync import SyncPool, SyncReactor, failure, result


# ---------------------------------------------------------------- fakes


class ManualPool(SyncPool):
    """Queues jobs; the test runs them one by one to control interleaving."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[tuple[Any, ...]] = []

    def callInThreadWithCallback(
        self, on_result: Callable[..., Any], f: Callable[..., Any], *a: Any, **kw: Any
    ) -> None:
        self.queue.append((on_result, f, a, kw))

    def run_one(self) -> None:
        on_result, f, a, kw = self.queue.pop(0)
        SyncPool.callInThreadWithCallback(self, on_result, f, *a, **kw)

    def run_all(self, bound: int = 1000) -> None:
        for _ in range(bound):
            if not self.queue:
                return
            self.run_one()
        raise AssertionError("jobs keep coming")


class FsyncRecorder:
    """Records the path of every fsynced descriptor into a shared event list."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def __call__(self, fd: int) -> None:
        self.events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
        os.fsync(fd)


def envelope(*rcpts: str) -> Envelope:
    return Envelope(sender="alice@example.com", recipients=[Recipient(r) for r in rcpts or ("bob@example.net",)])


def make_store(root: Any, pool: SyncPool | None = None, clock: Clock | None = None, **kw: Any) -> SpoolStore:
    return SpoolStore(str(root), SyncReactor(), pool or SyncPool(), clock or Clock(), **kw)


def commit(store: SpoolStore, body: bytes = b"Subject: t\r\n\r\nhello\r\n", env: Envelope | None = None) -> str:
    w = store.open_writer()
    w.write(body)
    return result(store.commit(w, env or envelope()))


def files(store: SpoolStore, sub: str) -> list[str]:
    return sorted(os.listdir(os.path.join(store.root, sub)))


# ---------------------------------------------------------------- writing and durability


def test_provides_interfaces(tmp_path: Any) -> None:
    store = make_store(tmp_path)
    assert verifyObject(IQueueStore, store)
    w = store.open_writer()
    assert verifyObject(IMessageWriter, w)
    w.abort()
    assert set(files(store, ".")) >= {"tmp", "msg", "incoming", "active", "deferred", "hold", "corrupt"}


def test_commit_fires_only_after_every_fsync(tmp_path: Any) -> None:
    events: list[str] = []
    pool = ManualPool()
    store = make_store(tmp_path / "spool", pool, fsync=FsyncRecorder(events))
    events.clear()
    w = store.open_writer()
    w.write(b"Subject: x\r\n\r\n")
    w.write(b"body\r\n")
    d = store.commit(w, envelope())
    d.addCallback(lambda qid: events.append("fired " + qid))
    assert events == []
    pool.run_one()  # the writer's file is created
    assert files(store, "tmp") == [w.queue_id + ".msg"]
    assert not d.called and events == []
    pool.run_one()  # one round: content fsync, envelope fsync, renames, then the directory fsyncs
    assert len(events) == 5
    assert events[0] == f"fsync {store.root}/tmp/{w.queue_id}.msg"
    assert events[1].startswith(f"fsync {store.root}/tmp/{w.queue_id}.") and events[1].endswith(".json")
    assert events[2:] == [
        f"fsync {store.root}/incoming",
        f"fsync {store.root}/msg",
        f"fired {w.queue_id}",
    ], "fires only after the directories are fsynced"
    assert files(store, "incoming") == [w.queue_id + ".json"]
    assert files(store, "tmp") == []
    with store.open_content(w.queue_id) as f:
        assert f.read() == b"Subject: x\r\n\r\nbody\r\n"
    stored = json.loads((tmp_path / "spool" / "incoming" / (w.queue_id + ".json")).read_text())
    assert stored["queue_id"] == w.queue_id and stored["size"] == 20


def test_concurrent_commits_share_directory_fsyncs(tmp_path: Any) -> None:
    events: list[str] = []
    pool = ManualPool()
    store = make_store(tmp_path, pool, fsync=FsyncRecorder(events))
    events.clear()
    fired: list[str] = []
    ds = []
    for i in range(6):
        w = store.open_writer()
        w.write(b"m%d\r\n" % i)
        ds.append(store.commit(w, envelope()).addCallback(fired.append))
    pool.run_one()  # the first file's creation
    assert fired == []
    pool.run_one()  # round 1: the first commit, which started it
    assert len(fired) == 1
    pool.run_all()  # the other creations, then round 2: the five that came while round 1 was queued
    assert len(fired) == 6
    dir_fsyncs = [e for e in events if e.endswith(("/incoming", "/msg"))]
    # round 1 serves the first commit, round 2 the five that finished while it ran
    assert store.syncer.rounds == 2
    assert len(dir_fsyncs) == 4
    assert len([e for e in events if f"{store.root}/tmp/" in e]) == 12  # one content + one envelope fsync each


def test_dir_fsync_failure_fails_commit_and_rolls_back(tmp_path: Any) -> None:
    def fsync(fd: int) -> None:
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(5, "Input/output error")

    store = make_store(tmp_path / "s", fsync=os.fsync)
    store.syncer._fsync = fsync
    w = store.open_writer()
    w.write(b"x\r\n")
    f = failure(store.commit(w, envelope()))
    assert f.check(OSError)
    assert files(store, "incoming") == [] and files(store, "msg") == [] and files(store, "tmp") == []


def test_writer_streams_rewrites_headers_and_aborts(tmp_path: Any) -> None:
    store = make_store(tmp_path)
    w = store.open_writer()
    w.write(b"Subject: old\r\n\r\n")
    w.write(b"body line\r\n" * 1000)
    with w.open_read() as f:
        assert f.read(14) == b"Subject: old\r\n"
    w.replace_headers(14, b"Subject: new header\r\nX-A: 1\r\n")
    assert w.size == len(b"Subject: new header\r\nX-A: 1\r\n\r\n") + 11000
    with w.open_read() as f:
        data = f.read()
    assert data.startswith(b"Subject: new header\r\nX-A: 1\r\n\r\nbody line\r\n")
    assert len(data) == w.size
    assert files(store, "tmp") == [w.queue_id + ".1.msg"]
    w.write(b"tail\r\n")
    qid = result(store.commit(w, envelope()))
    with store.open_content(qid) as f:
        assert f.read() == data + b"tail\r\n"
    w.abort()  # after commit: no-op
    assert files(store, "msg") == [qid]

    w2 = store.open_writer()
    w2.write(b"partial")
    w2.abort()
    w2.abort()
    assert files(store, "tmp") == []
    with pytest.raises(ValueError):
        w2.write(b"more")
    with pytest.raises(ValueError):
        store.commit(w2, envelope())
    with pytest.raises(ValueError):
        w.replace_headers(0, b"")


def test_writes_before_the_file_exists_are_buffered(tmp_path: Any) -> None:
    pool = ManualPool()
    store = make_store(tmp_path, pool)
    w = store.open_writer()
    assert len(pool.queue) == 1 and files(store, "tmp") == []  # creation is the pool's job
    w.write(b"Subject: a\r\n\r\n")
    with w.open_read() as f:
        assert f.read() == b"Subject: a\r\n\r\n"
    w.replace_headers(12, b"Subject: b\r\nX-New: 1\r\n")
    assert w.size == 24
    pool.run_one()
    w.write(b"body\r\n")  # adopts the file, writes the buffer, then this
    with w.open_read() as f:
        assert f.read() == b"Subject: b\r\nX-New: 1\r\n\r\nbody\r\n"
    d = store.commit(w, envelope())
    pool.run_all()
    with store.open_content(result(d)) as f:
        assert f.read() == b"Subject: b\r\nX-New: 1\r\n\r\nbody\r\n"

    w2 = store.open_writer()
    w2.write(b"only in memory")
    d2 = store.commit(w2, envelope())  # the commit job writes the buffer into the new file
    pool.run_all()
    with store.open_content(result(d2)) as f:
        assert f.read() == b"only in memory"

    w3 = store.open_writer()
    w3.write(b"x")
    w3.abort()  # before the file exists: it is removed once created
    pool.run_all()
    assert files(store, "tmp") == []


def test_big_writes_wait_for_the_file(tmp_path: Any) -> None:
    store = make_store(tmp_path, ManualPool())
    w = store.open_writer()
    w.write(b"x" * 1000)
    store._pool.run_all()  # type: ignore[attr-defined]
    w.write(b"y" * (2 * 1024 * 1024))
    assert w._pending == bytearray() and w.size == 1000 + 2 * 1024 * 1024
    w.abort()
    assert files(store, "tmp") == []


def test_submit_and_listener(tmp_path: Any) -> None:
    store = make_store(tmp_path)
    seen: list[str] = []
    store.add_listener(seen.append)
    store.add_listener(lambda q: 1 / 0)  # a failing listener is logged, not fatal
    store.log = Logger(observer=lambda e: None)
    qid = result(store.submit(b"Subject: dsn\r\n\r\nx\r\n", envelope()))
    assert seen == [qid]
    assert [e.queue_id for e in result(store.list_messages("incoming"))] == [qid]


# ---------------------------------------------------------------- claim / update / hold


def _three(store: SpoolStore, clock: Clock) -> list[str]:
    ids = []
    for i in range(3):
        clock.advance(1)
        ids.append(commit(store, b"msg %d\r\n" % i))
    return ids


def test_claim_update_remove_and_defer(tmp_path: Any) -> None:
    clock = Clock()
    store = make_store(tmp_path, clock=clock)
    a, b, c = _three(store, clock)
    entries = result(store.claim(10.0, 2))
    assert [e.queue_id for e in entries] == [a, b]
    assert files(store, "active") == [a + ".json", b + ".json"]
    assert entries[0].envelope.sender == "alice@example.com"

    result(store.update(a, entries[0].envelope, None))
    assert a + ".json" not in files(store, "active") and a not in files(store, "msg")

    env_b = entries[1].envelope
    env_b.recipients[0].attempts = 1
    result(store.update(b, env_b, 100.0))
    assert files(store, "deferred") == [b + ".json"]
    assert store.next_due() == 100.0
    assert [e.queue_id for e in result(store.claim(50.0, 10))] == [c]
    assert result(store.claim(99.0, 10)) == []
    again = result(store.claim(100.0, 10))
    assert [e.queue_id for e in again] == [b]
    assert again[0].envelope.recipients[0].attempts == 1
    assert store.next_due() is None
    env_b.recipients[0].status = RecipientStatus.DELIVERED
    result(store.update(b, env_b, None))
    with pytest.raises(KeyError):
        result(store.update(b, env_b, None))
    assert files(store, "msg") == [c]


def test_update_of_a_message_that_is_not_active_fails(tmp_path: Any) -> None:
    store = make_store(tmp_path)
    qid = commit(store)
    assert failure(store.update(qid, envelope(), 5.0)).check(ValueError)
    assert files(store, "incoming") == [qid + ".json"]


def test_claim_alternates_new_and_deferred(tmp_path: Any) -> None:
    clock = Clock()
    store = make_store(tmp_path, clock=clock)
    d1, d2, n1 = _three(store, clock)
    for qid, e in [(x.queue_id, x.envelope) for x in result(store.claim(0, 2))]:
        result(store.update(qid, e, 5.0))
    clock.advance(1)
    n2 = commit(store)
    order = [e.queue_id for _ in range(4) for e in result(store.claim(10.0, 1))]
    assert order == [n1, d1, n2, d2]
    assert result(store.claim(10.0, 5)) == []


def test_hold_and_release(tmp_path: Any) -> None:
    store = make_store(tmp_path)
    seen: list[str] = []
    store.add_listener(seen.append)
    qid = commit(store)
    result(store.hold(qid, None, "operator"))
    assert result(store.claim(1e12, 10)) == []
    held = result(store.list_messages("hold"))
    assert [(e.queue_id, e.held_reason) for e in held] == [(qid, "operator")]

    result(store.release(qid))
    assert seen == [qid, qid]
    entries = result(store.claim(0, 10))
    assert [e.queue_id for e in entries] == [qid]
    env = entries[0].envelope
    env.crashes = 3
    result(store.hold(qid, env, "poison"))
    assert files(store, "active") == [] and files(store, "hold") == [qid + ".json"]
    result(store.release(qid))
    [again] = result(store.claim(0, 10))
    assert again.envelope.crashes == 0 and again.envelope.held_reason is None
    assert failure(store.release(qid)).check(ValueError)
    assert failure(store.hold("NOSUCHID", None, "x")).check(KeyError)


def test_operations_on_one_id_are_serialised(tmp_path: Any) -> None:
    pool = ManualPool()
    store = make_store(tmp_path, pool)
    w = store.open_writer()
    w.write(b"x")
    d = store.commit(w, envelope())
    pool.run_all()
    qid = result(d)
    claimed = store.claim(0, 1)
    held = store.hold(qid, None, "operator")
    assert len(pool.queue) == 1, "hold must wait for the claim's rename"
    pool.run_all()
    assert [e.queue_id for e in result(claimed)] == [qid]
    result(held)
    assert files(store, "hold") == [qid + ".json"] and files(store, "active") == []


def test_bad_queue_ids_are_refused(tmp_path: Any) -> None:
    store = make_store(tmp_path)
    for bad in ("../x", "a/b", "", "x" * 65):
        with pytest.raises(ValueError):
            store.open_content(bad)
        with pytest.raises(ValueError):
            store.update(bad, envelope(), None)
    store.log = Logger(observer=lambda e: None)
    store.notice("../../etc")
    assert store.due_count() == 0


# ---------------------------------------------------------------- several processes


def test_worker_commits_are_found_by_notice_and_scan(tmp_path: Any) -> None:
    main = make_store(tmp_path)
    worker = make_store(tmp_path, claims=False)
    seen: list[str] = []
    main.add_listener(seen.append)
    q1 = commit(worker)
    q2 = commit(worker)
    assert worker.due_count() == 0 and main.due_count() == 0
    main.notice(q1)
    main.notice(q1)
    assert seen == [q1]
    assert result(main.scan_incoming()) == 1
    assert seen == [q1, q2]
    assert sorted(e.queue_id for e in result(main.claim(0, 10))) == sorted([q1, q2])
    assert result(main.scan_incoming()) == 0
    main.notice(q1)  # stale notice: the rename finds nothing
    assert result(main.claim(0, 10)) == []


# ---------------------------------------------------------------- recovery and corruption


def _capture(store: SpoolStore) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    store.log = Logger(observer=events.append)
    return events


def _text(event: dict[str, Any]) -> str:
    from twisted.logger import formatEvent

    return formatEvent(event)


def test_recover_returns_active_drops_orphans_rebuilds_index(tmp_path: Any) -> None:
    clock = Clock()
    store = make_store(tmp_path, clock=clock)
    a, b, c = _three(store, clock)
    [ea, eb] = result(store.claim(0, 2))
    result(store.update(b, eb.envelope, 500.0))
    # a is left active (crash mid-delivery); leftovers of an interrupted writer and envelope
    w = store.open_writer()
    w.write(b"half a mess")
    (tmp_path / "tmp" / "0123ABCD.1234.json").write_bytes(b"{")
    (tmp_path / "msg" / "ORPHAN123").write_bytes(b"content whose envelope never landed")
    _age(tmp_path)  # they predate the restart

    fresh = make_store(tmp_path, clock=clock)
    events = _capture(fresh)
    assert result(fresh.recover()) == 1
    assert fresh.last_recovery == {
        "returned": 1, "incoming": 2, "deferred": 1, "held": 0, "corrupt": 0,
        "orphan_content": 1, "temp_files": 2,
    }
    assert files(fresh, "tmp") == [] and files(fresh, "active") == []
    assert files(fresh, "msg") == sorted([a, b, c])
    assert fresh.next_due() == 500.0
    assert [e.queue_id for e in result(fresh.claim(0, 10))] == [a, c]
    assert [e.queue_id for e in result(fresh.claim(500.0, 10))] == [b]
    assert any("recovered" in _text(e) for e in events)
    w.abort()


def _age(root: Any, seconds: float = 10.0) -> None:
    """Make every file of tmp/ and msg/ ``seconds`` older: left by a process that ran before."""
    for sub in ("tmp", "msg"):
        for name in os.listdir(os.path.join(root, sub)):
            path = os.path.join(root, sub, name)
            t = os.stat(path).st_mtime - seconds
            os.utime(path, (t, t))


def _crashed_run(root: Any) -> tuple[str, str]:
    """What a process killed a moment ago leaves: a committed message, a writer's temp file and
    content renamed into msg/ whose envelope never landed, all of them younger than a second."""
    old = make_store(root)
    kept = commit(old)
    (root / "tmp" / "CUTOFF.msg").write_bytes(b"a session cut off by kill -9\r\n")
    (root / "msg" / "ORPHANYOUNG").write_bytes(b"content whose envelope never landed")
    (root / "tmp" / "ORPHANYOUNG.1234.json").write_bytes(b"{")
    return kept, "CUTOFF"


def test_recover_removes_orphans_by_reference_after_a_restart_within_a_second(tmp_path: Any) -> None:
    """Issue 10 item 4: orphans are what no envelope references, not what is old; sessions of this
    process start only after recovery (exmta.receive.gated), so nothing young is live."""
    kept, _ = _crashed_run(tmp_path)
    fresh = make_store(tmp_path)  # the restart, within the same second
    result(fresh.recover())
    assert files(fresh, "tmp") == []
    assert files(fresh, "msg") == [kept]
    assert fresh.last_recovery["orphan_content"] == 1 and fresh.last_recovery["temp_files"] == 2
    [entry] = result(fresh.claim(0, 10))
    assert entry.queue_id == kept


def test_recover_waits_for_a_worker_of_the_last_run_to_finish(tmp_path: Any, monkeypatch: Any) -> None:
    """A receive worker of the killed process holds the writer lock while it finishes a commit:
    recovery waits for it, and its message (content renamed before the envelope) is kept."""
    from exmta.queue import writerlock

    make_store(tmp_path)  # the directories
    worker = make_store(tmp_path, claims=False, writer_lock=True)
    w = worker.open_writer()
    w.write(b"Subject: late\r\n\r\nfrom a dying worker\r\n")
    env = envelope()
    env.queue_id = w.queue_id
    content_tmp = w._content_file()
    content_tmp.flush()
    content_tmp.close()
    os.rename(w._path, tmp_path / "msg" / w.queue_id)  # the first rename of a commit
    waited: list[float] = []

    def worker_finishes(seconds: float) -> None:  # while recovery waits: the envelope lands, the worker exits
        waited.append(seconds)
        if len(waited) == 1:
            (tmp_path / "incoming" / f"{w.queue_id}.json").write_bytes(json.dumps(env.to_json()).encode())
            worker._writer_lock.release()

    monkeypatch.setattr(writerlock, "_pause", worker_finishes)
    fresh = make_store(tmp_path)
    result(fresh.recover())
    assert waited and fresh.last_recovery["orphan_content"] == 0
    assert files(fresh, "msg") == [w.queue_id]
    [entry] = result(fresh.claim(0, 10))
    with fresh.open_content(entry.queue_id) as f:
        assert f.read().endswith(b"from a dying worker\r\n")


def test_recover_leaves_young_files_alone_while_a_writer_keeps_the_lock(tmp_path: Any) -> None:
    """The fallback: a writer that does not exit within recover_wait keeps its young files."""
    kept, writing = _crashed_run(tmp_path)
    worker = make_store(tmp_path, claims=False, writer_lock=True)
    fresh = make_store(tmp_path, recover_wait=0.0)
    events = _capture(fresh)
    result(fresh.recover())
    assert files(fresh, "msg") == sorted([kept, "ORPHANYOUNG"])
    assert writing + ".msg" in files(fresh, "tmp")
    assert any("kept the writer lock" in _text(e) for e in events)
    worker._writer_lock.release()


def test_recover_can_count_crashes(tmp_path: Any) -> None:
    store = make_store(tmp_path)
    qid = commit(store)
    result(store.claim(0, 1))
    fresh = make_store(tmp_path, count_crashes=True)
    _capture(fresh)
    assert result(fresh.recover()) == 1
    [entry] = result(fresh.claim(0, 1))
    assert entry.queue_id == qid and entry.envelope.crashes == 1


def _overwrite(data: bytes) -> Callable[[Any, str], Any]:
    return lambda p, q: (p / "incoming" / f"{q}.json").write_bytes(data)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_overwrite(b'{"version": 1, "sender": "a@b", "recip'), "unreadable envelope"),
        (_overwrite(b"[1, 2]"), "not a JSON object"),
        (_overwrite(b'{"version": 99}'), "unsupported envelope version"),
        (_overwrite(b"\xff\xfe"), "unreadable envelope"),
        (lambda p, q: (p / "msg" / q).unlink(), "content file is missing"),
    ],
)
def test_recover_moves_corrupt_messages_aside(tmp_path: Any, damage: Callable[..., Any], reason: str) -> None:
    store = make_store(tmp_path)
    good = commit(store)
    bad = commit(store)
    damage(tmp_path, bad)
    fresh = make_store(tmp_path)
    events = _capture(fresh)
    assert result(fresh.recover()) == 0
    assert files(fresh, "incoming") == [good + ".json"]
    assert bad + ".json" in files(fresh, "corrupt")
    errors = [_text(e) for e in events if e["log_level"].name == "error"]
    assert len(errors) == 1
    assert f"{tmp_path}/incoming/{bad}.json" in errors[0] and reason in errors[0]
    assert fresh.last_recovery["corrupt"] == 1
    assert [e.queue_id for e in result(fresh.claim(0, 10))] == [good]


def test_claim_quarantines_an_envelope_broken_after_indexing(tmp_path: Any) -> None:
    store = make_store(tmp_path)
    events = _capture(store)
    good = commit(store)
    bad = commit(store)
    (tmp_path / "incoming" / f"{bad}.json").write_bytes(b"not json")
    assert [e.queue_id for e in result(store.claim(0, 10))] == [good]
    assert sorted(files(store, "corrupt")) == sorted([bad + ".json", bad + ".msg"])
    assert any(bad in _text(e) and e["log_level"].name == "error" for e in events)


def test_list_messages(tmp_path: Any) -> None:
    store = make_store(tmp_path)
    qid = commit(store, env=envelope("x@example.org", "y@example.org"))
    [env] = result(store.list_messages("incoming"))
    assert env.queue_id == qid and [r.address for r in env.recipients] == ["x@example.org", "y@example.org"]
    assert result(store.list_messages("deferred")) == []
    assert failure(store.list_messages("tmp")).check(ValueError)


def test_recover_with_grace_leaves_young_files_of_live_writers(tmp_path: Any) -> None:
    worker = make_store(tmp_path, claims=False)
    w = worker.open_writer()
    w.write(b"still arriving")
    (tmp_path / "msg" / "YOUNGORPHAN").write_bytes(b"x")
    old = tmp_path / "tmp" / "OLD.1234.json"
    old.write_bytes(b"{")
    os.utime(old, (1, 1))
    main = make_store(tmp_path, tmp_grace=3600.0)
    _capture(main)
    result(main.recover())
    assert files(main, "tmp") == [w.queue_id + ".msg"]
    assert files(main, "msg") == ["YOUNGORPHAN"]
    assert main.last_recovery["temp_files"] == 1
    w.write(b" and done\r\n")
    qid = result(worker.commit(w, envelope()))
    main.notice(qid)
    with main.open_content(qid) as f:
        assert f.read() == b"still arriving and done\r\n"


def test_update_of_a_message_held_during_delivery_keeps_it_held(tmp_path: Any) -> None:
    store = make_store(tmp_path)
    qid = commit(store)
    [entry] = result(store.claim(0, 1))
    result(store.hold(qid, None, "operator"))
    entry.envelope.recipients[0].attempts = 1
    result(store.update(qid, entry.envelope, 60.0))
    [held] = result(store.list_messages("hold"))
    assert held.recipients[0].attempts == 1 and held.held_reason
    assert store.next_due() is None and result(store.claim(1e12, 5)) == []
    result(store.update(qid, held, None))  # all final: removed even though held
    assert files(store, "hold") == [] and files(store, "msg") == []


def test_recover_keeps_what_was_indexed_meanwhile(tmp_path: Any) -> None:
    store = make_store(tmp_path)
    a = commit(store)
    fresh = make_store(tmp_path)
    _capture(fresh)
    listed_early = fresh._recover_files()  # the recovery's scan, taken before b lands
    fresh._recover_files = lambda: listed_early  # type: ignore[method-assign]
    b = commit(fresh)
    assert result(fresh.recover()) == 0
    assert [e.queue_id for e in result(fresh.claim(0, 10))] == [a, b]


# ---------------------------------------------------------------- io="inline" (receive workers)


class NoPool(SyncPool):
    """A pool that must not be used: inline I/O never hands work to threads."""

    def callInThreadWithCallback(self, *a: Any, **kw: Any) -> None:
        raise AssertionError("io='inline' used the thread pool")


def test_inline_commit_fires_after_the_iterations_directory_round(tmp_path: Any) -> None:
    events: list[str] = []
    clock = Clock()
    store = make_store(tmp_path / "spool", NoPool(), clock, fsync=FsyncRecorder(events), io="inline")
    events.clear()
    w = store.open_writer()
    assert files(store, "tmp") == [w.queue_id + ".msg"], "created at once, on this thread"
    w.write(b"Subject: x\r\n\r\nbody\r\n")
    d = store.commit(w, envelope())
    d.addCallback(lambda qid: events.append("fired " + qid))
    assert events == [] and files(store, "incoming") == [], "committed in the round, at the end of the iteration"
    clock.advance(0)  # the end of the reactor iteration: the round
    assert events[0] == f"fsync {store.root}/tmp/{w.queue_id}.msg"
    assert events[1].startswith(f"fsync {store.root}/tmp/{w.queue_id}.") and events[1].endswith(".json")
    assert events[2:] == [f"fsync {store.root}/incoming", f"fsync {store.root}/msg", f"fired {w.queue_id}"]
    assert files(store, "incoming") == [w.queue_id + ".json"]
    assert not clock.getDelayedCalls()


def test_inline_commits_of_one_iteration_share_one_directory_round(tmp_path: Any) -> None:
    events: list[str] = []
    clock = Clock()
    store = make_store(tmp_path, NoPool(), clock, fsync=FsyncRecorder(events), io="inline")
    events.clear()
    fired: list[str] = []
    for i in range(6):
        w = store.open_writer()
        w.write(b"m%d\r\n" % i)
        store.commit(w, envelope()).addCallback(fired.append)
    assert fired == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert len(fired) == 6 and store.syncer.rounds == 1
    assert [e for e in events if e.endswith(("/incoming", "/msg"))] == [
        f"fsync {store.root}/incoming", f"fsync {store.root}/msg"]
    assert not clock.getDelayedCalls()


def test_inline_claim_update_hold_release_remove(tmp_path: Any) -> None:
    clock = Clock()
    store = make_store(tmp_path, NoPool(), clock, io="inline")

    def settle(d: Any) -> Any:
        clock.advance(0)
        return result(d)

    ids = []
    for i in range(3):
        w = store.open_writer()
        w.write(b"m%d\r\n" % i)
        ids.append(settle(store.commit(w, envelope())))
    a, b, c = ids
    entries = settle(store.claim(10.0, 3))
    assert [e.queue_id for e in entries] == [a, b, c]
    settle(store.update(a, entries[0].envelope, None))          # delivered: removed
    settle(store.update(b, entries[1].envelope, 100.0))         # deferred
    settle(store.hold(c, entries[2].envelope, "poison"))
    assert files(store, "msg") == sorted([b, c])
    assert files(store, "deferred") == [b + ".json"] and files(store, "hold") == [c + ".json"]
    settle(store.release(c))
    assert [e.queue_id for e in settle(store.claim(10.0, 5))] == [c]
    assert not clock.getDelayedCalls()


def test_io_mode_is_checked(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="io must be"):
        make_store(tmp_path, io="async")


# ---------------------------------------------------------------- sync="syncfs" (receive workers' default)


class SyncfsRecorder:
    """Records each syncfs call with what incoming/ and tmp/ hold at that moment."""

    def __init__(self, root: Any, events: list[str], fail_at: int | None = None) -> None:
        self.root, self.events, self.fail_at, self.calls = root, events, fail_at, 0

    def __call__(self) -> None:
        self.calls += 1
        incoming = sorted(os.listdir(os.path.join(self.root, "incoming")))
        tmp = len(os.listdir(os.path.join(self.root, "tmp")))
        self.events.append(f"syncfs {self.calls}: incoming={incoming} tmp={tmp}")
        if self.calls == self.fail_at:
            raise OSError(5, "Input/output error")


def syncfs_store(tmp_path: Any, events: list[str], clock: Clock, fail_at: int | None = None) -> SpoolStore:
    root = tmp_path / "spool"
    os.makedirs(root)
    store = make_store(root, clock=clock, fsync=FsyncRecorder(events), sync="syncfs", io="inline",
                       syncfs=SyncfsRecorder(str(root), events, fail_at))
    events.clear()  # the directories' creation
    return store


def test_syncfs_round_writes_syncs_renames_syncs_then_fires(tmp_path: Any) -> None:
    events: list[str] = []
    clock = Clock()
    store = syncfs_store(tmp_path, events, clock)
    fired: list[str] = []
    ids = []
    for i in range(3):
        w = store.open_writer()
        w.write(b"m%d\r\n" % i)
        ids.append(w.queue_id)
        store.commit(w, envelope()).addCallback(fired.append)
    assert events == [] and fired == []
    clock.advance(0)  # one round for the three
    assert events == [
        "syncfs 1: incoming=[] tmp=6",  # contents and envelopes written, nothing published yet
        f"syncfs 2: incoming={sorted(i + '.json' for i in ids)} tmp=0",  # renamed, then made durable
    ], "no fsync per file: the two syncfs calls stand for them"
    assert fired == ids and store.syncer.rounds == 1
    assert files(store, "msg") == sorted(ids)


@pytest.mark.parametrize("fail_at", [1, 2])
def test_syncfs_failure_fails_the_round_and_leaves_nothing(tmp_path: Any, fail_at: int) -> None:
    events: list[str] = []
    clock = Clock()
    store = syncfs_store(tmp_path, events, clock, fail_at)
    outcomes = []
    for i in range(2):
        w = store.open_writer()
        w.write(b"m%d\r\n" % i)
        store.commit(w, envelope()).addBoth(outcomes.append)
    clock.advance(0)
    assert len(outcomes) == 2 and all(o.check(OSError) for o in outcomes)
    assert files(store, "incoming") == [] and files(store, "msg") == [] and files(store, "tmp") == []
    # the store keeps working after the failure
    w = store.open_writer()
    w.write(b"again\r\n")
    d = store.commit(w, envelope())
    clock.advance(0)
    assert result(d) == w.queue_id and files(store, "incoming") == [w.queue_id + ".json"]


def test_syncfs_serves_plain_directory_syncs_too(tmp_path: Any) -> None:
    events: list[str] = []
    clock = Clock()
    store = syncfs_store(tmp_path, events, clock)
    w = store.open_writer()
    w.write(b"x\r\n")
    d = store.commit(w, envelope())
    clock.advance(0)
    qid = result(d)
    [entry] = result(store.claim(0, 1))
    events.clear()
    done = store.update(qid, entry.envelope, None)  # delivered: removed, the removal made durable
    clock.advance(0)
    result(done)
    assert [e for e in events if e.startswith("syncfs")] == ["syncfs 3: incoming=[] tmp=0"]
    assert files(store, "msg") == [] and files(store, "active") == []


def test_libc_syncfs_on_this_filesystem(tmp_path: Any) -> None:
    from exmta.queue.spool import libc_syncfs

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc_syncfs(fd)  # Linux: succeeds on a real filesystem
        with pytest.raises(OSError):
            libc_syncfs(-1)
    finally:
        os.close(fd)
    store = SpoolStore(str(tmp_path / "real"), SyncReactor(), SyncPool(), Clock(), sync="syncfs")
    assert store.sync == "syncfs"
    w = store.open_writer()
    w.write(b"real\r\n")
    assert result(store.commit(w, envelope())) == w.queue_id
