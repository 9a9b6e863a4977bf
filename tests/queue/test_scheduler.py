"""DeliveryScheduler on task.Clock with MemoryStore and hand-fired fake connectors."""
from __future__ import annotations

import email
import email.policy
from typing import Any, Callable

import pytest
from twisted.internet import defer, task

from exmta.config.schema import QueueConfig, RouteConfig, SendConnectorConfig
from exmta.model import (
    DeliveryRequest,
    Envelope,
    MailParams,
    Outcome,
    Recipient,
    RecipientResult,
    RecipientStatus,
    Reply,
    TrackingEvent,
    TrackingEventId,
)
from exmta.queue.scheduler import DeliveryScheduler, backoff, wants_notify
from exmta.routing import StaticRouter
from exmta.testing.memstore import MemoryStore
from support.sync import result

START = 1_700_000_000.0
OK = Reply.make(250, "2.0.0", "OK queued")
LATER = Reply.make(451, "4.4.1", "Connection timed out")
NO_SUCH_USER = Reply.make(550, "5.1.1", "User unknown")
ORIGINAL = b"From: a@sender.example\r\nTo: b@remote.example\r\nSubject: hello\r\nMessage-ID: <m1@sender.example>\r\n\r\nHi there\r\n"


class FakeConnector:
    """Records each request with a Deferred the test fires by hand (or answers with ``auto``)."""

    def __init__(self, name: str, kind: str = "smtp") -> None:
        self.name = name
        self.kind = kind
        self.calls: list[tuple[DeliveryRequest, defer.Deferred[list[RecipientResult]], float]] = []
        self.auto: Callable[[DeliveryRequest], Any] | None = None
        self.clock: task.Clock | None = None

    def deliver(self, request: DeliveryRequest) -> Any:
        if self.auto is not None:
            return self.auto(request)
        d: defer.Deferred[list[RecipientResult]] = defer.Deferred()
        self.calls.append((request, d, self.clock.seconds() if self.clock else 0.0))
        return d

    def pending(self) -> list[tuple[DeliveryRequest, defer.Deferred[list[RecipientResult]], float]]:
        return [c for c in self.calls if not c[1].called]

    def answer(self, index: int = 0, outcome: Outcome = Outcome.DELIVERED, reply: Reply = OK,
               per_recipient: dict[str, tuple[Outcome, Reply]] | None = None,
               peer_dsn: bool | None = None) -> None:
        """Fire the index-th still pending call."""
        request, d, _ = self.pending()[index]
        results = []
        for r in request.recipients:
            o, rep = (per_recipient or {}).get(r.address, (outcome, reply))
            results.append(RecipientResult(r.address, o, rep, remote_host="mx.remote.example[192.0.2.1]:25",
                                           tls="TLSv1.3 TLS_AES_256_GCM_SHA384", peer_dsn=peer_dsn))
        d.callback(results)


class Tracker:
    def __init__(self) -> None:
        self.events: list[TrackingEvent] = []

    def track(self, event: TrackingEvent) -> None:
        self.events.append(event)

    def ids(self, queue_id: str | None = None) -> list[str]:
        return [e.event_id.value for e in self.events if queue_id is None or e.queue_id == queue_id]

    def of(self, event_id: TrackingEventId) -> list[TrackingEvent]:
        return [e for e in self.events if e.event_id is event_id]


class Harness:
    def __init__(self, config: QueueConfig | None = None, limit: int = 20, **kw: Any) -> None:
        self.clock = task.Clock()
        self.clock.advance(START)
        self.store = MemoryStore(self.clock)
        self.tracker = Tracker()
        self.out = FakeConnector("out")
        self.slow = FakeConnector("slow")
        self.local = FakeConnector("local", kind="maildir")
        for c in (self.out, self.slow, self.local):
            c.clock = self.clock
        send = {
            "out": SendConnectorConfig("out", max_per_destination=limit),
            "slow": SendConnectorConfig("slow", max_per_destination=limit),
            "local": SendConnectorConfig("local", kind="maildir", maildir_root="/tmp/x"),
        }
        routes = [
            RouteConfig(("*",), "out"),
            RouteConfig(("slow.example",), "slow"),
            RouteConfig(("local.example",), "local"),
            RouteConfig(("nowhere.example",), "out", cost=5),
        ]
        # nowhere.example is routed, so make an unroutable domain by a router without "*"
        self.router = StaticRouter(routes if not kw.pop("no_default_route", False) else routes[1:3], send)
        self.config = config or QueueConfig(retry_schedule=(300.0, 600.0, 1200.0), max_lifetime=86400.0,
                                            delay_warning=0.0, max_active=50, poison_threshold=3)
        self.scheduler = DeliveryScheduler(
            self.store, self.router, {"out": self.out, "slow": self.slow, "local": self.local},
            self.config, self.clock, self.tracker, hostname="mx.exmta.example", postmaster="postmaster",
            send_configs=send, **kw,
        )
        self.scheduler.startService()

    def submit(self, *rcpts: str, sender: str = "a@sender.example", notify: tuple[str, ...] | None = None,
               kind: str = "message", params: MailParams | None = None, content: bytes = ORIGINAL) -> str:
        env = Envelope(sender=sender, recipients=[Recipient(r, notify=notify) for r in rcpts],
                       params=params or MailParams(), kind=kind, message_id="<m1@sender.example>")
        return result(self.store.submit(content, env))

    def turn(self) -> None:
        self.clock.advance(0)

    def at(self, t: float) -> None:
        """Advance to START + t."""
        self.clock.advance(START + t - self.clock.seconds())

    def dsns(self) -> list[tuple[str, Envelope, email.message.Message]]:
        """DSNs in the store: (queue id, envelope, parsed message)."""
        out = []
        for qid in self.store.queue_ids():
            env = self.store.envelope(qid)
            if env.kind == "dsn":
                msg = email.message_from_bytes(self.store.content(qid), policy=email.policy.default)
                out.append((qid, env, msg))
        return out

    def stop(self) -> None:
        d = self.scheduler.stopService()
        assert result(d) is None
        assert self.clock.getDelayedCalls() == []


