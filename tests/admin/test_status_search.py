"""Issue 11 item 13: the status page's tracking search runs off the reactor, newest first, bounded.

The running-server test makes a rotated tracking log a FIFO that the test
itself feeds: the search cannot finish until the test writes, so whether
SMTP and the admin API still answer while it waits says, without any
timing, whether the search holds the reactor thread (before: it did, and a
300k-record search stalled the server 2.4 s and took 663 MB).
"""
from __future__ import annotations

import errno
import http.client
import json
import os
import smtplib
import threading
from pathlib import Path
from typing import Any

import pytest

from exmta.admin.status.newest import reversed_lines, search_newest
from support import procs
from support.exmta_proc import ExmtaProcess, exmta_toml


def record(i: int, sender: str = "fifo@example.org") -> bytes:
    return json.dumps({"timestamp": 1.7e9 + i, "event_id": "RECEIVE", "queue_id": f"Q{i:06d}", "sender": sender,
                       "recipients": ["bob@example.test"]}).encode() + b"\n"


@pytest.mark.integration
def test_search_waits_on_a_thread_and_the_server_keeps_answering(tmp_path: Path) -> None:
    extra = '[admin]\nlisten = ["tcp:{admin_port}:interface=127.0.0.1"]\n'
    ex = ExmtaProcess(tmp_path / "ex", toml=exmta_toml(extra=extra), subst={"admin_port": procs.free_port()})
    ex.start()
    try:
        port = ex.subst["admin_port"]
        procs.wait_until(lambda: (ex.data_dir / "admin.token").exists() and procs.port_in_use(port), 20, "admin")
        token = (ex.data_dir / "admin.token").read_text().strip()
        fifo = ex.data_dir / "log" / "tracking.jsonl.20260101T000000"
        os.mkfifo(fifo)
        page: dict[str, Any] = {}

        def search() -> None:
            conn = http.client.HTTPConnection(procs.LOOPBACK, port, timeout=60)
            conn.request("GET", "/status?q=from%3Afifo%40example.org", headers={"Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            page["status"], page["body"] = resp.status, resp.read().decode()
            conn.close()

        t = threading.Thread(target=search, daemon=True)
        t.start()

        def reader_is_waiting() -> bool:  # the search has opened the FIFO and now waits for its data
            try:
                page["fd"] = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                return True
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                return False

        procs.wait_until(reader_is_waiting, 30, "the search to open the rotated log")
        # the search is blocked until we write: the reactor must still serve everyone else
        code, _ = procs.smtp_banner(procs.LOOPBACK, ex.port, timeout=10)
        assert code == 220
        with smtplib.SMTP(procs.LOOPBACK, ex.port, timeout=10) as c:
            assert c.noop()[0] == 250
        conn = http.client.HTTPConnection(procs.LOOPBACK, port, timeout=10)
        conn.request("GET", "/healthz", headers={"Authorization": f"Bearer {token}"})
        assert conn.getresponse().status == 200
        conn.close()
        assert "status" not in page

        fd = page.pop("fd")
        os.set_blocking(fd, True)
        os.write(fd, b"".join(record(i) for i in range(150)))
        os.close(fd)
        t.join(60)
        assert page["status"] == 200
        shown = [x.split("</td>")[0] for x in page["body"].split('<tr class="event"><td>')[1:]]
        assert len(shown) == 100  # the limit
        assert "Q000149" in page["body"] and "Q000049" not in page["body"]  # the newest ones
        assert page["body"].index("Q000149") < page["body"].index("Q000050")  # newest first
    finally:
        ex.stop()


def test_newest_first_stops_at_limit_and_byte_cap(tmp_path: Path) -> None:
    log = tmp_path / "tracking.jsonl"
    (tmp_path / "tracking.jsonl.20260101T000000").write_bytes(b"".join(record(i) for i in range(0, 1000)))
    log.write_bytes(b"".join(record(i) for i in range(1000, 2000)) + b'{"truncated')
    wanted = lambda r: r["sender"] == "fifo@example.org"  # noqa: E731
    records, bad, truncated = search_newest(str(log), wanted, limit=5)
    assert [r["queue_id"] for r in records] == ["Q001999", "Q001998", "Q001997", "Q001996", "Q001995"]
    assert bad == 1 and not truncated
    # crossing into the rotated file, newest first
    records, _, _ = search_newest(str(log), lambda r: int(r["queue_id"][1:]) in (5, 999, 1000), limit=10)
    assert [r["queue_id"] for r in records] == ["Q001000", "Q000999", "Q000005"]
    # the byte cap: old history is not read at all
    size = len(record(1999))
    records, _, truncated = search_newest(str(log), lambda r: r["queue_id"] == "Q000005", max_bytes=100 * size)
    assert records == [] and truncated
    budget = [10 ** 9]
    lines = [x for x in reversed_lines(str(log), budget, block=7) if x.strip()]
    assert len(lines) == 1001 and lines[1] == record(1999).rstrip(b"\n")
