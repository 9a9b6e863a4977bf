"""Metrics from tracking and session events, queue gauges from the store; /healthz, /readyz, status page."""
from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task
from twisted.web.test.requesthelper import DummyRequest

from exmta.admin.status import SearchError, parse_query, render_status, search_tracking_log, svg_lines
from exmta.config.schema import RouteConfig, SendConnectorConfig
from exmta.model import Envelope, Recipient, TrackingEvent, TrackingEventId, new_queue_id
from exmta.observe import metrics as m
from exmta.observe.health import HealthResource, ReadinessChecks, ReadyResource
from exmta.receive.backpressure import BackPressure
from exmta.routing.router import StaticRouter
from exmta.testing.memstore import MemoryStore


def samples(metrics: m.Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def ev(eid: TrackingEventId, clock: task.Clock, *, rcpts: tuple[str, ...] = ("a@example.net",),
       queue_id: str | None = None, **kw: Any) -> TrackingEvent:
    return TrackingEvent(eid, queue_id or new_queue_id(clock.seconds()), clock.seconds(), sender="s@example.test",
                         recipients=rcpts, **kw)


def test_reply_reason_is_bounded() -> None:
    assert m.reply_reason("451 4.4.1 connection refused by 192.0.2.1") == "451 4.4.1"
    assert m.reply_reason("550 no such user") == "550"
    assert m.reply_reason("garbage") == "other"
    assert m.reply_reason(None) == "none"


def test_counters_from_tracking_and_session_events() -> None:
    clock = task.Clock()
    clock.advance(1_800_000_000)
    metrics = m.Metrics(clock)
    qid = new_queue_id(clock.seconds())
    metrics.track(ev(TrackingEventId.RECEIVE, clock, queue_id=qid, connector="default", source="SMTP"))
    metrics.track(ev(TrackingEventId.SUBMIT, clock, connector="pickup", source="PICKUP"))
    clock.advance(2.0)
    metrics.track(ev(TrackingEventId.DEFER, clock, queue_id=qid, connector="relay", reply="451 4.4.1 refused"))
    clock.advance(3.0)
    metrics.track(ev(TrackingEventId.SEND, clock, queue_id=qid, connector="relay", reply="250 ok",
                     tls="TLSv1.3 TLS_AES_256_GCM_SHA384"))
    metrics.track(ev(TrackingEventId.DELIVER, clock, rcpts=("x@example.test", "y@example.test"), connector="local"))
    metrics.track(ev(TrackingEventId.FAIL, clock, connector="relay", reply="550 5.1.1 unknown"))
    metrics.track(ev(TrackingEventId.REJECT, clock, connector="default", reply="554 5.7.1 spam"))
    metrics.track(ev(TrackingEventId.DSN, clock, details={"action": "failed"}))
    metrics.session_opened("default")
    metrics.session_opened("default")
    metrics.session_timed_out("default")
    metrics.tls_started("default", "TLSv1.3")
    metrics.auth_failed("submission")
    metrics.filter_verdict("spamcheck", "data", "reject")
    s = samples(metrics)
    assert s[("exmta_messages_received_total", (("connector", "default"), ("source", "SMTP")))] == 1
    assert s[("exmta_messages_received_total", (("connector", "pickup"), ("source", "PICKUP")))] == 1
    assert s[("exmta_messages_deferred_total", (("connector", "relay"), ("reason", "451 4.4.1")))] == 1
    assert s[("exmta_messages_delivered_total", (("connector", "relay"),))] == 1
    assert s[("exmta_messages_delivered_total", (("connector", "local"),))] == 2
    assert s[("exmta_messages_bounced_total", (("connector", "relay"), ("reason", "550 5.1.1")))] == 1
    assert s[("exmta_messages_rejected_total", (("connector", "default"), ("reason", "554 5.7.1")))] == 1
    assert s[("exmta_dsn_generated_total", (("action", "failed"),))] == 1
    assert s[("exmta_smtp_connections_total", (("connector", "default"),))] == 2
    assert s[("exmta_smtp_timeouts_total", (("connector", "default"),))] == 1
    assert s[("exmta_tls_sessions_total", (("connector", "default"), ("direction", "inbound"),
                                           ("version", "TLSv1.3")))] == 1
    assert s[("exmta_tls_sessions_total", (("connector", "relay"), ("direction", "outbound"),
                                           ("version", "TLSv1.3")))] == 1
    assert s[("exmta_auth_failures_total", (("connector", "submission"),))] == 1
    assert s[("exmta_filter_verdicts_total", (("action", "reject"), ("filter", "spamcheck"),
                                              ("phase", "data")))] == 1
    # latency from the queue id's receipt time: the SEND came 5 s after the RECEIVE
    assert s[("exmta_delivery_latency_seconds_count", (("connector", "relay"),))] == 1
    assert s[("exmta_delivery_latency_seconds_sum", (("connector", "relay"),))] == pytest.approx(5.0, abs=0.01)
    assert s[("exmta_delivery_latency_seconds_bucket", (("connector", "relay"), ("le", "10.0")))] == 1
    assert s[("exmta_delivery_latency_seconds_bucket", (("connector", "relay"), ("le", "2.5")))] == 0


def test_a_broken_event_never_raises() -> None:
    metrics = m.Metrics(task.Clock())
    metrics.track(object())  # type: ignore[arg-type]


def _queue(store: MemoryStore, clock: task.Clock, rcpts: list[str], age: float) -> str:
    env = Envelope(sender="s@example.test", recipients=[Recipient(a) for a in rcpts],
                   received_at=clock.seconds() - age, size=10)
    return store.submit(b"Subject: x\r\n\r\nbody\r\n", env).result


def test_queue_sampler_by_next_hop_and_oldest_age() -> None:
    clock = task.Clock()
    clock.advance(1_800_000_000)
    store = MemoryStore(clock)
    send = {"relay": SendConnectorConfig("relay", smarthosts=()), "local": SendConnectorConfig("local", "maildir")}
    router = StaticRouter((RouteConfig(("example.test",), "local"), RouteConfig(("*",), "relay")), send)
    _queue(store, clock, ["a@example.net", "b@example.org"], age=600)
    _queue(store, clock, ["c@example.test"], age=60)
    sampler = m.QueueSampler(store, router, clock, interval=15)
    seen: list[m.QueueSnapshot] = []
    sampler.listeners.append(seen.append)
    sampler.start()
    snap = sampler.snapshot
    assert snap is not None and seen == [snap]
    assert snap.by_queue["incoming"] == 2 and snap.total == 2
    assert sum(snap.by_nexthop.values()) >= 2
    assert any(h.startswith("local/") for h in snap.by_nexthop)
    assert any(h.startswith("relay/") for h in snap.by_nexthop)
    assert snap.oldest_age(clock.seconds()) == pytest.approx(600)
    metrics = m.Metrics(clock, sampler)
    clock.advance(15)
    s = samples(metrics)
    assert s[("exmta_queue_messages", (("queue", "incoming"),))] == 2
    assert s[("exmta_queue_oldest_message_age_seconds", ())] == pytest.approx(615)
    local = [k for k in s if k[0] == "exmta_queue_nexthop_messages" and k[1][0][1].startswith("local/")]
    assert local and s[local[0]] == 1
    sampler.stop()
    assert clock.getDelayedCalls() == []


def test_metrics_resource_text_format() -> None:
    metrics = m.Metrics(task.Clock())
    metrics.session_opened("default")
    req = DummyRequest([b""])
    body = m.MetricsResource(metrics).render_GET(req)
    assert b'exmta_smtp_connections_total{connector="default"} 1.0' in body
    assert req.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    req = DummyRequest([b""])
    assert b"prometheus-client is not installed" in m.MetricsResource(None).render_GET(req)
    assert req.responseCode == 503


def test_healthz_and_readyz() -> None:
    req = DummyRequest([b""])
    assert HealthResource().render_GET(req) == b"ok\n"
    state = {"stopping": False}
    checks = ReadinessChecks()
    checks.add("not stopping", lambda: (not state["stopping"], "x"))
    checks.add("queue disk", ReadinessChecks.disk_floor("/", 1))
    req = DummyRequest([b""])
    assert ReadyResource(checks).render_GET(req).startswith(b"ready\n")
    assert req.responseCode is None or req.responseCode == 200
    state["stopping"] = True
    req = DummyRequest([b""])
    body = ReadyResource(checks).render_GET(req)
    assert req.responseCode == 503 and b"FAIL not stopping" in body
    checks.add("broken", lambda: 1 / 0)  # type: ignore[arg-type,return-value]
    req = DummyRequest([b""])
    req.args = {b"format": [b"json"]}
    body = ReadyResource(checks).render_GET(req)
    assert b'"ready": false' in body and b"ZeroDivisionError" in body
    # a floor above any disk's size is never met
    huge = ReadinessChecks()
    huge.add("queue disk", ReadinessChecks.disk_floor("/", 2**62))
    req = DummyRequest([b""])
    assert b"FAIL queue disk" in ReadyResource(huge).render_GET(req) and req.responseCode == 503


def test_throughput_series_covers_the_last_hour() -> None:
    clock = task.Clock()
    clock.advance(1_800_000_000 - 1_800_000_000 % 60)
    tp = m.Throughput(clock)
    tp.track(ev(TrackingEventId.RECEIVE, clock))
    clock.advance(61)
    tp.track(ev(TrackingEventId.DEFER, clock))
    series = tp.series()
    assert len(series) == 60
    assert series[-1][1]["deferred"] == 1 and series[-2][1]["received"] == 1
    clock.advance(3700)
    assert sum(b["received"] + b["deferred"] for _, b in tp.series()) == 0


def test_tracking_search_and_bad_input(tmp_path: Any) -> None:
    log = tmp_path / "tracking.jsonl"
    log.write_text(
        '{"timestamp": 1, "event_id": "RECEIVE", "queue_id": "Q1", "sender": "a@x.test",'
        ' "recipients": ["bob@y.test"]}\n'
        '{"timestamp": 2, "event_id": "DEFER", "queue_id": "Q1", "sender": "a@x.test", "recipients": ["bob@y.test"]}\n'
        "{not json\n"
        '{"timestamp": 3, "event_id": "RECEIVE", "queue_id": "Q2", "sender": "c@x.test",'
        ' "recipients": ["eve@y.test"]}\n'
        '{"timestamp": 4, "event_id": "SEN'  # truncated last line
    )
    found, bad = search_tracking_log(str(log), "bob@y.test")
    assert [r["event_id"] for r in found] == ["DEFER", "RECEIVE"] and bad == 2
    found, _ = search_tracking_log(str(log), "event:receive to:eve")
    assert [r["queue_id"] for r in found] == ["Q2"]
    with pytest.raises(SearchError, match="unknown field"):
        parse_query("colour:red")
    with pytest.raises(SearchError, match="value is needed"):
        parse_query("from:")
    assert search_tracking_log(str(tmp_path / "missing.jsonl"), "x") == ([], 0)


def test_svg_chart_is_self_contained() -> None:
    svg = svg_lines("Messages", {"received": [0, 1, 5], "delivered": [0, 0, 2]})
    assert svg.startswith("<svg") and "received (6)" in svg and "http://" not in svg.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")


def test_status_page_renders_escaped_content(tmp_path: Any) -> None:
    class Obs:
        pass

    clock = task.Clock()
    clock.advance(1_800_000_000)
    from exmta.observe.alerts import Alert, AlertManager, AlertRule, Sources

    obs: Any = Obs()
    obs.reactor = clock
    obs.config = type("C", (), {"hostname": "mx.example.test"})()
    obs.started, obs.stopping = True, False
    snap = m.QueueSnapshot(clock.seconds())
    snap.by_queue = {"deferred": 3}
    snap.by_nexthop = {"relay/<script>": 3}
    snap.oldest_by_nexthop = {"relay/<script>": clock.seconds() - 300}
    snap.oldest = clock.seconds() - 300
    snap.last_error = {"relay/<script>": "451 4.4.1 refused"}
    obs.sampler = type("S", (), {"snapshot": snap})()
    obs.alerts = AlertManager(clock, [], Sources())
    obs.alerts.active["q"] = Alert(AlertRule("q", "queue_length", 1), clock.seconds(), 3, clock.seconds(),
                                   detail="3 queued")
    obs.throughput = m.Throughput(clock)
    obs.history = [(clock.seconds(), 3)]
    log = tmp_path / "t.jsonl"
    log.write_text('{"timestamp": 1, "event_id": "RECEIVE", "queue_id": "Q1", "sender": "a@x", "recipients": []}\n')
    obs.paths = {"tracking": str(log)}
    page = render_status(obs, "Q1")
    assert "relay/&lt;script&gt;" in page and "<script>" not in page
    assert "451 4.4.1 refused" in page and 'class="firing alert"' in page
    assert "1 event(s) found" in page and "<td>Q1</td>" in page
    assert "Cannot search" in render_status(obs, "bogus:field")


def test_back_pressure_gauges_follow_the_measurements(tmp_path) -> None:
    free = {"bytes": 500 * 1024 * 1024}
    pressure = BackPressure(str(tmp_path), min_free_disk=100 * 1024 * 1024, max_queued_messages=10,
                            free_space=lambda path: free["bytes"], queued=lambda path: 3)
    metrics = m.Metrics(task.Clock())
    metrics.back_pressure = pressure

    pressure.update(pressure.measure())
    s = samples(metrics)
    assert s[("exmta_back_pressure", (("reason", "disk"),))] == 0
    assert s[("exmta_back_pressure", (("reason", "queue"),))] == 0
    assert s[("exmta_queue_free_disk_bytes", ())] == 500 * 1024 * 1024
    assert s[("exmta_back_pressure_queued_messages", ())] == 3

    free["bytes"] = 10 * 1024 * 1024          # below the floor: new mail is refused
    pressure.update(pressure.measure())
    s = samples(metrics)
    assert s[("exmta_back_pressure", (("reason", "disk"),))] == 1
    assert s[("exmta_back_pressure", (("reason", "memory"),))] == 0
    assert s[("exmta_back_pressure", (("reason", "queue"),))] == 0
    assert s[("exmta_queue_free_disk_bytes", ())] == 10 * 1024 * 1024


def test_no_back_pressure_object_means_no_gauges() -> None:
    metrics = m.Metrics(task.Clock())
    assert not any(name.startswith("exmta_back_pressure") for name, _ in samples(metrics))
