"""exmta.receive.backpressure: injected measurements, a real tiny tmpfs, status() and the service."""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from exmta.receive.backpressure import (
    BackPressure, BackPressureService, free_disk_space, process_rss, spool_message_count,
)

MiB = 1024 * 1024


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (the tests run as root; a failure to mount is a failure, not a skip)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)], check=True, timeout=10)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True, timeout=10)


def test_free_space_on_a_real_tiny_file_system(tiny_fs: Path):
    bp = BackPressure(str(tiny_fs), min_free_disk=1 * MiB)
    assert free_disk_space(str(tiny_fs)) == 2 * MiB
    bp.check()
    assert bp.refusal() is None and bp.status()["pressure"] == 0
    ballast = tiny_fs / "ballast"
    ballast.write_bytes(b"\0" * (int(1.5 * MiB)))
    bp.check()
    reply = bp.refusal()
    assert (reply.code, reply.status) == (452, "4.3.1")
    assert "free disk space 0.5 MiB below 1.0 MiB" in reply.text
    st = bp.status()
    assert st["pressure"] == 1 and st["free_disk_bytes"] == int(0.5 * MiB) and st["min_free_disk_bytes"] == MiB
    ballast.unlink()
    bp.check()
    assert bp.refusal() is None and bp.status()["reasons"] == []


def test_memory_and_queue_length():
    rss = {"v": 100 * MiB}
    queued = {"v": 10}
    bp = BackPressure("/q", max_memory=200 * MiB, max_queued_messages=50, rss=lambda: rss["v"],
                      queued=lambda path: queued["v"], clock=Clock())
    bp.check()
    assert bp.refusal() is None
    rss["v"] = 300 * MiB
    queued["v"] = 51
    bp.check()
    assert bp.reasons == ("memory 300.0 MiB above 200.0 MiB", "51 messages in the queue, above 50")
    rss["v"] = 10 * MiB
    bp.check()
    assert bp.reasons == ("51 messages in the queue, above 50",)
    queued["v"] = 50
    bp.check()
    assert bp.reasons == () and bp.since is None


def test_real_measurements(tmp_path: Path):
    assert process_rss() > 1 * MiB
    assert spool_message_count(str(tmp_path)) == 0
    (tmp_path / "msg").mkdir()
    for i in range(3):
        (tmp_path / "msg" / f"id{i}").write_bytes(b"x")
    assert spool_message_count(str(tmp_path)) == 3


def test_a_failing_measurement_is_not_pressure():
    def broken(path):
        raise OSError(5, "I/O error")

    bp = BackPressure("/q", min_free_disk=MiB, free_space=broken)
    bp.check()
    assert bp.refusal() is None and bp.status()["free_disk_bytes"] is None


def test_service_measures_on_the_clock():
    clock = Clock()
    free = {"v": 10 * MiB}
    bp = BackPressure("/q", min_free_disk=5 * MiB, free_space=lambda p: free["v"], clock=clock)
    svc = BackPressureService(bp, clock, 5.0)
    svc.startService()
    assert bp.checked_at == 0 and not bp.reasons
    free["v"] = MiB
    clock.advance(4.9)
    assert not bp.reasons
    clock.advance(0.1)
    assert bp.reasons and bp.since == 5.0
    svc.stopService()
    assert not clock.getDelayedCalls()
    disabled = BackPressureService(BackPressure("/q"), clock, 5.0)
    disabled.startService()
    assert not clock.getDelayedCalls()
    disabled.stopService()
    assert os.path.exists("/proc/self/statm")
