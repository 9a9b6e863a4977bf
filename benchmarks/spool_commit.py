#!/usr/bin/env python3
"""Commit throughput of SpoolStore: messages/s with 1 and 20 concurrent writers.

Each message is ``--size`` octets streamed into a writer, then committed
(content fsync + envelope fsync + grouped directory fsyncs) on a real reactor
with a bounded thread pool. ``--cycle`` also measures the delivery side:
claim + remove (update(..., None)) of every committed message. Prints one
line per run and, last, ``spool_commit_1w_per_s=N spool_commit_20w_per_s=N``.
Bounded by ``--messages`` per run and ``--max-seconds`` per run; the spool
lives in a temporary directory (``--dir`` to choose the disk) that is removed.

    python3 benchmarks/spool_commit.py [--messages 3000] [--size 4096] [--cycle]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import task  # noqa: E402  (no reactor import at module level)
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.python.threadpool import ThreadPool  # noqa: E402

from exmta.model import Envelope, Recipient  # noqa: E402
from exmta.queue.spool import SpoolStore  # noqa: E402


class CountingFsync:
    """os.fsync that counts calls (thread-safe)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        os.fsync(fd)
        with self._lock:
            self.count += 1


async def run(reactor: Any, pool: ThreadPool, base: str, writers: int, args: argparse.Namespace) -> dict[str, float]:
    root = tempfile.mkdtemp(prefix=f"spool-{writers}w-", dir=base)
    fsync = CountingFsync()
    store = SpoolStore(root, reactor, pool, fsync=fsync)
    await store.recover()
    payload = (b"Subject: bench\r\n\r\n" + b"x" * 78 + b"\r\n") * (args.size // 80 + 1)
    payload = payload[: args.size]
    latencies: list[float] = []
    committed: list[str] = []
    deadline = time.monotonic() + args.max_seconds
    fsync.count = 0
    rounds0, dirs0 = store.syncer.rounds, store.syncer.fsyncs

    async def writer() -> None:
        while len(committed) + writers_busy[0] < args.messages and time.monotonic() < deadline:
            writers_busy[0] += 1
            started = time.perf_counter()
            w = store.open_writer()
            for i in range(0, len(payload), 1024):
                w.write(payload[i:i + 1024])
            qid = await store.commit(w, Envelope("a@bench.test", [Recipient("b@dest.test")]))
            latencies.append(time.perf_counter() - started)
            committed.append(qid)
            writers_busy[0] -= 1

    writers_busy = [0]
    t0, cpu0 = time.perf_counter(), time.thread_time()
    await Deferred.fromCoroutine(_gather([writer() for _ in range(writers)]))
    elapsed, reactor_cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    n = len(committed)
    latencies.sort()
    out = {
        "writers": writers,
        "messages": n,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(n / elapsed, 1),
        "file_fsyncs_per_msg": round((fsync.count - (store.syncer.fsyncs - dirs0)) / n, 2),
        "dir_fsyncs_per_msg": round((store.syncer.fsyncs - dirs0) / n, 3),
        "msgs_per_dir_round": round(n / max(1, store.syncer.rounds - rounds0), 1),
        "reactor_cpu_ms_per_msg": round(reactor_cpu * 1000 / n, 3),
        "p50_ms": round(latencies[n // 2] * 1000, 2),
        "p99_ms": round(latencies[min(n - 1, int(n * 0.99))] * 1000, 2),
    }
    if args.cycle:
        t1 = time.perf_counter()
        removed = 0
        while removed < n and time.monotonic() < deadline + args.max_seconds:
            entries = await store.claim(time.time(), 500)
            if not entries:
                break
            await _gather_d([store.update(e.queue_id, e.envelope, None) for e in entries])
            removed += len(entries)
        out["claim_remove_per_s"] = round(removed / (time.perf_counter() - t1), 1)
    shutil.rmtree(root, ignore_errors=True)
    return out


async def _gather(coros: list[Any]) -> None:
    from twisted.internet.defer import gatherResults

    await gatherResults([Deferred.fromCoroutine(c) for c in coros], consumeErrors=True)


async def _gather_d(ds: list[Deferred[Any]]) -> None:
    from twisted.internet.defer import gatherResults

    await gatherResults(ds, consumeErrors=True)


def fsync_floor(base: str | None, threads: int, seconds: float = 2.0) -> float:
    """create + write 4 KiB + fsync + close per file, like bench/fsync_rate.sh "spool": files/s."""
    root = tempfile.mkdtemp(prefix="fsync-floor-", dir=base)
    done = [0] * threads
    stop = time.monotonic() + seconds
    data = b"x" * 4096

    def work(k: int) -> None:
        i = 0
        while time.monotonic() < stop:
            fd = os.open(os.path.join(root, f"{k}.{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            i += 1
        done[k] = i

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    rate = sum(done) / (time.perf_counter() - t0)
    shutil.rmtree(root, ignore_errors=True)
    return round(rate, 1)


def main(reactor: Any, args: argparse.Namespace) -> Deferred[None]:
    pool = ThreadPool(minthreads=1, maxthreads=args.threads, name="spool-bench")
    pool.start()
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)

    async def all_runs() -> None:
        results = {}
        if args.floor:
            for threads in args.writers:
                print(f"fsync_floor threads={threads} files_per_s={fsync_floor(args.dir, threads)}", flush=True)
        for writers in args.writers:
            best = None
            for _ in range(args.repeat):
                r = await run(reactor, pool, args.dir, writers, args)
                print(" ".join(f"{k}={v}" for k, v in r.items()), flush=True)
                if best is None or r["msgs_per_s"] > best["msgs_per_s"]:
                    best = r
            results[writers] = best
        print(" ".join(f"spool_commit_{w}w_per_s={r['msgs_per_s']}" for w, r in results.items()))

    return Deferred.fromCoroutine(all_runs())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=3000, help="messages per run (default 3000)")
    p.add_argument("--size", type=int, default=4096, help="message size in octets (default 4096)")
    p.add_argument("--writers", type=int, nargs="+", default=[1, 20], help="concurrent writers per run")
    p.add_argument("--threads", type=int, default=20, help="thread pool size (default 20)")
    p.add_argument("--repeat", type=int, default=1, help="runs per writer count; the best is reported")
    p.add_argument("--max-seconds", type=float, default=30.0, help="time limit per run")
    p.add_argument("--dir", default=None, help="parent directory for the temporary spool")
    p.add_argument("--cycle", action="store_true", help="also claim and remove every message")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the raw fsync floor measurement (2 s per writer count)")
    a = p.parse_args()
    task.react(main, [a])
