#!/usr/bin/env python3
"""Messages per second through the ``milter`` filter: a trivial milter, OpenDKIM signing, both in a row.

    .venv/bin/python benchmarks/milter.py [--sizes 4096 102400] [--concurrency 8] [--seconds 15]

Runs MilterFilter.on_data (the whole replay: connect, negotiation, macros,
every header, the body, end of message, the modifications applied to the
view) on an in-memory message, ``concurrency`` messages at a time, for
``seconds`` per case, against: an accept-all milter (a separate Python
process, so its CPU is not ours), Debian's OpenDKIM as a signer (skipped
when not installed), and the two in a row. No SMTP server, no spool: this is
the milter client's cost plus the milter's. Prints msgs/s per case and size.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from twisted.internet import defer, task  # noqa: E402

from exmta.filters.base import MessageView  # noqa: E402
from exmta.milter.filter import MilterFilter, parse_settings  # noqa: E402
from exmta.model import Action, Address, MailParams, RcptParams, Session, TransactionView  # noqa: E402

ACCEPT_ALL = r'''
import sys
from twisted.internet import reactor
from tests.milter.fakes import FakeMilter
server = FakeMilter()
print(server.listen(reactor), flush=True)
reactor.run()
'''


def message(size: int) -> bytes:
    head = (b"From: Alice <alice@example.test>\r\nTo: u@example.test\r\nSubject: benchmark\r\n"
            b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\nMessage-ID: <b@example.test>\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, size // len(line))


async def measure(reactor, flt: MilterFilter, raw: bytes, concurrency: int, seconds: float) -> float:
    session = Session(peer_ip="127.0.0.1", peer_port=40000, local_ip="127.0.0.1", local_port=25,
                      helo_name="client.example.test")
    txn = TransactionView(Address("alice", "example.test"), MailParams(size=len(raw)),
                          ((Address("u", "example.test"), RcptParams()),))
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            verdict = await flt.on_data(session, txn, MessageView(raw))
            assert verdict.action is Action.CONTINUE, verdict
            done += 1

    start = time.perf_counter()
    await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(concurrency)])
    return done / (time.perf_counter() - start)


async def run(reactor, args) -> None:
    sockets: dict[str, list[str]] = {}
    procs = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       str(Path(__file__).resolve().parents[1] / "tests")]))
    fake = subprocess.Popen([sys.executable, "-c", ACCEPT_ALL], stdout=subprocess.PIPE, env=env, text=True)
    procs.append(fake)
    sockets["accept-all"] = [fake.stdout.readline().strip()]
    tmp = tempfile.TemporaryDirectory()
    signer = None
    from support import milters
    if milters.opendkim_available():
        signer = milters.OpenDKIM(Path(tmp.name)).start()
        sockets["opendkim"] = [signer.socket]
        sockets["accept-all+opendkim"] = sockets["accept-all"] + [signer.socket]
    try:
        for size in args.sizes:
            raw = message(size)
            for case, socks in sockets.items():
                flt = MilterFilter("bench", parse_settings("bench", {"milters": [
                    {"name": f"m{i}", "socket": s} for i, s in enumerate(socks)]}), reactor, reactor,
                    hostname="mx.example.test")
                rate = await measure(reactor, flt, raw, args.concurrency, args.seconds)
                print(f"{case:22s} {size:7d} octets  c={args.concurrency:<3d} {rate:8.1f} msgs/s", flush=True)
    finally:
        if signer is not None:
            signer.stop()
        for p in procs:
            p.terminate()
            p.wait(10)
        tmp.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 102400])
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15.0)
    args = p.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    main()
