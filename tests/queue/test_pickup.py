"""PickupDirectory: envelope derivation, header stripping, bad files, retries, service life cycle."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger

from exmta.model import Body, Envelope, TrackingEventId
from exmta.queue.pickup import PickupDirectory, PickupError, parse_pickup
from exmta.queue.spool import SpoolStore
from support.sync import SyncPool, SyncReactor, result


class Tracker:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def track(self, event: Any) -> None:
        self.events.append(event)


class FlakyStore:
    """Fails the first `failures` submits, then records them."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.got: list[tuple[bytes, Envelope]] = []

    def submit(self, content: bytes, envelope: Envelope) -> Deferred[str]:
        if self.failures:
            self.failures -= 1
            return fail(OSError(28, "No space left on device"))
        self.got.append((content, envelope))
        return succeed(f"Q{len(self.got)}")


def make(tmp_path: Path, store: Any = None, **kw: Any) -> tuple[PickupDirectory, Clock, list[dict[str, Any]]]:
    clock = Clock()
    clock.advance(1_700_000_000)
    pickup = PickupDirectory(
        str(tmp_path / "pickup"), store or FlakyStore(), clock, 2.0, hostname="mx.example.com", **kw
    )
    events: list[dict[str, Any]] = []
    pickup.log = Logger(observer=events.append)
    return pickup, clock, events


MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>, carol@example.org\r\n"
    b"Cc: dave@example.org\r\n"
    b"Bcc: secret@example.org,\r\n"
    b"  Bob@example.net\r\n"
    b"X-MS-Exchange-Organization-AuthAs: Internal\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"Date: Tue, 1 Jan 2030 00:00:00 +0000\r\n"
    b"\r\n"
    b"body\r\n"
)


def test_parse_from_headers() -> None:
    content, env = parse_pickup(MESSAGE, "mx.example.com", 5.0)
    assert env.sender == "alice@example.com"
    assert [r.address for r in env.recipients] == [
        "bob@example.net", "carol@example.org", "dave@example.org", "secret@example.org",
    ]
    assert b"Bcc" not in content and b"secret" not in content and b"X-MS-Exchange" not in content
    assert content.startswith(b"From: Alice <alice@example.com>\r\nTo: Bob")
    assert content.endswith(b"Date: Tue, 1 Jan 2030 00:00:00 +0000\r\n\r\nbody\r\n")
    assert env.message_id == "<m1@example.com>" and env.size == len(content)
    assert env.connector == "pickup" and env.received_at == 5.0 and env.params.body is Body.SEVEN_BIT


def test_x_sender_and_x_receiver_override_and_are_removed() -> None:
    data = (
        b"X-Sender: <bounces@example.com>\n"
        b"X-Receiver: <only@example.net> NOTIFY=NEVER\n"
        b"X-Receiver: second@example.net\n"
        b"From: someone@example.com\n"
        b"To: not-a-recipient@example.net\n"
        b"Subject: caf\xc3\xa9\n"
        b"\n"
        b"line1\nline2\n"
    )
    content, env = parse_pickup(data, "mx.example.com", 1_700_000_000.0)
    assert env.sender == "bounces@example.com"
    assert [r.address for r in env.recipients] == ["only@example.net", "second@example.net"]
    assert b"X-Sender" not in content and b"X-Receiver" not in content
    assert b"To: not-a-recipient@example.net\r\n" in content
    assert content.endswith(b"\r\n\r\nline1\r\nline2\r\n")
    assert b"\n" not in content.replace(b"\r\n", b"")
    assert b"Message-ID: <" in content and b"@mx.example.com>\r\n" in content
    assert b"Date: Tue, 14 Nov 2023 22:13:20 GMT\r\n" in content
    assert env.params.body is Body.EIGHT_BIT


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"From: a@example.com\r\nSubject: none\r\n\r\nx\r\n", "no recipients"),
        (b"To: b@example.net\r\n\r\nx\r\n", "no sender"),
        (b"this is not a header\r\n\r\n", "malformed header"),
        (b" folded first\r\nTo: b@example.net\r\n\r\n", "continuation"),
        (b"\r\nbody only\r\n", "no header"),
        (b"From: a@example.com\r\nTo: undisclosed-recipients:;\r\n\r\n", "no recipients"),
    ],
)
def test_parse_refuses(data: bytes, reason: str) -> None:
    with pytest.raises(PickupError, match=reason):
        parse_pickup(data, "h", 0.0)


