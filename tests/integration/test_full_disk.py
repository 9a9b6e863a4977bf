"""Issue 10 items 7, 8 and 9 end to end: ``twistd -n exmta`` on a real 16 MiB tmpfs, a next hop
that tempfails every RCPT for the whole full-disk period, clients that keep sending.

Counted and printed: messages acknowledged (250 at the end of data), refused with 452 at MAIL
FROM / at the end of data, 451s, then after space comes back: delivered, stranded (left in the
queue once every acknowledged message was delivered) and temp files left in ``queue/tmp``.
"""
from __future__ import annotations

import os
import smtplib
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import procs
from support.exmta_proc import ExmtaProcess, exmta_toml
from support.sinks import SmtpSink

pytestmark = pytest.mark.integration

KiB = 1024
MiB = 1024 * KiB
CLIENTS = 4


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """exmta's data directory on a 16 MiB tmpfs (root only; failing to mount fails the test)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True, timeout=10)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True, timeout=10)


def fill(path: Path, leave: int) -> None:
    """Write a ballast file that leaves ``leave`` octets free (an ENOSPC on the way is the point)."""
    free = os.statvfs(path.parent)
    size = max(0, free.f_bavail * free.f_frsize - leave)
    with open(path, "ab") as f:
        try:
            f.write(b"\0" * size)
            f.flush()
        except OSError:
            pass


def send_one(port: int, n: int, body: bytes) -> tuple[str, int]:
    """-> (where, code): "ok" 250, "mail" refused at MAIL FROM, "data" refused at the end of data."""
    with smtplib.SMTP(procs.LOOPBACK, port, timeout=30) as c:
        c.ehlo("flood.example.test")
        code, _ = c.mail("flood@example.net")
        if code != 250:
            return "mail", code
        code, _ = c.rcpt(f"rcpt{n}@remote.example")
        if code != 250:
            return "rcpt", code
        code, _ = c.data(f"Subject: flood {n}\r\nMessage-ID: <flood{n}@example.net>\r\n\r\n".encode() + body)
        return ("ok" if code == 250 else "data"), code


def flood(port: int, until_refused: int, first: int) -> tuple[list[int], Counter]:
    """CLIENTS threads send 256 KiB messages until each saw ``until_refused`` refusals in a row."""
    body = (b"y" * 998 + b"\r\n") * 256
    acked: list[int] = []
    replies: Counter = Counter()
    lock = threading.Lock()

    def client(k: int) -> None:
        in_a_row = 0
        for i in range(200):  # bounded
            n = first + k * 1000 + i
            where, code = send_one(port, n, body)
            with lock:
                replies[f"{where} {code}"] += 1
                if where == "ok":
                    acked.append(n)
            in_a_row = 0 if where == "ok" else in_a_row + 1
            if in_a_row >= until_refused:
                return

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return acked, replies


def queue_files(data: Path) -> dict[str, int]:
    q = data / "queue"
    return {d: len(os.listdir(q / d)) for d in ("incoming", "active", "deferred", "hold", "tmp", "msg")}


def test_full_disk_with_a_tempfailing_next_hop_strands_nothing(
        exmta_factory: Callable[..., ExmtaProcess], smtp_sink_factory: Callable[..., SmtpSink],
        small_fs: Path) -> None:
    tempfail = threading.Event()
    tempfail.set()
    sink = smtp_sink_factory(rcpt_policy=lambda addr: "451 4.3.0 try again later" if tempfail.is_set() else None)
    toml = exmta_toml(smarthost=sink.next_hop, retry="1s",
                      extra='[back_pressure]\nmin_free_disk = "1MiB"\ncheck_interval = "5s"\n')
    exmta = exmta_factory(toml=toml, data_dir=small_fs)

    # 1. the disk fills while the next hop tempfails: the spool keeps what it acknowledged
    acked, replies = flood(exmta.port, until_refused=3, first=0)
    assert acked, replies
    # 2. the disk stays full (a ballast takes the reserve too) until state writes have failed a while
    ballast = small_fs / "ballast"
    fill(ballast, 0)
    procs.wait_until(lambda: exmta.log_text().count("storing the state of") >= 3 * CLIENTS, 120,
                     "state writes failing on the full disk")
    more, more_replies = flood(exmta.port, until_refused=2, first=100_000)  # refused: no space at all
    acked += more
    replies += more_replies
    stranded_while_full = queue_files(small_fs)
    # 3. space comes back and the next hop accepts again; a new message is taken (and kicks retries)
    ballast.unlink()
    tempfail.clear()
    procs.wait_until(lambda: send_one(exmta.port, 999_999, b"after\r\n") == ("ok", 250), 60, "mail taken again")
    acked.append(999_999)
    procs.wait_until(lambda: len({m.rcpt_tos[0] for m in sink.messages}) >= len(acked), 120,
                     "every acknowledged message delivered")
    procs.wait_until(lambda: sum(v for k, v in queue_files(small_fs).items() if k != "tmp") == 0, 60,
                     "the queue empty")
    delivered = {m.rcpt_tos[0] for m in sink.messages}
    left = queue_files(small_fs)
    stranded = sum(v for k, v in left.items() if k != "tmp")
    print(f"\nissue10 full disk (16 MiB tmpfs, next hop 451 to every RCPT while full): "
          f"acknowledged {len(acked)}, delivered {len(delivered)}, stranded {stranded}, "
          f"temp files left {left['tmp']}; replies {dict(sorted(replies.items()))}; "
          f"queue while full {stranded_while_full}")
    assert delivered == {f"rcpt{n}@remote.example" for n in acked}
    assert stranded == 0
    assert left["tmp"] == 0
    # a full spool is a 452 4.3.1 (item 9), never a 451 with a traceback
    assert not [k for k in replies if k.endswith(" 451")], replies
    log = exmta.log_text()
    assert not [line for line in log.splitlines() if "ESMTPServer#critical]" in line or "ESMTPServer#error]" in line]
    # every kind of refusal seen is logged, as a warning: an ENOSPC while writing the message, or back
    # pressure at MAIL FROM (which of the two refuses depends on how fast the flood fills the disk)
    if replies["data 452"]:
        assert "the spool is out of space" in log
    if replies["mail 452"]:
        assert "back pressure ON, new mail refused with 452 4.3.1" in log
    assert replies["data 452"] + replies["mail 452"] > 0, replies
    assert "left for recover()" not in log