def dsn_actions(msg: email.message.Message) -> list[str]:
    status = msg.get_payload()[1]
    return [block["Action"] for block in status.get_payload()[1:]]


# ---------------------------------------------------------------- pure functions

def test_backoff_uses_schedule_then_repeats_last() -> None:
    schedule = (300.0, 600.0, 1200.0)
    assert [backoff(n, schedule) for n in range(5)] == [300.0, 600.0, 1200.0, 1200.0, 1200.0]
    assert backoff(-1, schedule) == 300.0
    with pytest.raises(ValueError):
        backoff(0, ())


@pytest.mark.parametrize("notify,what,expected", [
    (None, "FAILURE", True), (None, "DELAY", True), (None, "SUCCESS", False),
    (("NEVER",), "FAILURE", False), (("SUCCESS",), "SUCCESS", True), (("SUCCESS",), "FAILURE", False),
    (("FAILURE", "DELAY"), "DELAY", True), (("failure",), "FAILURE", True),
])
def test_wants_notify(notify: tuple[str, ...] | None, what: str, expected: bool) -> None:
    assert wants_notify(notify, what) is expected


# ---------------------------------------------------------------- delivery basics

def test_new_mail_is_delivered_and_removed() -> None:
    h = Harness()
    qid = h.submit("b@remote.example", "c@remote.example")
    assert h.out.calls == []  # claim happens on the next turn, not inside commit
    h.turn()
    [(request, _, _)] = h.out.calls
    assert request.queue_id == qid and request.nexthop == "remote.example"
    assert [r.address for r in request.recipients] == ["b@remote.example", "c@remote.example"]
    assert request.open_content().read() == ORIGINAL
    assert h.store.queue_of(qid) == "active"
    h.out.answer()
    assert h.store.queue_of(qid) is None
    sends = h.tracker.of(TrackingEventId.SEND)
    assert [e.recipients for e in sends] == [("b@remote.example",), ("c@remote.example",)]
    assert sends[0].remote_host == "mx.remote.example[192.0.2.1]:25"
    assert sends[0].reply == "250 2.0.0 OK queued" and sends[0].tls.startswith("TLSv1.3")
    assert sends[0].connector == "out" and sends[0].message_id == "<m1@sender.example>"
    assert h.dsns() == []
    h.stop()


def test_wake_is_coalesced_into_one_claim() -> None:
    h = Harness()
    ids = [h.submit(f"u{i}@remote.example") for i in range(3)]
    h.turn()
    # the start-up wake and the three commits made one claim
    assert h.store.claims == [(START, 50, ids)]
    assert len(h.out.calls) == 3
    for _ in range(3):
        h.out.answer()
    h.stop()


def test_local_delivery_is_tracked_as_deliver() -> None:
    h = Harness()
    h.submit("u@local.example")
    h.turn()
    h.local.answer()
    assert h.tracker.ids() == ["DELIVER"]
    assert h.tracker.events[0].source == "STOREDRIVER"
    h.stop()


def test_retry_schedule_timing_is_exact() -> None:
    h = Harness()
    qid = h.submit("b@remote.example")
    h.turn()
    times = []
    for step in range(5):
        assert len(h.out.pending()) == 1, step
        times.append(h.out.pending()[0][2] - START)
        h.out.answer(outcome=Outcome.DEFERRED, reply=LATER)
        env = h.store.envelope(qid)
        due = h.store.due(qid)
        assert env.recipients[0].next_attempt == due
        # nothing happens a moment before the due time
        h.clock.advance(due - h.clock.seconds() - 0.001)
        assert h.out.pending() == []
        h.clock.advance(0.001)
    assert times == [0.0, 300.0, 900.0, 2100.0, 3300.0]
    assert h.store.envelope(qid).recipients[0].attempts == 5
    assert h.tracker.ids().count("DEFER") == 5
    defer_event = h.tracker.of(TrackingEventId.DEFER)[0]
    assert defer_event.reply == "451 4.4.1 Connection timed out"
    assert defer_event.details["next_attempt"] == START + 300
    h.out.answer()
    assert h.store.queue_of(qid) is None
    h.stop()


