"""MemoryStore honours the IQueueStore contract (claim leases, update, hold, recover)."""
from __future__ import annotations

import pytest
from twisted.internet import task
from zope.interface.verify import verifyObject

from exmta.interfaces import IMessageWriter, IQueueStore
from exmta.model import Envelope, Recipient
from exmta.testing.memstore import MemoryStore
from support.sync import failure, result


def envelope(*rcpts: str) -> Envelope:
    return Envelope(sender="s@example.org", recipients=[Recipient(r) for r in rcpts or ("r@example.net",)])


@pytest.fixture
def clock() -> task.Clock:
    c = task.Clock()
    c.advance(1000)
    return c


@pytest.fixture
def store(clock: task.Clock) -> MemoryStore:
    return MemoryStore(clock)


def test_provides_interfaces(store: MemoryStore) -> None:
    assert verifyObject(IQueueStore, store)
    assert verifyObject(IMessageWriter, store.open_writer())


def test_writer_commit_and_content(store: MemoryStore, clock: task.Clock) -> None:
    seen: list[str] = []
    store.add_listener(seen.append)
    w = store.open_writer()
    w.write(b"Subject: old\r\n\r\nbody\r\n")
    assert w.size == 22
    w.replace_headers(14, b"Subject: new header\r\n")
    assert w.open_read().read() == b"Subject: new header\r\n\r\nbody\r\n"
    env = envelope()
    qid = result(store.commit(w, env))
    assert qid == w.queue_id and seen == [qid]
    assert store.open_content(qid).read() == b"Subject: new header\r\n\r\nbody\r\n"
    stored = store.envelope(qid)
    assert stored.queue_id == qid and stored.received_at == 1000 and stored.size == 29
    assert env.queue_id == ""  # the caller's envelope is not the stored one
    assert store.queue_of(qid) == "incoming"
    w.abort()  # harmless after commit
    assert store.queue_of(qid) == "incoming"


def test_aborted_writer_cannot_commit(store: MemoryStore) -> None:
    w = store.open_writer()
    w.write(b"x")
    w.abort()
    w.abort()
    assert isinstance(failure(store.commit(w, envelope())).value, ValueError)
    assert store.queue_ids() == []


def test_claim_leases_and_update(store: MemoryStore, clock: task.Clock) -> None:
    qid = result(store.submit(b"m\r\n", envelope()))
    entries = result(store.claim(clock.seconds(), 10))
    assert [e.queue_id for e in entries] == [qid]
    assert store.queue_of(qid) == "active"
    assert result(store.claim(clock.seconds(), 10)) == []  # leased: not claimed twice
    env = entries[0].envelope
    env.recipients[0].attempts = 1
    result(store.update(qid, env, 1300.0))
    assert store.queue_of(qid) == "deferred" and store.next_due() == 1300.0
    assert store.envelope(qid).recipients[0].attempts == 1
    assert result(store.claim(1299.0, 10)) == []
    assert [e.queue_id for e in result(store.claim(1300.0, 10))] == [qid]
    result(store.update(qid, env, None))
    assert store.queue_of(qid) is None and store.next_due() is None


def test_update_requires_a_claim(store: MemoryStore) -> None:
    qid = result(store.submit(b"m\r\n", envelope()))
    assert isinstance(failure(store.update(qid, envelope(), None)).value, ValueError)
    assert isinstance(failure(store.update("nope", envelope(), None)).value, KeyError)


def test_claim_alternates_new_and_deferred(store: MemoryStore, clock: task.Clock) -> None:
    old = [result(store.submit(b"o\r\n", envelope())) for _ in range(3)]
    for e in result(store.claim(clock.seconds(), 3)):
        result(store.update(e.queue_id, e.envelope, clock.seconds()))
    new = [result(store.submit(b"n\r\n", envelope())) for _ in range(3)]
    got = [e.queue_id for e in result(store.claim(clock.seconds(), 4))]
    assert len(got) == 4
    assert sum(q in old for q in got) == 2 and sum(q in new for q in got) == 2
    assert [q for q in got if q in new] == new[:2]  # FIFO within a queue
    assert result(store.claim(clock.seconds(), 0)) == []


def test_hold_release_recover_and_list(store: MemoryStore, clock: task.Clock) -> None:
    a = result(store.submit(b"a\r\n", envelope()))
    b = result(store.submit(b"b\r\n", envelope()))
    entries = result(store.claim(clock.seconds(), 2))
    env_a = entries[0].envelope
    env_a.crashes = 3
    result(store.hold(a, env_a, "poison"))
    held = result(store.list_messages("hold"))
    assert [e.queue_id for e in held] == [a] and held[0].held_reason == "poison" and held[0].crashes == 3
    assert [e.queue_id for e in result(store.list_messages("active"))] == [b]
    assert result(store.recover()) == 1
    assert store.queue_of(b) == "incoming"
    result(store.release(a))
    released = store.envelope(a)
    assert store.queue_of(a) == "incoming" and released.held_reason is None and released.crashes == 0
    assert isinstance(failure(store.release(a)).value, ValueError)
    assert isinstance(failure(store.list_messages("bogus")).value, ValueError)


def test_listener_failure_does_not_break_submit(store: MemoryStore) -> None:
    def boom(qid: str) -> None:
        raise RuntimeError("listener bug")

    seen: list[str] = []
    store.add_listener(boom)
    store.add_listener(seen.append)
    qid = result(store.submit(b"x\r\n", envelope()))
    assert seen == [qid]


def test_operator_hold_keeps_envelope_and_release_notifies(store: MemoryStore) -> None:
    qid = result(store.submit(b"x\r\n", envelope("keep@example.net")))
    result(store.hold(qid, None, "operator"))
    held = store.envelope(qid)
    assert held.held_reason == "operator" and held.recipients[0].address == "keep@example.net"
    seen: list[str] = []
    store.add_listener(seen.append)
    result(store.release(qid))
    assert seen == [qid] and store.queue_of(qid) == "incoming"


def test_recover_can_count_crashes(clock: task.Clock) -> None:
    store = MemoryStore(clock, count_crashes=True)
    qid = result(store.submit(b"x\r\n", envelope()))
    result(store.claim(clock.seconds(), 1))
    assert result(store.recover()) == 1
    assert store.envelope(qid).crashes == 1
