"""TrackingLog and MultiTracker."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from zope.interface.verify import verifyObject

from exmta.interfaces import IMessageTracker
from exmta.model import TrackingEvent, TrackingEventId
from exmta.observe.tracking import MultiTracker, TrackingLog


def event(queue_id: str = "0ABC", **kw: Any) -> TrackingEvent:
    return TrackingEvent(
        TrackingEventId.RECEIVE, queue_id, 1700000000.5, sender="a@example.com",
        recipients=("b@example.net", "c@example.net"), size=123, source="SMTP", **kw,
    )


def test_one_json_line_per_event_visible_at_once(tmp_path: Path) -> None:
    path = tmp_path / "log" / "tracking.jsonl"
    log = TrackingLog(str(path))
    assert verifyObject(IMessageTracker, log)
    log.track(event(details={"client_ip": "192.0.2.1"}))
    # line buffering: the line is in the file before any close or flush
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {
        "timestamp": 1700000000.5, "event_id": "RECEIVE", "queue_id": "0ABC",
        "sender": "a@example.com", "recipients": ["b@example.net", "c@example.net"],
        "size": 123, "source": "SMTP", "client_ip": "192.0.2.1",
    }
    log.track(event("0ABD", reply="250 2.0.0 Ok", message_id="<é@example.com>"))
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["message_id"] == "<é@example.com>"
    assert log.written == 2
    log.close()


def test_reopen_supports_rotation(tmp_path: Path) -> None:
    path = tmp_path / "tracking.jsonl"
    log = TrackingLog(str(path))
    log.track(event("1"))
    os.rename(path, tmp_path / "tracking.jsonl.1")
    log.reopen()
    log.track(event("2"))
    log.close()
    assert [json.loads(x)["queue_id"] for x in path.read_text().splitlines()] == ["2"]
    assert [json.loads(x)["queue_id"] for x in (tmp_path / "tracking.jsonl.1").read_text().splitlines()] == ["1"]


def test_write_errors_are_logged_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    log = TrackingLog(str(blocker / "tracking.jsonl"))  # its directory is a file
    seen: list[dict[str, Any]] = []
    log.log = Logger(observer=seen.append)
    log.track(event())
    log.track(event())
    assert log.written == 0
    assert len(seen) == 1 and "Cannot write the tracking log" in seen[0]["log_format"]


def test_multi_tracker_fans_out_and_swallows(tmp_path: Path) -> None:
    got: list[str] = []

    class Good:
        def track(self, e: TrackingEvent) -> None:
            got.append(e.queue_id)

    class Bad:
        def track(self, e: TrackingEvent) -> None:
            raise RuntimeError("boom")

    multi = MultiTracker(Bad(), Good())
    seen: list[dict[str, Any]] = []
    multi.log = Logger(observer=seen.append)
    assert verifyObject(IMessageTracker, multi)
    multi.track(event("Q1"))
    assert got == ["Q1"]
    assert len(seen) == 1 and seen[0]["queue_id"] == "Q1" and seen[0]["log_failure"].check(RuntimeError)
