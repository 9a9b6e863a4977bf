"""Worker -> main relay of metrics events: round trip, bounded lines, malformed lines ignored."""
from __future__ import annotations

import json

from twisted.internet import task

from exmta.model import TrackingEvent, TrackingEventId
from exmta.observe.metrics import Metrics, Throughput
from exmta.observe.worker_metrics import WorkerRelay, dispatch


class Log:
    def __init__(self) -> None:
        self.events: list[TrackingEvent] = []
        self.closed = False

    def track(self, event: TrackingEvent) -> None:
        self.events.append(event)

    def close(self) -> None:
        self.closed = True


def test_round_trip_counts_in_the_main_process() -> None:
    clock = task.Clock()
    clock.advance(1_800_000_000)
    lines: list[bytes] = []
    relay = WorkerRelay(lines.append)
    log = Log()
    tracker = relay.wrap(log)
    event = TrackingEvent(TrackingEventId.RECEIVE, "0123456789ABCDEF0123", clock.seconds(), sender="a@x",
                          recipients=tuple(f"r{i}@y" for i in range(3)), connector="default", source="SMTP",
                          reply="250 2.0.0 ok")
    tracker.track(event)
    relay.session_opened("default")
    relay.tls_started("default", "TLSv1.3")
    relay.auth_failed("default")
    relay.session_timed_out("default")
    relay.filter_verdict("spam", "data", "reject")
    tracker.close()
    assert log.events == [event] and log.closed
    assert all(line.endswith(b"\n") and line.startswith(b"{") for line in lines)
    assert b"r1@y" not in b"".join(lines)  # addresses are not sent, only counted

    metrics = Metrics(clock)
    tp = Throughput(clock)
    for line in lines:
        dispatch(line.rstrip(b"\n"), metrics, [metrics, tp])
    text = metrics.render().decode()
    for want in ('exmta_messages_received_total{connector="default",source="SMTP"} 1.0',
                 'exmta_smtp_connections_total{connector="default"} 1.0',
                 'exmta_tls_sessions_total{connector="default",direction="inbound",version="TLSv1.3"} 1.0',
                 'exmta_auth_failures_total{connector="default"} 1.0',
                 'exmta_smtp_timeouts_total{connector="default"} 1.0',
                 'exmta_filter_verdicts_total{action="reject",filter="spam",phase="data"} 1.0'):
        assert want in text, want
    assert tp.series()[-1][1]["received"] == 1


def test_long_lines_are_cut_to_one_pipe_write() -> None:
    lines: list[bytes] = []
    relay = WorkerRelay(lines.append)
    relay.track(TrackingEvent(TrackingEventId.DEFER, "Q", 1.0, recipients=("a@b",) * 5000,
                              reply="451 " + "x" * 10000, message_id="<" + "m" * 5000 + ">"))
    (line,) = lines
    assert len(line) < 4096
    assert json.loads(line)["n"] == 5000


def test_malformed_lines_change_nothing() -> None:
    clock = task.Clock()
    metrics = Metrics(clock)
    before = metrics.render()
    for bad in (b"{not json", b'{"t": "track"}', b'{"t": "session", "m": "__class__", "c": "x"}',
                b'{"t": "nope"}', b'{"t": "track", "id": "NOSUCH", "ts": 1}', b"[]"):
        dispatch(bad, metrics, [metrics])
    assert metrics.render() == before
