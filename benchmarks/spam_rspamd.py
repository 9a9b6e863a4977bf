#!/usr/bin/env python3
"""rspamd scans per second through exmta's /checkv2 client, 4 KiB and 100 KiB messages.

    .venv/bin/python benchmarks/spam_rspamd.py [--count 400] [--seconds 40] [--concurrency 8]

Starts a private rspamd on loopback (tests/support/rspamd.py: one normal
worker, the test configuration, no network; stopped by its own process
group), then scans ``count`` messages of each size with ``concurrency`` in
flight through :class:`exmta.spam.rspamd.RspamdClient` on the real reactor,
bounded by ``seconds`` per size. Prints scans/s and the p50/p90 latency of a
scan: the ceiling rspamd puts on relay msgs/s when every message is scanned
(one rspamd worker; rspamd scales with ``count`` in worker-normal.inc).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def message(size: int, n: int) -> bytes:
    head = (f"From: Alice <alice@remote.test>\r\nTo: bob@example.test\r\nSubject: bench {n}\r\n"
            f"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{n}.bench@remote.test>\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=400, help="messages per size")
    p.add_argument("--seconds", type=float, default=40.0, help="time limit per size")
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()

    from support.rspamd import Rspamd
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, DeferredList

    from exmta.spam.rspamd import RspamdClient

    results: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = Rspamd(Path(tmp) / "rspamd").start()
        try:
            client = RspamdClient(reactor, server.endpoint, timeout=30, max_concurrent=args.concurrency)
            # a Hostname as when the client's name is verified: rspamd then asks no DNS (its test DNS is a
            # dead port, whose timeout would be all this measured)
            headers = {"IP": ["198.51.100.7"], "Helo": ["client.remote.test"], "From": ["alice@remote.test"],
                       "Rcpt": ["bob@example.test"], "Hostname": ["client.remote.test"]}

            async def one(data: bytes, latencies: list[float]) -> None:
                start = time.perf_counter()
                await client.check(data, headers)
                latencies.append(time.perf_counter() - start)

            async def run() -> None:
                for size in (4096, 100 * 1024):
                    bodies = [message(size, n) for n in range(args.count)]
                    latencies: list[float] = []
                    deadline = time.monotonic() + args.seconds
                    start = time.perf_counter()
                    for i in range(0, len(bodies), args.concurrency * 4):
                        if time.monotonic() > deadline:
                            break
                        batch = bodies[i:i + args.concurrency * 4]
                        await DeferredList([Deferred.fromCoroutine(one(b, latencies)) for b in batch],
                                           fireOnOneErrback=True, consumeErrors=True)
                    elapsed = time.perf_counter() - start
                    q = statistics.quantiles(latencies, n=10)
                    results.append(f"{size // 1024:>4} KiB: {len(latencies)} scans in {elapsed:.1f} s = "
                                   f"{len(latencies) / elapsed:.1f} scans/s, p50 {q[4] * 1000:.1f} ms, "
                                   f"p90 {q[8] * 1000:.1f} ms (concurrency {args.concurrency})")

            def done(result: object) -> object:
                reactor.stop()
                return result

            reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()).addBoth(done))
            reactor.run()
        finally:
            server.close()
    for line in results:
        print(line)


if __name__ == "__main__":
    main()
