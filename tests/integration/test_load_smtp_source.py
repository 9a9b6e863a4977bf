"""Load from an independent client: Postfix's smtp-source through exmta to a sink.

Bounded: 400 messages from 10 parallel sessions, each step with a timeout.
Every message must arrive exactly once and the queue must end empty.
"""
from __future__ import annotations

import subprocess
import time
from collections import Counter

import pytest

from support.exmta_proc import ExmtaProcess, exmta_toml

MESSAGES = 400
SESSIONS = 10


@pytest.mark.parametrize("workers", [0, 1])
def test_smtp_source_load_relayed_exactly_once(tmp_path, smtp_sink, workers):
    toml = exmta_toml(smarthost=smtp_sink.next_hop, receive_workers=workers)
    with ExmtaProcess(tmp_path, toml) as exmta:
        run = subprocess.run(
            ["smtp-source", "-s", str(SESSIONS), "-m", str(MESSAGES), "-l", "4096", "-c",
             "-f", "load@bench.test", "-t", "sink@dest.test", "-M", "bench.test",
             f"127.0.0.1:{exmta.port}"],
            capture_output=True, text=True, timeout=180,
        )
        assert run.returncode == 0, run.stderr
        got = smtp_sink.wait_for(MESSAGES, timeout=120)
        deadline = time.monotonic() + 30
        queue = exmta.data_dir / "queue" / "msg"
        while any(queue.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(queue.iterdir()), "messages left in the queue after delivery"
        assert exmta.error_lines() == []
    # smtp-source numbers nothing, so count by the queue id in our Received header
    ids = Counter(next(line for line in r.content.split(b"\r\n") if b" id " in line) for r in got)
    assert len(got) == MESSAGES
    assert all(n == 1 for n in ids.values())
    assert all(r.mail_from == "load@bench.test" and r.rcpt_tos == ["sink@dest.test"] for r in got)
