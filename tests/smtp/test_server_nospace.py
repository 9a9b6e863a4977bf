"""Issue 10 items 8 and 9 at the SMTP level: a real 1 MiB tmpfs under the real SpoolStore.

A full spool is ``452 4.3.1`` (at MAIL FROM when back pressure sees it, at the
end of data when a write fails), logged as a warning, never a 451 with a
traceback; and the partial message's temp file is gone.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher

from exmta.config.schema import AcceptedDomain, Config, ReceiveConnectorConfig
from exmta.filters import FilterChain
from exmta.queue.spool import SpoolStore
from exmta.receive.backpressure import BackPressure
from exmta.receive.policy import DefaultReceivePolicy
from exmta.smtp.server import ESMTPServerFactory
from support.sync import SyncPool, SyncReactor

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (the tests run as root; a failure to mount is a failure, not a skip)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], check=True, timeout=10)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True, timeout=10)


@pytest.fixture
def log_events() -> Iterator[list[dict]]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def serve(root: Path, min_free: int = 0) -> tuple[Clock, SpoolStore, BackPressure, ESMTPServerFactory]:
    clock = Clock()
    clock.advance(1_700_000_000)
    config = Config(hostname="mx.test", accepted_domains=(AcceptedDomain("local.test"),))
    rc = ReceiveConnectorConfig(name="default", hostname="mx.test", max_message_size=10 * MiB)
    store = SpoolStore(str(root / "queue"), SyncReactor(), SyncPool(), clock, io="inline")
    pressure = BackPressure(str(root / "queue"), min_free_disk=min_free, clock=clock)
    pressure.check()
    policy = DefaultReceivePolicy(config.accepted_domain, rc.relay_networks, back_pressure=pressure, clock=clock)
    factory = ESMTPServerFactory(rc, policy, FilterChain([], clock), store, clock,
                                 local_domain=lambda d: config.accepted_domain(d) is not None)
    return clock, store, pressure, factory


def session(factory: ESMTPServerFactory) -> tuple[StringTransport, object]:
    addr = IPv4Address("TCP", "198.51.100.9", 5000)
    proto = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    proto.makeConnection(transport)
    proto.dataReceived(b"EHLO c.test\r\n")
    transport.clear()
    return transport, proto


def test_a_message_bigger_than_the_disk_is_452_and_leaves_no_temp_file(tiny_fs: Path, log_events) -> None:
    clock, store, _, factory = serve(tiny_fs)
    t, proto = session(factory)
    proto.dataReceived(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@local.test>\r\nDATA\r\n")
    line = b"x" * 998 + b"\r\n"
    for _ in range(2 * MiB // len(line)):  # twice the file system
        proto.dataReceived(line)
    proto.dataReceived(b".\r\n")
    clock.advance(0)
    replies = t.value().split(b"\r\n")
    assert replies[-2] == b"452 4.3.1 Insufficient system storage, try again later", replies
    assert os.listdir(tiny_fs / "queue" / "tmp") == []
    assert os.listdir(tiny_fs / "queue" / "incoming") == []
    critical = [e for e in log_events if e.get("log_level") in (LogLevel.critical, LogLevel.error)]
    assert critical == []
    assert any("out of space" in (e.get("log_format") or "") and e.get("log_level") is LogLevel.warn
               for e in log_events)
    # the session goes on: a small message fits again
    t.clear()
    proto.dataReceived(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@local.test>\r\nDATA\r\nSubject: s\r\n\r\nb\r\n.\r\n")
    clock.advance(0)
    assert t.value().split(b"\r\n")[-2].startswith(b"250 2.0.0 Ok: queued as ")


def test_mail_from_sees_a_disk_that_filled_since_the_last_check(tiny_fs: Path) -> None:
    """Free space is sampled every check_interval (5 s); a spool can fill faster than that."""
    clock, store, pressure, factory = serve(tiny_fs, min_free=256 * KiB)
    t, proto = session(factory)
    proto.dataReceived(b"MAIL FROM:<a@remote.test>\r\nRSET\r\n")
    assert t.value() == b"250 2.1.0 Ok\r\n250 2.0.0 Ok\r\n"
    free = os.statvfs(tiny_fs)
    (tiny_fs / "ballast").write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 128 * KiB))
    clock.advance(0.5)  # well inside check_interval: no periodic check ran
    t.clear()
    proto.dataReceived(b"MAIL FROM:<a@remote.test>\r\n")
    reply = t.value()
    assert reply.startswith(b"452 4.3.1 Insufficient system resources (free disk space 0.1 MiB below 0.2 MiB)")


def test_declared_size_that_does_not_fit_above_the_reserve_is_452_at_mail(tiny_fs: Path) -> None:
    clock, store, pressure, factory = serve(tiny_fs, min_free=256 * KiB)
    t, proto = session(factory)
    proto.dataReceived(b"MAIL FROM:<a@remote.test> SIZE=900000\r\n")
    assert t.value() == (b"452 4.3.1 Insufficient system storage for a message of 900000 octets, "
                         b"try again later\r\n")
    t.clear()
    proto.dataReceived(b"MAIL FROM:<a@remote.test> SIZE=100000\r\n")
    assert t.value() == b"250 2.1.0 Ok\r\n"
