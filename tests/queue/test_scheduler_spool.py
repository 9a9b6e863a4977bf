"""The scheduler over each real store: the spool and PostgreSQL (synchronous thread pool stand-in, task.Clock)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task

from exmta.config.schema import QueueConfig, RouteConfig
from exmta.model import DeliveryRequest, Envelope, Outcome, Recipient, RecipientResult, Reply
from exmta.queue.scheduler import DeliveryScheduler
from exmta.queue.postgres import PostgresStore
from exmta.queue.spool import SpoolStore
from exmta.routing import StaticRouter
from support.sync import SyncPool, SyncReactor, result as fired

START = 1_700_000_000.0
CONTENT = b"From: a@sender.example\r\nSubject: spool\r\n\r\nbody\r\n"


class Connector:
    def __init__(self) -> None:
        self.calls: list[tuple[DeliveryRequest, defer.Deferred[Any]]] = []
        self.crash = False

    def deliver(self, request: DeliveryRequest) -> defer.Deferred[Any]:
        if self.crash:
            raise RuntimeError("bug")
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((request, d))
        return d

    def answer(self, outcome: Outcome, reply: Reply) -> DeliveryRequest:
        request, d = self.calls.pop(0)
        d.callback([RecipientResult(r.address, outcome, reply) for r in request.recipients])
        return request


@pytest.fixture(params=["spool", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> Any:
    """Each test runs on the spool and on the PostgreSQL store (a fresh database)."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_dsn")
    return None


@pytest.fixture
def setup(tmp_path: Path, store_kind: str | None) -> Any:
    made: list[Any] = []

    def make() -> tuple[task.Clock, Any, Connector, DeliveryScheduler]:
        clock, store, connector, scheduler = _setup(tmp_path, store_kind)
        made.append(store)
        return clock, store, connector, scheduler
    yield make
    for store in made:
        if hasattr(store, "close"):
            store.close()


def _setup(tmp_path: Path, dsn: str | None) -> tuple[task.Clock, Any, Connector, DeliveryScheduler]:
    clock = task.Clock()
    clock.advance(START)
    if dsn is None:
        store: Any = SpoolStore(str(tmp_path / "spool"), SyncReactor(), SyncPool(), clock)
    else:
        store = PostgresStore(dsn, "node", str(tmp_path / "pg"), SyncReactor(), clock=clock, pool_size=2,
                              threadpool=SyncPool())
        store.open()
    connector = Connector()
    scheduler = DeliveryScheduler(
        store, StaticRouter([RouteConfig(("*",), "out")], ["out"]), {"out": connector},
        QueueConfig(retry_schedule=(300.0,), max_lifetime=1000.0, delay_warning=0.0, poison_threshold=2),
        clock, hostname="mx.exmta.example",
    )
    return clock, store, connector, scheduler


def test_retry_then_delivery_on_the_spool(setup: Any) -> None:
    clock, store, connector, scheduler = setup()
    scheduler.startService()
    qid = fired(store.submit(CONTENT, Envelope("a@sender.example", [Recipient("b@remote.example")])))
    clock.advance(0)
    request = connector.answer(Outcome.DEFERRED, Reply.make(451, "4.4.1", "later"))
    assert request.queue_id == qid
    with request.open_content() as f:
        assert f.read() == CONTENT
    [deferred] = fired(store.list_messages("deferred"))
    assert deferred.recipients[0].attempts == 1 and deferred.recipients[0].next_attempt == START + 300
    assert fired(defer.maybeDeferred(store.next_due)) == START + 300
    clock.advance(300)
    connector.answer(Outcome.DELIVERED, Reply.make(250, "2.0.0", "ok"))
    for queue in ("incoming", "active", "deferred", "hold"):
        assert fired(store.list_messages(queue)) == []
    assert fired(scheduler.stopService()) is None
    assert clock.getDelayedCalls() == []


def test_bounce_is_spooled_and_delivered(setup: Any) -> None:
    clock, store, connector, scheduler = setup()
    scheduler.startService()
    fired(store.submit(CONTENT, Envelope("a@sender.example", [Recipient("b@remote.example")])))
    clock.advance(0)
    connector.answer(Outcome.FAILED, Reply.make(550, "5.1.1", "unknown"))
    clock.advance(0)
    [(request, _)] = connector.calls
    assert request.envelope.kind == "dsn" and request.envelope.sender == ""
    with request.open_content() as f:
        assert b"multipart/report" in f.read()
    connector.answer(Outcome.DELIVERED, Reply.make(250, "2.0.0", "ok"))
    assert fired(store.list_messages("active")) == [] and fired(store.list_messages("deferred")) == []
    assert fired(scheduler.stopService()) is None
    assert clock.getDelayedCalls() == []


def test_poison_message_lands_in_the_spool_hold_queue(setup: Any) -> None:
    clock, store, connector, scheduler = setup()
    connector.crash = True
    scheduler.startService()
    qid = fired(store.submit(CONTENT, Envelope("a@sender.example", [Recipient("b@remote.example")])))
    clock.advance(0)
    clock.advance(300)
    [held] = fired(store.list_messages("hold"))
    assert held.queue_id == qid and held.crashes == 2 and held.held_reason
    assert fired(scheduler.stopService()) is None
    assert clock.getDelayedCalls() == []


def test_stop_deadline_then_recover_and_restart(setup: Any) -> None:
    clock, store, connector, scheduler = setup()
    scheduler.startService()
    qid = fired(store.submit(CONTENT, Envelope("a@sender.example", [Recipient("b@remote.example")])))
    clock.advance(0)
    d = scheduler.stopService()
    clock.advance(30)
    assert fired(d) is None
    assert [e.queue_id for e in fired(store.list_messages("active"))] == [qid]
    connector.calls.clear()
    fired(store.recover())
    scheduler.startService()
    clock.advance(0)
    [(request, _)] = connector.calls
    assert request.queue_id == qid
    connector.answer(Outcome.DELIVERED, Reply.make(250, "2.0.0", "ok"))
    assert fired(scheduler.stopService()) is None
    assert clock.getDelayedCalls() == []
