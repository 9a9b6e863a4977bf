"""kill -9 a process that commits into the spool, then recover(): nothing acknowledged is lost.

The child (spool_crash_child.py) prints a queue id only after its commit
Deferred fired, i.e. after the point where exmta would answer 250. SIGKILL
does not lose the page cache, so this proves the protocol (what is visible
after each step, and that recover() cleans up), not the disk's fsync.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.logger import Logger

from exmta.model import Envelope
from exmta.queue.spool import SpoolStore
from support.sync import SyncPool, SyncReactor, result


HERE = Path(__file__).parent
CHILD = HERE / "spool_crash_child.py"
ROUNDS = 3

_spec = importlib.util.spec_from_file_location("spool_crash_child", CHILD)
assert _spec and _spec.loader
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)


def _run_and_kill(root: Path, rng: random.Random, log: Path) -> list[str]:
    """Start the child, SIGKILL it 0.05-1 s after its first acknowledgement; its printed ids.

    Bounded: the child gets at most 8 s to start (import Twisted) on a busy machine.
    """
    env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent))
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(root), "8"], stdout=subprocess.PIPE, stderr=err, env=env
        )
    buf = b""
    try:
        deadline = time.monotonic() + 8.0
        kill_at: float | None = None
        while time.monotonic() < deadline:
            if kill_at is not None and time.monotonic() >= kill_at:
                break
            ready, _, _ = select.select([proc.stdout], [], [], 0.02)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
                if not chunk:
                    break
                buf += chunk
                if kill_at is None:  # the first ack: the child is up; kill at a random moment
                    kill_at = time.monotonic() + rng.uniform(0.05, 1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        buf += proc.stdout.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        proc.stdout.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL, f"child ended by itself; see {log}: {log.read_text()[-2000:]}"
    text = buf.decode()
    complete = text.split("\n")[:-1]  # a line cut by the kill has no newline: not an acknowledgement
    return complete


def _check_intact(store: SpoolStore, queue_id: str, env: Envelope) -> None:
    with store.open_content(queue_id) as f:
        content = f.read()
    assert content == child.expected_content(queue_id), f"{queue_id}: content differs"
    assert env.message_id == child.digest_id(content)
    assert env.size == len(content)


def test_kill_9_loses_no_acknowledged_message(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    rng = random.Random()
    acknowledged: list[str] = []
    for round_no in range(ROUNDS):
        printed = _run_and_kill(root, rng, tmp_path / "child.log")
        assert printed, f"round {round_no}: the child acknowledged nothing; see child.log"
        acknowledged += printed

        for sub in ("tmp", "msg"):  # the killed process's files predate the restart
            for name in os.listdir(root / sub):
                t = os.stat(root / sub / name).st_mtime - 10
                os.utime(root / sub / name, (t, t))
        store = SpoolStore(str(root), SyncReactor(), SyncPool())
        store.log = Logger(observer=lambda e: None)
        result(store.recover())
        report = store.last_recovery
        assert report["corrupt"] == 0, report
        assert os.listdir(root / "tmp") == [], "recover() must clear tmp/"
        assert os.listdir(root / "active") == []
        assert os.listdir(root / "corrupt") == []

        visible: dict[str, Envelope] = {}
        for queue in ("incoming", "deferred", "hold"):
            for env in result(store.list_messages(queue)):
                assert env.queue_id not in visible, f"{env.queue_id} is in two queues"
                visible[env.queue_id] = env
        # every acknowledged id is there, whole
        missing = [q for q in acknowledged if q not in visible]
        assert not missing, f"round {round_no}: acknowledged but lost: {missing[:5]} (of {len(missing)})"
        # and nothing half-written is visible as a message: every envelope has its whole content,
        # and content files exist only for visible messages
        for queue_id, env in visible.items():
            _check_intact(store, queue_id, env)
        assert sorted(os.listdir(root / "msg")) == sorted(visible)
        deferred = json.loads((root / "deferred" / os.listdir(root / "deferred")[0]).read_text()) \
            if os.listdir(root / "deferred") else None
        if deferred is not None:
            assert deferred["spool"]["next_attempt"] > time.time()
    assert len(set(acknowledged)) == len(acknowledged)


@pytest.mark.parametrize("queue_id", ["00000000000000000000A", "18A2B3C4D5E6F00112233"])
def test_child_content_is_deterministic(queue_id: str) -> None:
    a = child.expected_content(queue_id)
    assert a == child.expected_content(queue_id) and a.startswith(b"X-Crash-Test: " + queue_id.encode())