def test_partial_result_retries_only_the_deferred_recipient() -> None:
    h = Harness()
    qid = h.submit("ok@remote.example", "later@remote.example")
    h.turn()
    h.out.answer(per_recipient={"later@remote.example": (Outcome.DEFERRED, LATER)})
    env = h.store.envelope(qid)
    assert [r.status for r in env.recipients] == [RecipientStatus.DELIVERED, RecipientStatus.PENDING]
    h.at(300)
    [(request, _, _)] = h.out.pending()
    assert [r.address for r in request.recipients] == ["later@remote.example"]
    h.out.answer()
    assert h.store.queue_of(qid) is None
    assert h.tracker.ids() == ["SEND", "DEFER", "SEND"]
    h.stop()


def test_recipients_with_different_due_times_in_one_message() -> None:
    h = Harness()
    qid = h.submit("a@one.example", "b@two.example")
    h.turn()
    assert len(h.out.pending()) == 2  # two destinations, two deliveries
    h.out.answer(0, Outcome.DEFERRED, LATER)          # a: retry at 300
    h.out.answer(0, Outcome.DEFERRED, LATER)          # b: retry at 300
    h.at(300)
    h.out.answer(0, Outcome.DEFERRED, LATER)          # a: second failure -> 300 + 600
    h.out.answer(0, Outcome.DEFERRED, LATER)          # b too
    assert h.store.due(qid) == START + 900
    h.at(900)
    h.out.answer(0)                                   # a delivered
    h.out.answer(0, Outcome.DEFERRED, LATER)          # b -> 900 + 1200
    env = h.store.envelope(qid)
    assert h.store.due(qid) == START + 2100 == env.recipients[1].next_attempt
    h.at(2100)
    [(request, _, _)] = h.out.pending()
    assert [r.address for r in request.recipients] == ["b@two.example"]
    h.out.answer()
    h.stop()


# ---------------------------------------------------------------- failures, bounces, NOTIFY

def test_permanent_failure_bounces_to_sender_and_the_dsn_is_delivered() -> None:
    h = Harness()
    qid = h.submit("nobody@remote.example")
    h.turn()
    h.out.answer(outcome=Outcome.FAILED, reply=NO_SUCH_USER)
    assert h.store.queue_of(qid) is None
    [(dsn_id, dsn_env, msg)] = h.dsns()
    assert dsn_env.sender == "" and dsn_env.kind == "dsn"
    assert [r.address for r in dsn_env.recipients] == ["a@sender.example"]
    assert msg.get_content_type() == "multipart/report"
    assert dsn_actions(msg) == ["failed"]
    block = msg.get_payload()[1].get_payload()[1]
    assert block["Status"] == "5.1.1" and block["Remote-MTA"] == "dns; mx.remote.example"
    assert h.tracker.ids(qid) == ["FAIL", "DSN"]
    assert h.tracker.of(TrackingEventId.DSN)[0].details["dsn_queue_id"] == dsn_id
    # the DSN is itself queued and delivered by the scheduler
    h.turn()
    [(request, _, _)] = h.out.pending()
    assert request.queue_id == dsn_id and request.nexthop == "sender.example"
    h.out.answer()
    assert h.store.queue_ids() == []
    h.stop()


@pytest.mark.parametrize("notify,bounced", [
    (None, True), (("FAILURE",), True), (("SUCCESS", "FAILURE"), True),
    (("NEVER",), False), (("SUCCESS",), False), (("DELAY",), False),
])
def test_notify_controls_failure_dsn(notify: tuple[str, ...] | None, bounced: bool) -> None:
    h = Harness()
    h.submit("nobody@remote.example", notify=notify)
    h.turn()
    h.out.answer(outcome=Outcome.FAILED, reply=NO_SUCH_USER)
    assert len(h.dsns()) == (1 if bounced else 0)
    assert h.tracker.ids().count("DSN") == (1 if bounced else 0)
    assert h.tracker.ids()[0] == "FAIL"
    h.turn()
    for _ in h.out.pending():
        h.out.answer()
    h.stop()


def test_mixed_notify_in_one_message_bounces_only_who_asked() -> None:
    h = Harness()
    env = Envelope(sender="a@sender.example", recipients=[
        Recipient("quiet@remote.example", notify=("NEVER",)),
        Recipient("loud@remote.example"),
        Recipient("orig@remote.example", notify=("FAILURE",), orcpt="rfc822;Original@Remote.Example"),
    ], params=MailParams(ret="HDRS", envid="E-7"))
    qid = result(h.store.submit(ORIGINAL, env))
    h.turn()
    h.out.answer(outcome=Outcome.FAILED, reply=NO_SUCH_USER)
    [(_, _, msg)] = h.dsns()
    blocks = msg.get_payload()[1].get_payload()
    assert blocks[0]["Original-Envelope-Id"] == "E-7"
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; loud@remote.example", "rfc822; orig@remote.example"]
    assert blocks[2]["Original-Recipient"] == "rfc822;Original@Remote.Example"
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"  # RET=HDRS
    assert [e.recipients for e in h.tracker.of(TrackingEventId.DSN)] == [
        ("loud@remote.example", "orig@remote.example")]
    assert h.store.queue_of(qid) is None
    h.turn()
    h.out.answer()
    h.stop()


