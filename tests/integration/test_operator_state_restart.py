"""Issue 10 item 6 end to end: ``exmta queue suspend`` and ``exmta queue redirect`` hold across a
restart of ``twistd -n exmta`` (they lived in memory only)."""
from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from support import procs
from support.exmta_proc import REPO_ROOT, ExmtaProcess, exmta_toml
from support.sinks import SmtpSink

pytestmark = pytest.mark.integration

ADMIN = '[admin]\nlisten = ["tcp:{admin_port}:interface=127.0.0.1"]\n'


def run(ex: ExmtaProcess, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.pop("EXMTA_ADMIN_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "exmta", *argv, "-c", str(ex.config_path)], capture_output=True,
                          timeout=60, env=env, cwd=ex.workdir, text=True)


def start(tmp_path: Path, toml: str, n: int) -> ExmtaProcess:
    ex = ExmtaProcess(tmp_path / f"ex{n}", toml=toml, data_dir=tmp_path / "data",
                      subst={"admin_port": procs.free_port()})
    ex.start()
    procs.wait_until(lambda: (ex.data_dir / "admin.token").exists(), 10, "admin token")
    return ex


def send(ex: ExmtaProcess, rcpt: str) -> None:
    with smtplib.SMTP(procs.LOOPBACK, ex.port, timeout=10) as c:
        c.sendmail("alice@example.org", [rcpt], b"Subject: after the restart\r\n\r\nhello\r\n")


def relay_queue(ex: ExmtaProcess) -> dict:
    queues = json.loads(run(ex, "queue", "list", "--json").stdout)["queues"]
    return next((q for q in queues if q["queue"] == "relay"), {})


def test_suspension_and_redirect_survive_a_restart(tmp_path: Path) -> None:
    with SmtpSink() as sink, SmtpSink() as other:
        toml = exmta_toml(smarthost=sink.next_hop, retry="1h", extra=ADMIN)
        ex = start(tmp_path, toml, 0)
        try:
            r = run(ex, "queue", "suspend", "relay")
            assert r.returncode == 0, r.stderr
        finally:
            ex.stop()

        ex = start(tmp_path, toml, 1)
        try:
            assert "destination relay/None still suspended" in ex.log_text()
            send(ex, "one@example.net")
            procs.wait_until(lambda: relay_queue(ex).get("messages") == 1, 15, "the message queued for relay")
            relay = relay_queue(ex)
            assert relay["status"] == "suspended" and relay["suspended"], relay
            assert sink.messages == []  # not delivered: the queue is still suspended
            r = run(ex, "queue", "redirect", other.next_hop)
            assert r.returncode == 0, r.stderr
        finally:
            ex.stop()

        ex = start(tmp_path, toml, 2)
        try:
            send(ex, "two@example.net")
            got = other.wait_for_rcpts(["one@example.net", "two@example.net"], timeout=30)
            assert sorted(r for m in got for r in m.rcpt_tos) == ["one@example.net", "two@example.net"]
            assert sink.messages == []
            assert run(ex, "queue", "redirect", "--stop").returncode == 0
            assert run(ex, "queue", "resume", "relay").returncode == 0
        finally:
            ex.stop()
        assert ex.error_lines() == [], ex.log_text()[-3000:]
