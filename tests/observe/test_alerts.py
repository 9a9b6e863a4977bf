"""Alert rules on task.Clock: firing once, repeating, clearing with hysteresis; mail and webhook."""
from __future__ import annotations

import json
import subprocess
from email import message_from_bytes
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.web import resource, server

from exmta.model import TrackingEvent, TrackingEventId
from exmta.observe.alerts import (
    AlertManager, AlertRule, LogNotifier, MailNotifier, Sources, WebhookNotifier, cert_days_left,
)
from exmta.observe.metrics import QueueSnapshot, Throughput
from exmta.testing.memstore import MemoryStore


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, float]] = []

    def notify(self, state: str, alert: Any, now: float) -> None:
        self.calls.append((state, alert.rule.name, alert.value, now))


def queue_of(n: int, clock: task.Clock) -> QueueSnapshot:
    snap = QueueSnapshot(clock.seconds())
    snap.by_queue = {"deferred": n}
    snap.by_nexthop = {"relay/example.net": n} if n else {}
    snap.oldest = clock.seconds() - 10 if n else None
    return snap


def test_fires_once_repeats_and_clears_with_hysteresis() -> None:
    clock = task.Clock()
    size = {"n": 0}
    rec = Recorder()
    mgr = AlertManager(clock, [AlertRule("queue", "queue_length", threshold=100)],
                       Sources(snapshot=lambda: queue_of(size["n"], clock)), [rec],
                       interval=30, repeat=300)
    mgr.start()
    clock.advance(30)
    assert rec.calls == [] and mgr.active == {}

    size["n"] = 150
    clock.advance(30)
    assert [c[0] for c in rec.calls] == ["firing"] and rec.calls[0][2] == 150
    assert "queue" in mgr.active
    # still holding: no new notification until the repeat interval has passed
    clock.advance(30 * 9)  # 270 s after firing
    assert [c[0] for c in rec.calls] == ["firing"]
    clock.advance(30)      # 300 s
    assert [c[0] for c in rec.calls] == ["firing", "repeat"]

    # below the threshold but above threshold * 0.8: hysteresis keeps it active, no notification
    size["n"] = 90
    clock.advance(30)
    assert "queue" in mgr.active and [c[0] for c in rec.calls] == ["firing", "repeat"]
    size["n"] = 80
    clock.advance(30)
    assert mgr.active == {} and [c[0] for c in rec.calls] == ["firing", "repeat", "cleared"]
    # quiet afterwards; a new crossing fires again
    clock.advance(600)
    assert len(rec.calls) == 3
    size["n"] = 101
    clock.advance(30)
    assert [c[0] for c in rec.calls][-1] == "firing"
    mgr.stop()
    assert clock.getDelayedCalls() == []


def test_oldest_message_and_disk_space_below_rule() -> None:
    clock = task.Clock()
    clock.advance(100_000)
    free = {"v": 10 * 2**30}
    snap = QueueSnapshot(clock.seconds())
    snap.by_queue = {"deferred": 1}
    snap.oldest = clock.seconds() - 7200
    rec = Recorder()
    mgr = AlertManager(clock, [AlertRule("old", "oldest_message", threshold=3600),
                               AlertRule("disk", "disk_space", threshold=2**30)],
                       Sources(snapshot=lambda: snap, disk_free=lambda: free["v"]), [rec], interval=10)
    mgr.evaluate()
    assert [(c[0], c[1]) for c in rec.calls] == [("firing", "old")]
    free["v"] = 2**29
    mgr.evaluate()
    assert ("firing", "disk") in [(c[0], c[1]) for c in rec.calls]
    free["v"] = int(2**30 * 1.1)  # above the floor, but not above floor / 0.8: still active
    mgr.evaluate()
    assert "disk" in mgr.active
    free["v"] = 2**31
    mgr.evaluate()
    assert "disk" not in mgr.active and rec.calls[-1][:2] == ("cleared", "disk")


def test_deferral_rate_over_window_needs_min_events() -> None:
    clock = task.Clock()
    clock.advance(1000)
    tp = Throughput(clock)
    rec = Recorder()
    mgr = AlertManager(clock, [AlertRule("defers", "deferral_rate", threshold=0.5, window=300, min_events=10)],
                       Sources(outcomes_since=tp.outcomes_since), [rec])

    def ev(eid: TrackingEventId) -> None:
        tp.track(TrackingEvent(eid, "0123456789ABC00000000", clock.seconds(), recipients=("a@x",),
                               connector="relay", reply="451 4.4.1 try later"))

    for _ in range(4):
        ev(TrackingEventId.DEFER)
    mgr.evaluate()
    assert rec.calls == []  # 4 events < min_events
    for _ in range(8):
        ev(TrackingEventId.DEFER)
    ev(TrackingEventId.SEND)
    mgr.evaluate()
    assert rec.calls[-1][:2] == ("firing", "defers") and rec.calls[-1][2] == pytest.approx(12 / 13)
    clock.advance(400)  # the window has moved past every event: 0 events, cleared
    mgr.evaluate()
    assert rec.calls[-1][:2] == ("cleared", "defers")