@pytest.mark.parametrize("sender,kind", [("", "message"), ("a@sender.example", "dsn")])
def test_never_bounce_to_null_sender_or_for_a_dsn(sender: str, kind: str) -> None:
    h = Harness(QueueConfig(retry_schedule=(300.0,), max_lifetime=1000.0, delay_warning=500.0))
    qid = h.submit("nobody@remote.example", "later@remote.example", sender=sender, kind=kind)
    h.turn()
    h.out.answer(per_recipient={"nobody@remote.example": (Outcome.FAILED, NO_SUCH_USER),
                                "later@remote.example": (Outcome.DEFERRED, LATER)})
    for t in (300, 600, 900, 1000):
        h.at(t)
        h.out.answer(outcome=Outcome.DEFERRED, reply=LATER)
    assert h.store.queue_of(qid) is None
    assert h.dsns() == []
    assert "DSN" not in h.tracker.ids()
    assert h.tracker.ids().count("EXPIRE") == 1 and h.tracker.ids().count("FAIL") == 1
    h.stop()


def test_unroutable_recipient_fails_with_5_4_4() -> None:
    h = Harness(no_default_route=True)
    qid = h.submit("x@unknown.example", "u@local.example")
    h.turn()
    h.local.answer()
    assert h.store.queue_of(qid) is None
    fail = h.tracker.of(TrackingEventId.FAIL)[0]
    assert fail.recipients == ("x@unknown.example",) and fail.reply == "550 5.4.4 Unable to route"
    [(_, _, msg)] = h.dsns()
    block = msg.get_payload()[1].get_payload()[1]
    assert block["Final-Recipient"] == "rfc822; x@unknown.example" and block["Status"] == "5.4.4"
    h.stop()


def test_success_dsn_only_for_local_delivery_with_notify_success() -> None:
    h = Harness()
    h.submit("u@local.example", "r@remote.example", notify=("SUCCESS",))
    h.turn()
    h.local.answer()
    h.out.answer()
    [(_, dsn_env, msg)] = h.dsns()
    assert dsn_actions(msg) == ["delivered"]
    block = msg.get_payload()[1].get_payload()[1]
    assert block["Final-Recipient"] == "rfc822; u@local.example" and block["Status"] == "2.0.0"
    assert msg["Subject"] == "Delivered: hello"
    # headers only for a success report
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
    h.turn()
    h.out.answer()
    h.stop()


@pytest.mark.parametrize("peer_dsn, relayed", [(False, True), (True, False), (None, False)])
def test_relayed_dsn_when_the_next_hop_cannot_report_delivery(peer_dsn, relayed) -> None:
    """RFC 3461 5.2.2: NOTIFY=SUCCESS and a next hop without DSN -> action=relayed from us; a hop
    with DSN got the NOTIFY and reports itself; None (not an SMTP hop) says nothing either way."""
    h = Harness()
    h.submit("r@remote.example", notify=("SUCCESS",))
    h.turn()
    h.out.answer(peer_dsn=peer_dsn)
    if not relayed:
        assert h.dsns() == []
        h.stop()
        return
    [(_, dsn_env, msg)] = h.dsns()
    assert dsn_actions(msg) == ["relayed"]
    block = msg.get_payload()[1].get_payload()[1]
    assert block["Final-Recipient"] == "rfc822; r@remote.example" and block["Status"] == "2.0.0"
    assert block["Remote-MTA"] == "dns; mx.remote.example"
    assert msg["Subject"] == "Relayed: hello"
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert "didn't send a delivery notification" in msg.get_payload()[0].get_content()
    h.turn()
    h.out.answer()  # the DSN itself is delivered
    h.stop()


def test_expiry_bounces_with_last_reply() -> None:
    h = Harness(QueueConfig(retry_schedule=(300.0,), max_lifetime=1000.0, delay_warning=0.0))
    qid = h.submit("b@remote.example")
    h.turn()
    times = []
    while h.store.queue_of(qid) is not None:
        times.append(h.out.pending()[0][2] - START)
        h.out.answer(outcome=Outcome.DEFERRED, reply=LATER)
        due = h.store.due(qid) if h.store.queue_of(qid) else None
        if due is not None:
            h.at(due - START)
    assert times == [0.0, 300.0, 600.0, 900.0, 1000.0]  # the last try is at expiry
    assert h.tracker.ids(qid)[-2:] == ["EXPIRE", "DSN"]
    expire = h.tracker.of(TrackingEventId.EXPIRE)[0]
    assert expire.reply == "550 5.4.7 QUEUE.Expired; message expired"
    [(_, _, msg)] = h.dsns()
    block = msg.get_payload()[1].get_payload()[1]
    assert block["Action"] == "failed" and block["Status"] == "5.4.7"
    assert block["Diagnostic-Code"] == "smtp; 451 4.4.1 Connection timed out"
    assert msg.get_payload()[2].get_content_type() == "message/rfc822"
    h.turn()
    h.out.answer()
    h.stop()


