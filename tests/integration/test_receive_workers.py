"""Receive worker processes: SMTP accepted in a child process, delivered by the main one."""
from __future__ import annotations

import os
import signal
import smtplib
import time

from support.exmta_proc import ExmtaProcess, exmta_toml
from support.procs import descendants, pid_alive, wait_until


def _send(port: int, count: int, rcpt: str) -> None:
    for i in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
            client.sendmail("app@lan.test", [rcpt], f"Subject: worker {i}\r\n\r\nbody {i}\r\n".encode())


def _nice(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])  # field 19, after the command name


def test_worker_accepts_main_delivers(tmp_path, smtp_sink):
    toml = exmta_toml(smarthost=smtp_sink.next_hop, receive_workers=1)
    with ExmtaProcess(tmp_path, toml) as exmta:
        children = [pid for pid, _ in descendants(exmta.pid)]
        assert len(children) == 1, f"expected one receive worker, found {children}"
        _send(exmta.port, 5, "x@dest.test")
        got = smtp_sink.wait_for(5, timeout=30)
        assert sorted(r.message()["Subject"] for r in got) == [f"worker {i}" for i in range(5)]
        # the session log lines come from the worker process, relayed through the main log
        assert "worker[0]" in exmta.log_text()
        worker = children[0]
        # the worker runs receive_worker_nice (10) nicer than the main process (field 19 of stat)
        nice = [_nice(pid) for pid in (exmta.pid, worker)]
        assert nice[1] - nice[0] == 10, nice
    assert not pid_alive(worker), "the worker outlived a graceful stop"


def test_worker_exits_when_main_is_killed_and_restart_delivers(tmp_path, smtp_sink):
    """kill -9 of the main process: the worker goes too, and a restart delivers what was acknowledged."""
    toml = exmta_toml(smarthost="[127.0.0.1]:9", receive_workers=1)  # next hop refuses: mail stays queued
    data = tmp_path / "data"
    first = ExmtaProcess(tmp_path / "a", toml, data_dir=data).start()
    try:
        worker = [pid for pid, _ in descendants(first.pid)][0]
        _send(first.port, 3, "y@dest.test")
        os.kill(first.pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(worker), timeout=15, what="the orphaned worker to exit")
    finally:
        first.stop()
    queued = list((data / "queue" / "msg").iterdir())
    assert len(queued) == 3

    toml2 = exmta_toml(smarthost=smtp_sink.next_hop, receive_workers=1, retry="1s")
    with ExmtaProcess(tmp_path / "b", toml2, data_dir=data) as second:
        got = smtp_sink.wait_for(3, timeout=30)
        assert sorted(r.message()["Subject"] for r in got) == ["worker 0", "worker 1", "worker 2"]
        deadline = time.monotonic() + 10
        while list((data / "queue" / "msg").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list((data / "queue" / "msg").iterdir()) == []
        assert second.error_lines() == []