def test_timeout_rate_and_auth_failures_from_counters() -> None:
    clock = task.Clock()
    counters = {"sessions": 0.0, "timeouts": 0.0, "auth": 0.0}
    rec = Recorder()
    mgr = AlertManager(
        clock,
        [AlertRule("timeouts", "timeout_rate", threshold=0.2, window=10, min_events=10),
         AlertRule("auth", "auth_failures", threshold=5, window=10)],
        Sources(sessions_total=lambda: counters["sessions"], timeouts_total=lambda: counters["timeouts"],
                auth_failures_total=lambda: counters["auth"]),
        [rec], interval=10)
    mgr.start()
    clock.advance(10)
    counters.update(sessions=100, timeouts=5, auth=3)
    clock.advance(10)
    assert rec.calls == []
    counters.update(sessions=120, timeouts=15, auth=20)  # +20 sessions, +10 timeouts; +17 auth
    clock.advance(10)
    fired = {c[1] for c in rec.calls if c[0] == "firing"}
    assert fired == {"timeouts", "auth"}
    clock.advance(120)  # no increase in the window: both clear
    assert {c[1] for c in rec.calls if c[0] == "cleared"} == {"timeouts", "auth"}
    mgr.stop()


@pytest.fixture(scope="module")
def short_cert(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("cert")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "5",
                    "-subj", "/CN=mx.example.test", "-keyout", str(d / "k.pem"), "-out", str(d / "c.pem")],
                   check=True, capture_output=True)
    return str(d / "c.pem")


def test_certificate_expiring_within_days(short_cert: str) -> None:
    import time

    clock = task.Clock()
    now = time.time()
    assert 4.9 < cert_days_left(short_cert, now) <= 5.0
    rec = Recorder()
    mgr = AlertManager(clock, [AlertRule("cert", "cert_expiry", threshold=14, certificates=(short_cert,))],
                       Sources(now_wall=lambda: now), [rec])
    mgr.evaluate()
    assert rec.calls[0][:2] == ("firing", "cert") and rec.calls[0][2] == pytest.approx(5, abs=0.1)
    assert short_cert in mgr.active["cert"].detail


def test_mail_notifier_queues_a_message_to_the_postmaster() -> None:
    clock = task.Clock()
    clock.advance(1_800_000_000)
    store = MemoryStore(clock)
    mgr = AlertManager(clock, [AlertRule("queue", "queue_length", threshold=1)],
                       Sources(snapshot=lambda: queue_of(5, clock)),
                       [MailNotifier(store, "postmaster@example.test", "mx.example.test", clock), LogNotifier()])
    mgr.evaluate()
    (env,) = store.list_messages("incoming").result
    assert env.sender == "" and [r.address for r in env.recipients] == ["postmaster@example.test"]
    assert env.kind == "dsn"  # never bounced
    msg = message_from_bytes(store.open_content(env.queue_id).read())
    assert msg["Subject"].startswith("exmta alert [FIRING] queue")
    assert msg["Auto-Submitted"] == "auto-generated"
    assert "5 message(s) queued" in msg.get_payload()


class Hook(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[dict[str, Any]] = []
        self.arrived: defer.Deferred | None = None

    def render_POST(self, request: Any) -> bytes:
        self.posts.append(json.loads(request.content.read()))
        if self.arrived is not None:
            d, self.arrived = self.arrived, None
            d.callback(None)
        return b"ok"


@pytest.fixture
def webhook_server():
    from twisted.internet import reactor

    hook = Hook()
    port = reactor.listenTCP(0, server.Site(hook), interface="127.0.0.1")
    yield hook, port.getHost().port
    port.stopListening()


@pytest_twisted.inlineCallbacks
def test_webhook_posts_firing_and_cleared(webhook_server: Any) -> Any:
    from twisted.internet import reactor

    hook, port = webhook_server
    clock = task.Clock()
    size = {"n": 50}
    notifier = WebhookNotifier(reactor, f"http://127.0.0.1:{port}/alert", timeout=10)
    mgr = AlertManager(clock, [AlertRule("queue", "queue_length", threshold=10)],
                       Sources(snapshot=lambda: queue_of(size["n"], clock)), [notifier])
    hook.arrived = defer.Deferred()
    mgr.evaluate()
    yield hook.arrived
    yield mgr.wait()
    size["n"] = 0
    hook.arrived = defer.Deferred()
    mgr.evaluate()
    yield hook.arrived
    yield mgr.wait()
    assert notifier.sent == 2
    assert [p["state"] for p in hook.posts] == ["firing", "cleared"]
    assert hook.posts[0]["name"] == "queue" and hook.posts[0]["value"] == 50
    assert "FIRING" in hook.posts[0]["text"]
    # the Agent's persistent connection is closed so no reactor state leaks into the next test
    yield notifier.agent._pool.closeCachedConnections()


def test_failing_notifier_does_not_stop_the_others() -> None:
    class Broken:
        def notify(self, *a: Any) -> None:
            raise RuntimeError("boom")

    clock = task.Clock()
    rec = Recorder()
    mgr = AlertManager(clock, [AlertRule("queue", "queue_length", threshold=1)],
                       Sources(snapshot=lambda: queue_of(5, clock)), [Broken(), rec])
    mgr.evaluate()
    assert rec.calls and rec.calls[0][0] == "firing"