def test_delay_warning_sent_once_and_on_time() -> None:
    h = Harness(QueueConfig(retry_schedule=(300.0,), max_lifetime=10000.0, delay_warning=500.0))
    qid = h.submit("b@remote.example")
    h.turn()
    times = []
    for _ in range(5):
        [(_, _, t)] = [c for c in h.out.pending() if c[0].queue_id == qid]
        times.append(t - START)
        index = [i for i, c in enumerate(h.out.pending()) if c[0].queue_id == qid][0]
        h.out.answer(index, outcome=Outcome.DEFERRED, reply=LATER)
        for c in [c for c in h.out.pending() if c[0].queue_id != qid]:
            h.out.answer(h.out.pending().index(c))  # deliver the DSN
        h.at(h.store.due(qid) - START)
    assert times == [0.0, 300.0, 500.0, 800.0, 1100.0]  # the retry before the warning moved to 500
    dsn_events = h.tracker.of(TrackingEventId.DSN)
    assert len(dsn_events) == 1 and dsn_events[0].timestamp == START + 500
    assert dsn_events[0].details["action"] == "delayed"
    assert h.store.envelope(qid).recipients[0].delay_notified is True
    h.out.answer()
    assert h.store.queue_ids() == []
    h.stop()


def test_delay_warning_content() -> None:
    h = Harness(QueueConfig(retry_schedule=(600.0,), max_lifetime=10000.0, delay_warning=500.0))
    qid = h.submit("b@remote.example")
    h.turn()
    h.out.answer(outcome=Outcome.DEFERRED, reply=LATER)
    assert h.store.due(qid) == START + 500
    h.at(500)
    h.out.answer(outcome=Outcome.DEFERRED, reply=LATER)
    [(_, dsn_env, msg)] = h.dsns()
    assert dsn_actions(msg) == ["delayed"]
    block = msg.get_payload()[1].get_payload()[1]
    assert block["Status"] == "4.4.1" and block["Will-Retry-Until"]
    assert msg["Subject"] == "Delivery delayed: hello"
    assert h.store.due(qid) == START + 1100  # back on the normal schedule
    h.turn()
    h.out.answer()
    h.stop()


@pytest.mark.parametrize("notify,warned", [(None, True), (("DELAY",), True), (("FAILURE",), False),
                                           (("NEVER",), False)])
def test_notify_controls_delay_warning(notify: tuple[str, ...] | None, warned: bool) -> None:
    h = Harness(QueueConfig(retry_schedule=(600.0,), max_lifetime=10000.0, delay_warning=500.0))
    qid = h.submit("b@remote.example", notify=notify)
    h.turn()
    h.out.answer(outcome=Outcome.DEFERRED, reply=LATER)
    assert h.store.due(qid) == START + (500 if warned else 600)
    h.at(600)
    h.out.answer(outcome=Outcome.DEFERRED, reply=LATER)
    assert [dsn_actions(m) for _, _, m in h.dsns()] == ([["delayed"]] if warned else [])
    h.stop()


# ---------------------------------------------------------------- concurrency, slow start, fairness

def test_per_destination_concurrency_cap() -> None:
    h = Harness(limit=2)
    for i in range(5):
        h.submit(f"u{i}@remote.example")
    h.submit("v@other.example")
    h.turn()
    by_hop = [c[0].nexthop for c in h.out.pending()]
    assert by_hop.count("remote.example") == 2 and by_hop.count("other.example") == 1
    stats = h.scheduler.stats()["destinations"]["out/remote.example"]
    assert stats["active"] == 2 and stats["waiting"] == 3 and stats["window"] == 2
    h.out.answer(0)
    assert [c[0].nexthop for c in h.out.pending()].count("remote.example") == 2
    while h.out.pending():
        h.out.answer(0)
    assert h.store.queue_ids() == []
    h.stop()


def test_slow_start_after_failure() -> None:
    h = Harness(limit=8)
    h.submit("first@remote.example")
    h.turn()
    h.out.answer(outcome=Outcome.DEFERRED, reply=LATER)
    assert h.scheduler.stats()["destinations"]["out/remote.example"]["window"] == 1
    for i in range(12):
        h.submit(f"u{i}@remote.example")
    h.turn()
    in_flight = []
    for _ in range(4):
        in_flight.append(len(h.out.pending()))
        assert h.scheduler.stats()["destinations"]["out/remote.example"]["window"] == in_flight[-1]
        h.out.answer(0)
    assert in_flight == [1, 2, 4, 8]  # one success at a time doubles the window up to the limit
    while h.out.pending():
        assert len(h.out.pending()) <= 8
        h.out.answer(0)
    assert h.scheduler.stats()["destinations"].get("out/remote.example") is None  # healthy and idle: forgotten
    h.at(300)
    h.out.answer()
    h.stop()


def test_failed_destination_state_expires_when_idle() -> None:
    h = Harness(limit=4, destination_ttl=100.0)
    qid = h.submit("x@remote.example")
    h.turn()
    h.out.answer(outcome=Outcome.DEFERRED, reply=LATER)
    assert h.scheduler.stats()["destinations"]["out/remote.example"]["window"] == 1
    h.clock.advance(150)
    for i in range(3):
        h.submit(f"u{i}@remote.example")
    h.turn()
    assert len(h.out.pending()) == 3
    while h.out.pending():
        h.out.answer(0)
    h.at(300)
    h.out.answer()
    assert h.store.queue_of(qid) is None
    h.stop()


