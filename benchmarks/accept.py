#!/usr/bin/env python3
"""Accept throughput and latency of an SMTP server (self-contained, stdlib only).

    benchmarks/accept.py 127.0.0.1:2525 [-c 20] [-m 5000] [-t 60] [--sizes 4096,102400]
                         [--reuse 0] [--procs 1] [--pid PID] [--json-out FILE]

For each message size (default 4 KiB and 100 KiB): ``-c`` concurrent
clients (asyncio tasks, spread over ``--procs`` load-generator processes)
send EHLO, MAIL, RCPT, DATA; by default **a new TCP connection per message**
(like smtp-source), with ``--reuse N`` up to N messages per connection (RSET
between them).  A run ends after ``-m`` (``-M`` above 16 KiB) messages or
``-t`` seconds, whichever comes first; every socket operation has a timeout.

Reported per size: msgs/s (= messages accepted with 250 / wall time of the
run), accept latency p50/p90/p99/max (from the moment the final ``.`` of DATA
was written to the moment the 250 arrived), session latency p50/p99 (connect
to 250 after DATA), errors by kind, load-generator CPU and, with ``--pid``,
the server's CPU (that process and its descendants, reaped children included).

Last line (for scripts): ``accept_4k_msgs_per_s=.. accept_4k_p99_ms=.. ...``
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------- message


def make_head(seq: int, tag: str) -> bytes:
    """The header block (unique Message-ID per message)."""
    return (
        f"From: Bench Sender <sender@bench.test>\r\n"
        f"To: Bench Rcpt <rcpt@dest.test>\r\n"
        f"Subject: accept benchmark {tag} #{seq}\r\n"
        f"Message-ID: <{tag}.{seq}.{os.getpid()}@bench.test>\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()


def make_body(size: int) -> bytes:
    """CRLF lines of 76 octets so that head + body is about *size* octets."""
    line = (b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-_.!" * 2)[:74]
    line += b"\r\n"
    need = max(76, size - 245)
    rest = need % len(line)
    return line * (need // len(line)) + (line[: rest - 2] + b"\r\n" if rest > 2 else b"")


# ------------------------------------------------------------------ client


class SmtpError(Exception):
    """An unexpected reply; ``kind`` says at which step."""

    def __init__(self, kind: str, reply: str) -> None:
        super().__init__(f"{kind}: {reply}")
        self.kind = kind


async def read_reply(reader: asyncio.StreamReader, timeout: float) -> tuple[int, str]:
    """One (multi-line) reply: (code, last line)."""
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionError("connection closed by server")
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), line.decode("latin-1").rstrip()


async def expect(reader: asyncio.StreamReader, code: int, kind: str, timeout: float) -> str:
    got, text = await read_reply(reader, timeout)
    if got != code:
        raise SmtpError(kind, text)
    return text


@dataclass
class WorkerResult:
    sent: int = 0
    latencies: list[float] = field(default_factory=list)   # end of DATA -> 250
    sessions: list[float] = field(default_factory=list)    # connect -> 250 (first message)
    errors: dict[str, int] = field(default_factory=dict)
    t_first: float = 0.0
    t_last: float = 0.0
    cpu_s: float = 0.0
    connections: int = 0


async def client(
    idx: int, host: str, port: int, budget: list[int], deadline: float, size: int,
    reuse: int, timeout: float, res: WorkerResult, tag: str,
) -> None:
    """One session loop: take messages from the shared budget until it is empty."""
    seq = 0
    body = make_body(size)
    while budget[0] > 0 and time.monotonic() < deadline:
        writer = None
        t_conn = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=1 << 20), timeout)
            res.connections += 1
            await expect(reader, 220, "banner", timeout)
            writer.write(b"EHLO loadgen.bench.test\r\n")
            await expect(reader, 250, "ehlo", timeout)
            done_here = 0
            while budget[0] > 0 and time.monotonic() < deadline:
                budget[0] -= 1
                seq += 1
                if done_here:
                    writer.write(b"RSET\r\n")
                    await expect(reader, 250, "rset", timeout)
                writer.write(b"MAIL FROM:<sender@bench.test>\r\n")
                await expect(reader, 250, "mail", timeout)
                writer.write(b"RCPT TO:<rcpt@dest.test>\r\n")
                await expect(reader, 250, "rcpt", timeout)
                writer.write(b"DATA\r\n")
                await expect(reader, 354, "data", timeout)
                writer.write(make_head(idx * 1_000_000 + seq, tag) + body + b".\r\n")
                await asyncio.wait_for(writer.drain(), timeout)
                t_end = time.monotonic()
                await expect(reader, 250, "eod", timeout)
                now = time.monotonic()
                res.latencies.append(now - t_end)
                if done_here == 0:
                    res.sessions.append(now - t_conn)
                res.sent += 1
                if not res.t_first:
                    res.t_first = now
                res.t_last = now
                done_here += 1
                if reuse <= 1 or done_here >= reuse:
                    break
            writer.write(b"QUIT\r\n")
            try:
                await asyncio.wait_for(reader.read(512), timeout)
            except (asyncio.TimeoutError, ConnectionError):
                pass
        except SmtpError as e:
            res.errors[e.kind] = res.errors.get(e.kind, 0) + 1
        except asyncio.TimeoutError:
            res.errors["timeout"] = res.errors.get("timeout", 0) + 1
        except (ConnectionError, OSError) as e:
            k = type(e).__name__
            res.errors[k] = res.errors.get(k, 0) + 1
        finally:
            if writer is not None:
                writer.close()
                try:
                    await asyncio.wait_for(writer.wait_closed(), 2)
                except (asyncio.TimeoutError, ConnectionError, OSError):
                    pass
        if sum(res.errors.values()) > 1000:
            return  # something is badly wrong; stop hammering


def run_worker(args: tuple) -> WorkerResult:
    """Process entry: run *clients* sessions until the budget or deadline is hit."""
    host, port, clients, messages, start_at, limit_s, size, reuse, timeout, tag = args
    res = WorkerResult()
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    cpu0 = time.process_time()

    async def main() -> None:
        budget = [messages]
        deadline = time.monotonic() + limit_s
        await asyncio.gather(*(
            client(i, host, port, budget, deadline, size, reuse, timeout, res, tag)
            for i in range(clients)))
    asyncio.run(main())
    res.cpu_s = time.process_time() - cpu0
    return res


# ------------------------------------------------------------ server CPU


def tree_cpu_ticks(pid: int) -> int:
    """utime+stime (+ reaped children) of *pid* and all its live descendants."""
    stats: dict[int, list[bytes]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                data = open(f"/proc/{entry}/stat", "rb").read()
            except OSError:
                continue
            stats[int(entry)] = data[data.rindex(b")") + 2:].split()
    kids: dict[int, list[int]] = {}
    for p, f in stats.items():
        kids.setdefault(int(f[1]), []).append(p)
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        f = stats.get(p)
        if f is None:
            continue
        # utime stime cutime cstime
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        todo.extend(kids.get(p, []))
    return total


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat (iowait counts as idle)."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    total = sum(f[:8])
    return total - idle, total


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of *values* (seconds)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def size_label(size: int) -> str:
    return f"{size // 1024}k" if size % 1024 == 0 else str(size)


def measure(a: argparse.Namespace, size: int, messages: int, limit_s: float,
            pool: ProcessPoolExecutor | None) -> dict:
    """One run at one size; returns the summary record."""
    per = [a.clients // a.procs + (1 if i < a.clients % a.procs else 0) for i in range(a.procs)]
    msgs = [messages // a.procs + (1 if i < messages % a.procs else 0) for i in range(a.procs)]
    start_at = time.time() + (0.3 if pool else 0.0)
    tag = f"{size_label(size)}-{int(start_at)}"
    jobs = [(a.host, a.port, per[i], msgs[i], start_at, limit_s, size, a.reuse, a.timeout, tag)
            for i in range(a.procs) if per[i] > 0]
    cpu0 = tree_cpu_ticks(a.pid) if a.pid else 0
    busy0 = machine_busy_ticks()
    t0 = time.time()
    if pool:
        results = list(pool.map(run_worker, jobs))
    else:
        results = [run_worker(jobs[0])]
    t1 = time.time()
    cpu1 = tree_cpu_ticks(a.pid) if a.pid else 0
    busy1 = machine_busy_ticks()
    sent = sum(r.sent for r in results)
    lat = [x for r in results for x in r.latencies]
    sess = [x for r in results for x in r.sessions]
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
    wall = max(t1 - max(t0, start_at), 1e-9)
    rec = {
        "target": f"{a.host}:{a.port}", "name": a.name, "size": size, "clients": a.clients,
        "procs": a.procs, "reuse": a.reuse, "messages_wanted": messages, "time_limit_s": limit_s,
        "sent": sent, "wall_s": round(wall, 3), "msgs_per_s": round(sent / wall, 1),
        "mb_per_s": round(sent * size / wall / 1e6, 2),
        "latency_ms": {q: round(percentile(lat, float(q[1:])) * 1000, 2)
                       for q in ("p50", "p90", "p99")} | {
            "max": round(max(lat) * 1000, 2) if lat else None,
            "mean": round(statistics.fmean(lat) * 1000, 2) if lat else None},
        "session_ms": {"p50": round(percentile(sess, 50) * 1000, 2),
                       "p99": round(percentile(sess, 99) * 1000, 2)},
        "connections": sum(r.connections for r in results),
        "errors": errors,
        "loadgen_cpu_pct": round(100 * sum(r.cpu_s for r in results) / wall, 1),
        # all CPUs, in % of one core (2 cores = 200 %)
        "machine_busy_pct": round(100 * os.cpu_count() * (busy1[0] - busy0[0])
                                  / max(1, busy1[1] - busy0[1]), 1),
        "loadavg_1m": float(open("/proc/loadavg").read().split()[0]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if a.pid:
        rec["server_cpu_pct"] = round(100 * (cpu1 - cpu0) / CLK_TCK / wall, 1)
        # busy CPU that is neither the server nor the load generator (noise, kernel softirq)
        rec["other_cpu_pct"] = round(
            rec["machine_busy_pct"] - rec["server_cpu_pct"] - rec["loadgen_cpu_pct"], 1)
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", help="HOST:PORT (loopback)")
    ap.add_argument("-c", "--clients", type=int, default=20, help="concurrent sessions (20)")
    ap.add_argument("-m", "--messages", type=int, default=5000,
                    help="messages per run for sizes up to 16 KiB (5000)")
    ap.add_argument("-M", "--messages-large", type=int, default=1000,
                    help="messages per run for sizes above 16 KiB (1000)")
    ap.add_argument("-t", "--time-limit", type=float, default=60.0, help="seconds per run (60)")
    ap.add_argument("--sizes", default="4096,102400", help="message sizes in octets")
    ap.add_argument("--reuse", type=int, default=0,
                    help="messages per connection (0/1 = new connection per message)")
    ap.add_argument("--procs", type=int, default=1, help="load-generator processes (1)")
    ap.add_argument("--warmup", type=int, default=100, help="unmeasured messages first (100)")
    ap.add_argument("--runs", type=int, default=1, help="runs per size; median reported (1)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per SMTP step (30 s)")
    ap.add_argument("--pid", type=int, default=0, help="server PID: report its CPU (tree)")
    ap.add_argument("--name", default="", help="label stored in the JSON records")
    ap.add_argument("--json-out", default=None, help="append one JSON record per run")
    a = ap.parse_args(argv)
    host, _, port = a.target.rpartition(":")
    a.host, a.port = host.strip("[]") or "127.0.0.1", int(port)
    if not (a.host.startswith("127.") or a.host in ("::1", "localhost")):
        ap.error("loopback targets only")
    a.procs = max(1, min(a.procs, a.clients))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with socket.create_connection((a.host, a.port), timeout=5):
        pass
    sizes = [int(s) for s in a.sizes.split(",") if s]
    pool = ProcessPoolExecutor(a.procs) if a.procs > 1 else None
    summary: list[str] = []
    rc = 0
    try:
        for size in sizes:
            m = a.messages if size <= 16384 else a.messages_large
            if a.warmup:
                measure(a, size, a.warmup, min(a.time_limit, 30), pool)
            recs = []
            for i in range(a.runs):
                rec = measure(a, size, m, a.time_limit, pool)
                rec["run"] = i + 1
                recs.append(rec)
                lat = rec["latency_ms"]
                print(f"size={size} run={i + 1} sent={rec['sent']}/{m} wall={rec['wall_s']}s "
                      f"msgs/s={rec['msgs_per_s']} MB/s={rec['mb_per_s']} "
                      f"latency p50={lat['p50']}ms p90={lat['p90']}ms p99={lat['p99']}ms "
                      f"max={lat['max']}ms session p50={rec['session_ms']['p50']}ms "
                      f"errors={rec['errors'] or 0} loadgen_cpu={rec['loadgen_cpu_pct']}%"
                      + (f" server_cpu={rec['server_cpu_pct']}% other_cpu={rec['other_cpu_pct']}%"
                         if a.pid else "") + f" machine_busy={rec['machine_busy_pct']}%",
                      file=sys.stderr, flush=True)
                if a.json_out:
                    with open(a.json_out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                if rec["errors"] or rec["sent"] == 0:
                    rc = 1
            med = sorted(recs, key=lambda r: r["msgs_per_s"])[len(recs) // 2]
            lab = size_label(size)
            summary += [f"accept_{lab}_msgs_per_s={med['msgs_per_s']}",
                        f"accept_{lab}_p50_ms={med['latency_ms']['p50']}",
                        f"accept_{lab}_p99_ms={med['latency_ms']['p99']}"]
    finally:
        if pool:
            pool.shutdown()
    print(" ".join(summary), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
