"""Operator actions on the DeliveryScheduler, on task.Clock with MemoryStore: suspend, redirect, latency."""
from __future__ import annotations

from typing import Any

from twisted.internet import defer, task

from exmta.config.schema import QueueConfig, RouteConfig, SendConnectorConfig
from exmta.model import DeliveryRequest, Envelope, Outcome, Recipient, RecipientResult, Reply, TrackingEventId
from exmta.queue.scheduler import DeliveryScheduler
from exmta.routing import StaticRouter
from exmta.testing.memstore import MemoryStore

START = 1_700_000_000.0
OK = Reply.make(250, "2.0.0", "OK")


class Connector:
    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[DeliveryRequest] = []

    def deliver(self, request: DeliveryRequest) -> Any:
        self.requests.append(request)
        return defer.succeed([RecipientResult(r.address, Outcome.DELIVERED, OK, remote_host="mx[192.0.2.1]:25",
                                              tls="TLSv1.3 TLS_AES_128_GCM_SHA256") for r in request.recipients])


class Tracker:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def track(self, event: Any) -> None:
        self.events.append(event)


def harness() -> tuple[task.Clock, MemoryStore, DeliveryScheduler, Connector, Tracker]:
    clock = task.Clock()
    clock.advance(START)
    store = MemoryStore(clock)
    out = Connector("out")
    tracker = Tracker()
    send = {"out": SendConnectorConfig("out")}
    sched = DeliveryScheduler(store, StaticRouter([RouteConfig(("*",), "out")], send), {"out": out},
                              QueueConfig(retry_schedule=(300.0,), max_lifetime=86400.0, delay_warning=0.0),
                              clock, tracker, send_configs=send)
    sched.startService()
    return clock, store, sched, out, tracker


def submit(store: MemoryStore, clock: task.Clock, rcpt: str = "b@remote.example") -> str:
    env = Envelope(sender="a@sender.example", recipients=[Recipient(rcpt)], message_id="<m@sender.example>",
                   received_at=clock.seconds())
    out: list[str] = []
    store.submit(b"Subject: x\r\n\r\nbody\r\n", env).addCallback(out.append)
    return out[0]


def test_suspended_destination_is_not_tried_and_counts_no_attempt() -> None:
    clock, store, sched, out, tracker = harness()
    sched.suspend_destination("out", "remote.example")  # an MX connector: one destination per domain
    qid = submit(store, clock)
    clock.advance(0)
    assert out.requests == []
    env = store.envelope(qid)
    assert env.recipients[0].attempts == 0 and env.recipients[0].next_attempt == START + 300
    assert [e.event_id for e in tracker.events] == []  # a skip is not a deferral
    assert sched.destination_state("out", "remote.example")["suspended_by_operator"] == "suspended by an operator"
    assert sched.resume_destination("out", "remote.example")
    assert not sched.resume_destination("out", "remote.example")
    clock.advance(300)
    assert len(out.requests) == 1
    (sent,) = [e for e in tracker.events if e.event_id is TrackingEventId.SEND]
    assert sent.details["latency"] == 300.0 and sent.tls == "TLSv1.3 TLS_AES_128_GCM_SHA256"
    sched.stopService()


def test_redirect_routes_everything_to_the_target() -> None:
    clock, store, sched, out, tracker = harness()
    drain = Connector("redirect")
    sched.set_redirect("redirect", drain, "[192.0.2.26]:25")
    assert sched.redirect == ("redirect", "[192.0.2.26]:25")
    qid = submit(store, clock)
    env = store.envelope(qid)
    assert [(r.connector, r.nexthop) for r in sched.routes_for(env)] == [("redirect", "[192.0.2.26]:25")]
    clock.advance(0)
    assert out.requests == [] and len(drain.requests) == 1
    assert drain.requests[0].nexthop == "[192.0.2.26]:25"
    ids = [e.event_id for e in tracker.events if e.queue_id == qid]
    assert ids == [TrackingEventId.REDIRECT, TrackingEventId.SEND]
    sched.set_redirect(None)
    assert sched.redirect is None
    sched.stopService()