def test_slow_destination_does_not_block_others() -> None:
    # window of 8 messages, 2 per destination, a backlog of at most 2 waiting per destination
    h = Harness(QueueConfig(retry_schedule=(300.0,), max_active=8), limit=2)
    slow_ids = [h.submit(f"s{i}@slow.example") for i in range(10)]
    fast_ids = [h.submit(f"f{i}@fast.example") for i in range(4)]
    h.turn()
    assert len(h.slow.pending()) == 2
    for _ in range(10):
        if not h.out.pending():
            h.turn()
        if h.out.pending():
            h.out.answer(0)
    # the fast destination got through while the slow one holds its two slots
    assert all(h.store.queue_of(q) is None for q in fast_ids)
    assert len(h.slow.pending()) == 2
    assert sum(h.store.queue_of(q) == "deferred" for q in slow_ids) >= 4  # backlog put back
    requeued = [h.store.envelope(q) for q in slow_ids if h.store.queue_of(q) == "deferred"]
    assert all(e.recipients[0].attempts == 0 for e in requeued)  # not counted as an attempt
    # let everything finish
    h.slow.auto = lambda req: [RecipientResult(r.address, Outcome.DELIVERED, OK) for r in req.recipients]
    while h.slow.pending():
        h.slow.answer(0)
    h.clock.advance(3600)
    assert h.store.queue_ids() == []
    h.stop()


def test_failing_destination_is_suspended_without_connections() -> None:
    h = Harness(limit=10)
    first = [h.submit(f"u{i}@remote.example") for i in range(3)]
    h.turn()
    assert len(h.out.pending()) == 3
    for _ in range(3):
        h.out.answer(0, Outcome.DEFERRED, LATER)
    dest = h.scheduler.stats()["destinations"]["out/remote.example"]
    assert dest["failures"] == 3 and dest["suspended_until"] == START + 300 and dest["window"] == 1
    h.clock.advance(10)
    later = [h.submit(f"v{i}@remote.example") for i in range(2)]
    other = h.submit("w@other.example")
    h.turn()
    assert [c[0].queue_id for c in h.out.pending()] == [other]  # only the healthy destination
    h.out.answer()
    for qid in later:
        env = h.store.envelope(qid)
        assert env.recipients[0].attempts == 0
        assert env.recipients[0].last_reply.text.startswith("Delivery to remote.example temporarily suspended")
        assert str(env.recipients[0].last_reply).count(f"{LATER.code} {LATER.status}") <= 1  # said once
        assert h.store.due(qid) == START + 300
    assert h.tracker.ids(later[0]) == ["DEFER"]
    # at 300 all five are due; the destination is probed with one connection, then opens up
    h.at(300)
    assert len(h.out.pending()) == 1
    h.out.answer()
    assert len(h.out.pending()) == 2
    while h.out.pending():
        h.out.answer(0)
    assert all(h.store.queue_of(q) is None for q in first + later)
    h.stop()


def test_stats_snapshot() -> None:
    h = Harness(limit=1)
    h.submit("a@remote.example")
    h.submit("b@remote.example")
    h.turn()
    stats = h.scheduler.stats()
    assert stats["running"] is True and stats["active_messages"] == 2 and stats["in_flight"] == 1
    assert stats["max_active"] == 50
    assert stats["destinations"] == {"out/remote.example": {
        "connector": "out", "nexthop": "remote.example", "active": 1, "window": 1, "limit": 1,
        "waiting": 1, "failures": 0, "suspended_until": None,
    }}
    h.out.answer()
    h.out.answer()
    assert h.scheduler.stats()["destinations"] == {}
    h.stop()


def test_one_message_to_local_and_remote_destinations() -> None:
    h = Harness()
    qid = h.submit("u@local.example", "r@remote.example", "s@slow.example")
    h.turn()
    assert len(h.local.pending()) == len(h.out.pending()) == len(h.slow.pending()) == 1
    h.local.answer()
    h.out.answer(outcome=Outcome.FAILED, reply=NO_SUCH_USER)
    assert h.store.queue_of(qid) == "active" and h.dsns() == []  # the bounce waits for the whole attempt
    h.slow.answer(outcome=Outcome.DEFERRED, reply=LATER)
    assert h.store.queue_of(qid) == "deferred"
    [(_, _, msg)] = h.dsns()
    assert [b["Final-Recipient"] for b in msg.get_payload()[1].get_payload()[1:]] == ["rfc822; r@remote.example"]
    assert sorted(h.tracker.ids(qid)) == ["DEFER", "DELIVER", "DSN", "FAIL"]
    h.turn()
    h.out.answer()  # the DSN
    h.at(300)
    h.slow.answer()
    assert h.store.queue_ids() == []
    h.stop()


# ---------------------------------------------------------------- crashes, poison, timeouts

