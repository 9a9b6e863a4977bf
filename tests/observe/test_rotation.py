"""RotatingLog: size and age rotation, retention by age and total size, on task.Clock."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from twisted.internet.task import Clock

from exmta.model import TrackingEvent, TrackingEventId
from exmta.observe.rotation import RotatingLog, log_files
from exmta.observe.tracking import TrackingLog

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def clock_at(t: float = T0) -> Clock:
    c = Clock()
    c.advance(t)
    return c


def test_rotates_by_size_before_the_line_that_would_pass_it(tmp_path: Path) -> None:
    path = str(tmp_path / "x.log")
    log = RotatingLog(path, clock_at(), max_size=100, max_age=0, keep_age=0, keep_size=0)
    for i in range(5):
        assert log.write_line(f"{i:02d}" + "a" * 37)  # 40 octets with the newline
    log.close()
    files = log_files(path)
    assert [os.path.getsize(f) for f in files] == [80, 80, 40]
    assert files[-1] == path and log.rotations == 2
    assert all(os.path.basename(f).startswith("x.log.20270115T080000") for f in files[:-1])
    lines = [line[:2] for f in files for line in Path(f).read_text().splitlines()]
    assert lines == ["00", "01", "02", "03", "04"]  # oldest file first, nothing lost


def test_rotates_by_age_on_the_clock(tmp_path: Path) -> None:
    path = str(tmp_path / "x.log")
    clock = clock_at()
    log = RotatingLog(path, clock, max_size=0, max_age=3600, keep_age=0, keep_size=0)
    log.write_line("first")
    clock.advance(3599)
    log.write_line("second")
    assert log.rotations == 0
    clock.advance(1)
    log.write_line("third")
    assert log.rotations == 1
    log.close()
    old, live = log_files(path)
    assert Path(old).read_text() == "first\nsecond\n" and Path(live).read_text() == "third\n"
    assert old.endswith(".20270115T090000")  # named by the rotation time (UTC)


def test_retention_by_age_and_total_size(tmp_path: Path) -> None:
    path = str(tmp_path / "x.log")
    now = time.time()  # retention compares file modification times with the clock
    clock = clock_at(now)
    log = RotatingLog(path, clock, max_size=0, max_age=0, keep_age=86400, keep_size=25)
    for i in range(4):
        log.write_line(f"line {i}")  # 7 octets
        clock.advance(60)
        log.rotate()
    rotated = [f for f in log_files(path) if f != path]
    # 4 files of 7 octets, cap 25: the oldest one went
    assert len(rotated) == 3 and [Path(f).read_text() for f in rotated] == ["line 1\n", "line 2\n", "line 3\n"]
    # age: files whose mtime is older than keep_age are deleted at the next rotation
    os.utime(rotated[0], (now - 2 * 86400, now - 2 * 86400))
    log.write_line("line 4")
    log.rotate()
    left = [Path(f).read_text() for f in log_files(path)]
    assert left == ["line 2\n", "line 3\n", "line 4\n"]
    log.close()


def test_same_second_rotations_get_distinct_names(tmp_path: Path) -> None:
    path = str(tmp_path / "x.log")
    log = RotatingLog(path, clock_at(), max_size=0, max_age=0, keep_age=0, keep_size=0)
    names = []
    for i in range(3):
        log.write_line(str(i))
        names.append(log.rotate())
    assert names[1] == names[0] + "-1" and names[2] == names[0] + "-2"
    assert [Path(f).read_text() for f in log_files(path)] == ["0\n", "1\n", "2\n"]
    assert log.rotate() is None  # nothing to rotate: no empty files


def test_reopened_file_keeps_counting_its_size(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_text("x" * 90 + "\n")
    log = RotatingLog(str(path), clock_at(), max_size=100, max_age=0, keep_age=0, keep_size=0)
    log.write_line("y" * 20)
    log.close()
    assert log.rotations == 1 and path.read_text() == "y" * 20 + "\n"


def test_tracking_log_rotates_and_splits_tls(tmp_path: Path) -> None:
    path = tmp_path / "tracking.jsonl"
    clock = clock_at()
    log = TrackingLog(str(path), clock, max_size=0, max_age=60, keep_age=0, keep_size=0)
    ev = TrackingEvent(TrackingEventId.SEND, "Q1", T0, sender="a@b.test", recipients=("c@d.test",),
                       message_id="<m@b.test>", size=10, connector="out", source="SMTP",
                       remote_host="mx.d.test[192.0.2.1]:25", reply="250 2.0.0 ok",
                       tls="TLSv1.3 TLS_AES_256_GCM_SHA384", details={"latency": 1.5})
    log.track(ev)
    clock.advance(61)
    log.track(ev)
    log.close()
    files = log_files(str(path))
    assert len(files) == 2
    rec = json.loads(Path(files[0]).read_text())
    assert rec["tls_version"] == "TLSv1.3" and rec["tls_cipher"] == "TLS_AES_256_GCM_SHA384"
    for key in ("event_id", "queue_id", "message_id", "sender", "recipients", "size", "connector",
                "remote_host", "reply", "latency"):
        assert key in rec, key


def test_wall_clock_default(tmp_path: Path) -> None:
    log = TrackingLog(str(tmp_path / "t.jsonl"))
    assert abs(log.file.clock.seconds() - time.time()) < 5
    assert log.file.max_size == 0 and log.file.max_age == 0  # no rotation unless configured
    log.close()


def test_a_writer_follows_a_rotation_by_another_process(tmp_path: Path) -> None:
    path = str(tmp_path / "x.log")
    clock = clock_at()
    main = RotatingLog(path, clock, max_size=0, max_age=0, keep_age=0, keep_size=0)
    worker = RotatingLog(path, clock, max_size=0, max_age=0, keep_age=0, keep_size=0)
    main.write_line("main 1")
    worker.write_line("worker 1")
    rotated = main.rotate()
    clock.advance(1)
    worker.write_line("worker 2")  # notices the rename and reopens path
    main.write_line("main 2")
    main.close()
    worker.close()
    assert Path(rotated).read_text() == "main 1\nworker 1\n"
    assert Path(path).read_text() == "worker 2\nmain 2\n"
