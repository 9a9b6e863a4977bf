"""Property test: whatever the connectors answer, every recipient ends final exactly once."""
from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task

from exmta.config.schema import QueueConfig, RouteConfig, SendConnectorConfig
from exmta.model import DeliveryRequest, Envelope, Outcome, Recipient, RecipientResult, Reply
from exmta.queue.scheduler import DeliveryScheduler
from exmta.routing import StaticRouter
from exmta.testing.memstore import MemoryStore

REPLIES = {
    Outcome.DELIVERED: Reply.make(250, "2.0.0", "OK"),
    Outcome.DEFERRED: Reply.make(451, "4.4.1", "Try later"),
    Outcome.FAILED: Reply.make(550, "5.1.1", "No such user"),
}
FINAL_EVENTS = {"SEND", "DELIVER", "FAIL", "EXPIRE"}


class Tracker:
    def __init__(self) -> None:
        self.events = []

    def track(self, event) -> None:
        self.events.append(event)


OUTCOMES = [Outcome.DELIVERED, Outcome.DEFERRED, Outcome.DEFERRED, Outcome.FAILED]
LATENCIES = [0.0, 1.0, 30.0]


class ScriptedConnector:
    """Answers from a pre-drawn script of choices (used cyclically): crash, outcomes, latency."""

    def __init__(self, name: str, clock: task.Clock, script: list[int]) -> None:
        self.name = name
        self.clock = clock
        self.script = script
        self.position = 0
        self.kind = "smtp"
        self.calls = 0
        self.crashes = 0

    def _next(self, n: int) -> int:
        value = self.script[self.position % len(self.script)]
        self.position += 1
        return value % n

    def deliver(self, request: DeliveryRequest):
        self.calls += 1
        if self._next(20) == 0:
            self.crashes += 1
            raise RuntimeError("scripted crash")
        results = []
        for r in request.recipients:
            outcome = OUTCOMES[self._next(len(OUTCOMES))]
            results.append(RecipientResult(r.address, outcome, REPLIES[outcome]))
        latency = LATENCIES[self._next(len(LATENCIES))]
        return task.deferLater(self.clock, latency, lambda: results)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    script=st.lists(st.integers(0, 1000), min_size=1, max_size=50),
    messages=st.lists(
        st.lists(st.sampled_from(["a@one.example", "b@one.example", "c@two.example", "d@three.example"]),
                 min_size=1, max_size=3, unique=True),
        min_size=1, max_size=6,
    ),
    limit=st.integers(1, 3),
    max_active=st.integers(1, 4),
)
def test_every_recipient_ends_final_once(script, messages, limit, max_active) -> None:
    clock = task.Clock()
    clock.advance(1_000_000)
    store = MemoryStore(clock)
    tracker = Tracker()
    connector = ScriptedConnector("out", clock, script)
    config = QueueConfig(retry_schedule=(60.0, 120.0), max_lifetime=600.0, delay_warning=200.0,
                         max_active=max_active, poison_threshold=3)
    scheduler = DeliveryScheduler(
        store, StaticRouter([RouteConfig(("*",), "out")], ["out"]), {"out": connector}, config, clock, tracker,
        hostname="mx.test", send_configs={"out": SendConnectorConfig("out", max_per_destination=limit)},
    )
    scheduler.startService()
    originals = []
    for rcpts in messages:
        env = Envelope(sender="s@sender.example", recipients=[Recipient(r) for r in rcpts])
        d = store.submit(b"Subject: t\r\n\r\nx\r\n", env)
        originals.append((d.result, rcpts))
    for _ in range(400):
        clock.advance(10)
    held = set(store.queue_ids("hold"))
    # nothing is left except poison messages
    assert set(store.queue_ids()) <= held
    final = Counter()
    for e in tracker.events:
        if e.event_id.value in FINAL_EVENTS:
            final.update((e.queue_id, r) for r in e.recipients)
    bounced = Counter()
    delayed = Counter()
    for e in tracker.events:
        if e.event_id.value == "DSN" and e.details["action"] == "failed":
            bounced.update((e.queue_id, r) for r in e.recipients)
        if e.event_id.value == "DSN" and e.details["action"] == "delayed":
            delayed.update((e.queue_id, r) for r in e.recipients)
    for qid, rcpts in originals:
        for r in rcpts:
            if qid in held:
                assert final[(qid, r)] <= 1
                continue
            assert final[(qid, r)] == 1, (qid, r)
            failed = any(e.event_id.value in ("FAIL", "EXPIRE") and e.queue_id == qid and r in e.recipients
                         for e in tracker.events)
            assert bounced[(qid, r)] == (1 if failed else 0)
            assert delayed[(qid, r)] <= 1
    # DSNs are never bounced themselves
    dsn_ids = {e.details["dsn_queue_id"] for e in tracker.events if e.event_id.value == "DSN"}
    assert not any(e.event_id.value == "DSN" and e.queue_id in dsn_ids for e in tracker.events)
    d = scheduler.stopService()
    assert d.called
    assert clock.getDelayedCalls() == []
    assert connector.calls >= len(messages) - len(held)
