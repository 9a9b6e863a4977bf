"""MaildirConnector: delivery, unique names, durability order, traversal refusal, disk errors."""
from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger
from zope.interface.verify import verifyObject

from exmta.interfaces import ISendConnector
from exmta.model import DeliveryRequest, Envelope, Outcome, Recipient
from exmta.send.maildir import MaildirConnector, UnsafeMailbox, mailbox_path
from support.sync import SyncPool, SyncReactor, result

CONTENT = b"Subject: hi\r\nFrom: a@example.com\r\n\r\nbody\r\n"


def request(*rcpts: str, sender: str = "alice@example.com") -> DeliveryRequest:
    env = Envelope(sender=sender, recipients=[Recipient(r) for r in rcpts], queue_id="Q1")
    return DeliveryRequest("Q1", env, tuple(env.recipients), lambda: io.BytesIO(CONTENT))


def quiet(conn: MaildirConnector) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    conn.log = Logger(observer=events.append)
    return events


def new_files(mailbox: Path) -> list[Path]:
    return sorted((mailbox / "new").iterdir())


def test_delivers_each_recipient_into_its_maildir(tmp_path: Path) -> None:
    conn = MaildirConnector("local", str(tmp_path), clock=Clock(), hostname="mx1:a/b")
    assert verifyObject(ISendConnector, conn)
    results = result(conn.deliver(request("bob@Example.NET", "carol@example.org")))
    assert [(r.recipient, r.outcome, r.reply.code, r.reply.status) for r in results] == [
        ("bob@Example.NET", Outcome.DELIVERED, 250, "2.0.0"),
        ("carol@example.org", Outcome.DELIVERED, 250, "2.0.0"),
    ]
    bob = tmp_path / "example.net" / "bob"
    assert sorted(p.name for p in bob.iterdir()) == ["cur", "new", "tmp"]
    [f] = new_files(bob)
    assert f.read_bytes() == b"Return-Path: <alice@example.com>\r\nDelivered-To: bob@Example.NET\r\n" + CONTENT
    assert f.name.startswith("0.M0P") and f.name.endswith(".mx1\\072a\\057b")
    assert list((bob / "tmp").iterdir()) == []
    assert len(new_files(tmp_path / "example.org" / "carol")) == 1


def test_names_are_unique_and_null_sender(tmp_path: Path) -> None:
    conn = MaildirConnector("local", str(tmp_path), clock=Clock())
    for _ in range(3):
        result(conn.deliver(request("bob@example.net", sender="")))
    files = new_files(tmp_path / "example.net" / "bob")
    assert len({f.name for f in files}) == 3
    assert all(f.read_bytes().startswith(b"Return-Path: <>\r\n") for f in files)


def test_fsyncs_file_then_dir_before_result_in_thread_pool(tmp_path: Path) -> None:
    events: list[str] = []

    def fsync(fd: int) -> None:
        events.append(os.readlink(f"/proc/self/fd/{fd}"))

    pool = SyncPool()
    conn = MaildirConnector("local", str(tmp_path), Clock(), pool, SyncReactor(), fsync=fsync)
    d = conn.deliver(request("bob@example.net"))
    d.addCallback(lambda r: events.append("result"))
    result(d)
    assert pool.jobs == 1
    box = tmp_path / "example.net" / "bob"
    # directory creation made durable, then the file in tmp/, then new/, then the result
    assert events[-3].startswith(str(box / "tmp") + "/")
    assert events[-2:] == [str(box / "new"), "result"]
    assert str(tmp_path) in events and str(box) in events


@pytest.mark.parametrize(
    "rcpt",
    ["../evil@example.net", "a/b@example.net", ".hidden@example.net", "..@example.net",
     "a\x00b@example.net", "@example.net", "bob@../etc", "bob@a/b", "bob", "x\\y@example.net",
     "a..b@example.net", "bob@.example.net", "bob\r\nX-Injected: 1@example.net"],
)
def test_unsafe_recipients_fail_permanently(tmp_path: Path, rcpt: str) -> None:
    root = tmp_path / "root"
    conn = MaildirConnector("local", str(root))
    events = quiet(conn)
    [r] = result(conn.deliver(request(rcpt)))
    assert (r.outcome, r.reply.code, r.reply.status) == (Outcome.FAILED, 550, "5.1.3")
    assert [p.name for p in tmp_path.iterdir()] in ([], ["root"])  # nothing outside the root
    assert not root.exists() or list(root.iterdir()) == []
    assert len(events) == 1 and events[0]["queue_id"] == "Q1"


def test_mailbox_path_refuses_and_accepts() -> None:
    assert mailbox_path("/srv/mail", "Bob.Smith+tag@Example.COM.") == "/srv/mail/example.com/Bob.Smith+tag"
    with pytest.raises(UnsafeMailbox):
        mailbox_path("/srv/mail", "x" * 300 + "@example.com")


def test_disk_errors_defer(tmp_path: Path) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    conn = MaildirConnector("local", str(tmp_path), fsync=full)
    quiet(conn)
    [r] = result(conn.deliver(request("bob@example.net")))
    assert (r.outcome, r.reply.code, r.reply.status) == (Outcome.DEFERRED, 451, "4.3.0")
    assert "No space left on device" in r.reply.text


def test_unwritable_mailbox_defers_and_leaves_no_temp_file(tmp_path: Path) -> None:
    (tmp_path / "example.net").write_text("a file where a directory should be")
    conn = MaildirConnector("local", str(tmp_path))
    events = quiet(conn)
    results = result(conn.deliver(request("bob@example.net", "carol@example.org")))
    assert [r.outcome for r in results] == [Outcome.DEFERRED, Outcome.DELIVERED]
    assert events[0]["log_level"].name == "error"

    calls = 0

    def fail_second(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(errno.EIO, "Input/output error")

    conn2 = MaildirConnector("local", str(tmp_path), fsync=fail_second)
    quiet(conn2)
    [r] = result(conn2.deliver(request("carol@example.org")))
    assert r.outcome is Outcome.DEFERRED
    assert list((tmp_path / "example.org" / "carol" / "tmp").iterdir()) == []
    assert len(new_files(tmp_path / "example.org" / "carol")) == 1  # only the first delivery


def test_threadpool_needs_reactor(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        MaildirConnector("local", str(tmp_path), threadpool=SyncPool())


def test_root_created_on_first_delivery(tmp_path):
    """The embedded default starts with no mail/ folder at all."""
    from twisted.internet.task import Clock

    from exmta.model import DeliveryRequest, Envelope, Outcome, Recipient
    from exmta.send.maildir import MaildirConnector

    root = tmp_path / "data" / "mail"
    connector = MaildirConnector("local", str(root), clock=Clock())
    rcpt = Recipient("alice@example.test")
    envelope = Envelope(sender="bob@example.test", recipients=[rcpt])
    request = DeliveryRequest("Q1", envelope, (rcpt,), lambda: __import__("io").BytesIO(b"Subject: x\r\n\r\nhi\r\n"))
    results = []
    connector.deliver(request).addCallback(results.extend)
    assert results[0].outcome is Outcome.DELIVERED
    assert len(list((root / "example.test" / "alice" / "new").iterdir())) == 1