def test_crashing_connector_makes_a_poison_message() -> None:
    h = Harness()
    calls = []

    def crash(request: DeliveryRequest) -> Any:
        calls.append(h.clock.seconds() - START)
        raise RuntimeError("connector bug")

    h.out.auto = crash
    qid = h.submit("b@remote.example")
    h.turn()
    h.at(300)
    h.at(900)
    assert calls == [0.0, 300.0, 900.0]
    assert h.store.queue_of(qid) == "hold"
    [held] = result(h.store.list_messages("hold"))
    assert held.crashes == 3 and "poison" in held.held_reason
    assert held.recipients[0].last_reply == Reply.make(451, "4.3.0", "Internal error in the send connector")
    assert h.tracker.ids(qid) == ["DEFER", "DEFER", "DEFER", "POISONMESSAGE"]
    h.clock.advance(100000)
    assert calls == [0.0, 300.0, 900.0]  # held: never retried
    h.stop()


def test_message_that_crashed_the_process_is_held_on_claim() -> None:
    h = Harness()
    env = Envelope(sender="a@sender.example", recipients=[Recipient("b@remote.example")], crashes=3)
    qid = result(h.store.submit(ORIGINAL, env))
    h.turn()
    assert h.out.calls == []
    assert h.store.queue_of(qid) == "hold"
    assert h.tracker.ids(qid) == ["POISONMESSAGE"]
    h.stop()


def test_errback_counts_as_crash_and_recovers() -> None:
    h = Harness()
    qid = h.submit("b@remote.example")
    h.turn()
    h.out.pending()[0][1].errback(RuntimeError("bug"))
    assert h.store.envelope(qid).crashes == 1
    h.at(300)
    h.out.answer()
    assert h.store.queue_of(qid) is None
    h.stop()


def test_missing_and_unknown_results_are_deferred() -> None:
    h = Harness()
    qid = h.submit("a@remote.example", "b@remote.example")
    h.turn()
    h.out.pending()[0][1].callback([
        RecipientResult("a@remote.example", Outcome.DELIVERED, OK),
        RecipientResult("zzz@remote.example", Outcome.DELIVERED, OK),
    ])
    env = h.store.envelope(qid)
    assert env.recipients[0].status is RecipientStatus.DELIVERED
    assert env.recipients[1].status is RecipientStatus.PENDING
    assert env.recipients[1].last_reply.status == "4.3.0"
    h.at(300)
    h.out.answer()
    h.stop()


def test_connector_timeout_is_a_deferral_not_a_crash() -> None:
    h = Harness(delivery_timeout=60.0)
    qid = h.submit("b@remote.example")
    h.turn()
    h.clock.advance(60)
    env = h.store.envelope(qid)
    assert env.crashes == 0 and env.recipients[0].last_reply.status == "4.4.2"
    assert h.store.due(qid) == START + 60 + 300
    h.at(360)
    h.out.answer()
    h.stop()


# ---------------------------------------------------------------- start and stop

def test_graceful_stop_waits_for_in_flight() -> None:
    h = Harness(limit=1)
    a = h.submit("a@remote.example")
    b = h.submit("b@remote.example")
    h.turn()
    assert len(h.out.pending()) == 1
    d = h.scheduler.stopService()
    assert not d.called
    assert h.store.queue_of(b) == "deferred"  # never started: back to the queue, unchanged
    assert h.store.envelope(b).recipients[0].attempts == 0
    assert h.store.due(b) == START
    h.out.answer()
    assert result(d) is None
    assert h.store.queue_of(a) is None
    assert h.clock.getDelayedCalls() == []


def test_stop_deadline_leaves_the_rest_for_recover() -> None:
    h = Harness(stop_timeout=10.0)
    qid = h.submit("a@remote.example")
    h.turn()
    [(_, call, _)] = h.out.pending()
    d = h.scheduler.stopService()
    h.clock.advance(9.9)
    assert not d.called
    h.clock.advance(0.1)
    assert result(d) is None
    assert call.called  # cancelled
    assert h.store.queue_of(qid) == "active"
    assert h.tracker.ids() == []
    assert h.clock.getDelayedCalls() == []
    assert result(h.store.recover()) == 1


def test_restart_picks_up_deferred_mail_on_its_timer() -> None:
    h = Harness()
    qid = h.submit("a@remote.example")
    h.turn()
    h.out.answer(outcome=Outcome.DEFERRED, reply=LATER)
    h.stop()
    h.clock.advance(1000)
    assert h.out.pending() == []
    h.scheduler.startService()
    h.turn()
    [(request, _, _)] = h.out.pending()
    assert request.queue_id == qid
    h.out.answer()
    h.stop()


def test_active_window_limits_claims() -> None:
    h = Harness(QueueConfig(max_active=2))
    ids = [h.submit(f"u{i}@d{i}.example") for i in range(5)]
    h.turn()
    assert len(h.out.pending()) == 2
    assert h.scheduler.stats()["active_messages"] == 2
    assert [h.store.queue_of(q) for q in ids].count("incoming") == 3
    h.out.answer(0)
    h.turn()
    assert len(h.out.pending()) == 2
    while h.out.pending():
        h.out.answer(0)
        h.turn()
    assert h.store.queue_ids() == []
    h.stop()