def test_service_submits_durably_tracks_and_deletes(tmp_path: Path) -> None:
    store = SpoolStore(str(tmp_path / "spool"), SyncReactor(), SyncPool(), Clock())
    tracker = Tracker()
    pickup, clock, events = make(tmp_path, store, tracker=tracker)
    (tmp_path / "pickup").mkdir()
    (tmp_path / "pickup" / "a.eml").write_bytes(MESSAGE)
    (tmp_path / "pickup" / "b.EML").write_bytes(MESSAGE.replace(b"<m1@", b"<m2@"))
    (tmp_path / "pickup" / "c.tmp").write_bytes(MESSAGE)  # still being written: ignored
    pickup.startService()
    assert sorted(p.name for p in (tmp_path / "pickup").iterdir()) == ["c.tmp"]
    queued = result(store.list_messages("incoming"))
    assert sorted(e.message_id for e in queued) == ["<m1@example.com>", "<m2@example.com>"]
    with store.open_content(queued[0].queue_id) as f:
        assert b"Bcc" not in f.read()
    assert [(e.event_id, e.source, e.details["file"]) for e in tracker.events] == [
        (TrackingEventId.SUBMIT, "PICKUP", "a.eml"), (TrackingEventId.SUBMIT, "PICKUP", "b.EML"),
    ]
    assert {e.queue_id for e in tracker.events} == {e.queue_id for e in queued}
    assert pickup.submitted == 2
    result(pickup.stopService())
    assert clock.getDelayedCalls() == []


def test_bad_files_are_renamed_with_a_log_line(tmp_path: Path) -> None:
    pickup, clock, events = make(tmp_path)
    d = tmp_path / "pickup"
    d.mkdir()
    (d / "norcpt.eml").write_bytes(b"From: a@example.com\r\n\r\nx\r\n")
    (d / "norcpt.bad").write_bytes(b"an earlier bad file")
    (d / "big.eml").write_bytes(MESSAGE + b"x" * 200)
    pickup.max_size = len(MESSAGE)
    assert result(pickup.scan()) == 0
    assert sorted(p.name for p in d.iterdir()) == ["big.bad", "norcpt.1.bad", "norcpt.bad"]
    lines = [e["log_format"].format(**e) for e in events if e["log_level"].name == "warn"]
    assert any("big.eml" in x and "larger than" in x for x in lines)
    assert any("norcpt.eml" in x and "no recipients" in x for x in lines)
    assert pickup.bad == 2


def test_store_failure_keeps_the_file_for_the_next_interval(tmp_path: Path) -> None:
    store = FlakyStore(failures=1)
    pickup, clock, events = make(tmp_path, store)
    (tmp_path / "pickup").mkdir()
    (tmp_path / "pickup" / "a.eml").write_bytes(MESSAGE)
    (tmp_path / "pickup" / "b.eml").write_bytes(MESSAGE)
    pickup.startService()
    assert store.got == [] and sorted(p.name for p in (tmp_path / "pickup").iterdir()) == ["a.eml", "b.eml"]
    assert any(e.get("log_failure") is not None for e in events)
    clock.advance(2.0)
    assert len(store.got) == 2 and list((tmp_path / "pickup").iterdir()) == []
    result(pickup.stopService())
    clock.advance(10)
    assert clock.getDelayedCalls() == []


def test_scan_is_bounded(tmp_path: Path) -> None:
    store = FlakyStore()
    pickup, clock, _ = make(tmp_path, store, max_per_scan=3)
    (tmp_path / "pickup").mkdir()
    for i in range(5):
        (tmp_path / "pickup" / f"{i}.eml").write_bytes(MESSAGE)
    assert result(pickup.scan()) == 3
    assert sorted(p.name for p in (tmp_path / "pickup").iterdir()) == ["3.eml", "4.eml"]


def test_stop_waits_for_a_scan_in_progress(tmp_path: Path) -> None:
    pending: Deferred[str] = Deferred()

    class SlowStore:
        def submit(self, content: bytes, envelope: Envelope) -> Deferred[str]:
            return pending

    pickup, clock, _ = make(tmp_path, SlowStore())
    (tmp_path / "pickup").mkdir()
    (tmp_path / "pickup" / "a.eml").write_bytes(MESSAGE)
    pickup.startService()
    stopped = pickup.stopService()
    assert not stopped.called
    pending.callback("Q9")
    assert stopped.called and list((tmp_path / "pickup").iterdir()) == []
    assert clock.getDelayedCalls() == []