def test_failed_claim_is_retried_later() -> None:
    h = Harness(claim_retry=5.0)
    real_claim = h.store.claim
    failures = []

    def flaky_claim(now: float, limit: int) -> defer.Deferred[Any]:
        if not failures:
            failures.append(now)
            return defer.fail(OSError("disk hiccup"))
        return real_claim(now, limit)

    h.store.claim = flaky_claim  # type: ignore[method-assign]
    qid = h.submit("a@remote.example")
    h.turn()
    assert failures == [START] and h.out.pending() == []
    h.clock.advance(4.9)
    assert h.out.pending() == []
    h.clock.advance(0.1)
    [(request, _, _)] = h.out.pending()
    assert request.queue_id == qid
    h.out.answer()
    h.stop()


def test_from_config_wiring_and_router_swap() -> None:
    from exmta.config.schema import Config

    clock = task.Clock()
    store = MemoryStore(clock)
    out, hub = FakeConnector("out"), FakeConnector("hub")
    out.clock = hub.clock = clock
    config = Config(
        hostname="relay.exmta.example",
        send=(SendConnectorConfig("out", max_per_destination=1), SendConnectorConfig("hub")),
        routes=(RouteConfig(("*",), "out"),),
        queue=QueueConfig(max_active=7),
    )
    scheduler = DeliveryScheduler.from_config(config, store, {"out": out, "hub": hub}, clock, stop_timeout=5.0)
    scheduler.startService()
    result(store.submit(ORIGINAL, Envelope("a@sender.example", [Recipient("x@remote.example")])))
    result(store.submit(ORIGINAL, Envelope("a@sender.example", [Recipient("y@remote.example")])))
    clock.advance(0)
    assert len(out.pending()) == 1  # max_per_destination from the send connector config
    assert scheduler.stats()["max_active"] == 7
    scheduler.set_router(StaticRouter([RouteConfig(("*",), "hub")], ["out", "hub"]))
    result(store.submit(ORIGINAL, Envelope("a@sender.example", [Recipient("z@else.example")])))
    clock.advance(0)
    assert [c[0].nexthop for c in hub.pending()] == ["else.example"]
    out.answer()
    out.answer()
    hub.answer()
    assert store.queue_ids() == []
    assert result(scheduler.stopService()) is None
    assert clock.getDelayedCalls() == []


def test_failed_store_update_is_retried_with_backoff() -> None:
    h = Harness(claim_retry=5.0)
    real_update = h.store.update
    failures: list[float] = []

    def flaky_update(queue_id: str, env: Envelope, next_attempt: float | None) -> defer.Deferred[Any]:
        if len(failures) < 2:
            failures.append(h.clock.seconds() - START)
            return defer.fail(OSError("disk full"))
        return real_update(queue_id, env, next_attempt)

    h.store.update = flaky_update  # type: ignore[method-assign]
    qid = h.submit("a@remote.example")
    h.turn()
    h.out.answer()
    assert h.store.queue_of(qid) == "active" and h.scheduler.stats()["active_messages"] == 1
    h.clock.advance(5)
    h.clock.advance(10)
    assert failures == [0.0, 5.0]
    assert h.store.queue_of(qid) is None and h.scheduler.stats()["active_messages"] == 0
    h.stop()


def test_stop_deadline_cancels_store_retries() -> None:
    h = Harness(claim_retry=5.0, stop_timeout=3.0)
    h.store.update = lambda *a: defer.fail(OSError("disk full"))  # type: ignore[method-assign]
    qid = h.submit("a@remote.example")
    h.turn()
    h.out.answer()
    d = h.scheduler.stopService()
    h.clock.advance(3)
    assert result(d) is None
    assert h.clock.getDelayedCalls() == []
    assert h.store.queue_of(qid) == "active"


def test_synchronous_connector() -> None:
    h = Harness()
    h.out.auto = lambda req: [RecipientResult(r.address, Outcome.DELIVERED, OK) for r in req.recipients]
    ids = [h.submit(f"u{i}@remote.example") for i in range(30)]
    h.turn()
    assert all(h.store.queue_of(q) is None for q in ids)
    assert len(h.tracker.of(TrackingEventId.SEND)) == 30
    h.stop()


def test_unknown_connector_in_route_defers() -> None:
    h = Harness()
    del h.scheduler._connectors["out"]  # wiring mistake: route names a connector we do not have
    qid = h.submit("a@remote.example")
    h.turn()
    env = h.store.envelope(qid)
    assert env.recipients[0].last_reply.status == "4.4.0" and env.recipients[0].status is RecipientStatus.PENDING
    h.stop()



def test_suspended_destination_reply_does_not_repeat_the_code() -> None:
    """``451 4.4.1 Delivery to X temporarily suspended: 451 4.4.1 Connection ... failed`` said the code twice."""
    refused = Reply.make(451, "4.4.1", "Connection to 192.0.2.9:25 failed: refused")
    h = Harness(limit=10)
    for i in range(3):
        h.submit(f"u{i}@remote.example")
    h.turn()
    for _ in range(3):
        h.out.answer(0, Outcome.DEFERRED, refused)
    h.clock.advance(10)
    qid = h.submit("v@remote.example")
    h.turn()
    assert str(h.store.envelope(qid).recipients[0].last_reply) == (
        "451 4.4.1 Delivery to remote.example temporarily suspended: Connection to 192.0.2.9:25 failed: refused")
    h.stop()
