#!/usr/bin/env python3
"""Memory per idle SMTP connection (self-contained, stdlib only).

    benchmarks/idle.py 127.0.0.1:2525 --pid PID [-n 1000] [--hold 5] [--json-out FILE]

1. records RSS and PSS of the server: PID and all its descendants, from
   ``/proc/<pid>/smaps_rollup`` (PSS shares pages fairly between processes,
   so it is the figure to compare between a one-process server and a
   process-per-connection one);
2. opens ``-n`` connections (at most ``--concurrency`` opening at a time),
   each reads the 220 banner and gets a 250 reply to EHLO, then stays idle;
3. records memory again (after 1 s to settle) and reports the delta per
   connection;
4. checks that a *new* session still completes a whole transaction
   (EHLO, MAIL, RCPT, DATA, QUIT) and times it;
5. holds ``--hold`` seconds, then sends NOOP on every idle connection and
   counts those that still answer 250 (``kept``); closes everything.

Every step is bounded by ``--timeout``.  Loopback only.  Needs root or the
same user as the server to read smaps_rollup of its processes.
Last line: ``idle_conns=N kept=N rss_kb_per_conn=.. pss_kb_per_conn=.. probe_ok=0/1``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time


def tree_pids(pid: int) -> list[int]:
    """*pid* and all its live descendants."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                data = open(f"/proc/{entry}/stat", "rb").read()
            except OSError:
                continue
            kids.setdefault(int(data[data.rindex(b")") + 2:].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def tree_memory(pid: int) -> dict[str, int]:
    """Summed Rss/Pss (kB) of *pid* and descendants, and the process count."""
    tot = {"rss_kb": 0, "pss_kb": 0, "procs": 0}
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        tot["procs"] += 1
        for line in lines:
            key, _, rest = line.partition(":")
            if key == "Rss":
                tot["rss_kb"] += int(rest.split()[0])
            elif key == "Pss":
                tot["pss_kb"] += int(rest.split()[0])
    return tot


async def reply(reader: asyncio.StreamReader, timeout: float) -> int:
    """Read one (multi-line) SMTP reply; return its code."""
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionError("closed by server")
        if line[3:4] != b"-":
            return int(line[:3])


async def open_idle(host: str, port: int, timeout: float,
                    sem: asyncio.Semaphore) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect, 220, EHLO, 250; return the open stream pair."""
    async with sem:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        try:
            if await reply(reader, timeout) != 220:
                raise ConnectionError("no 220 banner")
            writer.write(b"EHLO idle.bench.test\r\n")
            if await reply(reader, timeout) != 250:
                raise ConnectionError("EHLO refused")
        except BaseException:
            writer.close()
            raise
        return reader, writer


async def probe_transaction(host: str, port: int, timeout: float) -> float:
    """A whole transaction on a new connection; return its duration (s)."""
    t0 = time.monotonic()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        steps = [(None, 220), (b"EHLO probe.bench.test\r\n", 250),
                 (b"MAIL FROM:<probe@bench.test>\r\n", 250),
                 (b"RCPT TO:<probe@dest.test>\r\n", 250),
                 (b"DATA\r\n", 354),
                 (b"Subject: idle probe\r\nMessage-ID: <probe@bench.test>\r\n\r\n"
                  b"probe\r\n.\r\n", 250),
                 (b"QUIT\r\n", 221)]
        for cmd, want in steps:
            if cmd:
                writer.write(cmd)
            got = await reply(reader, timeout)
            if got != want:
                raise ConnectionError(f"probe: {cmd!r} -> {got}")
    finally:
        writer.close()
    return time.monotonic() - t0


async def still_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     timeout: float) -> bool:
    """NOOP on an idle connection answers 250."""
    try:
        writer.write(b"NOOP\r\n")
        return await reply(reader, timeout) == 250
    except (OSError, ConnectionError, asyncio.TimeoutError, ValueError):
        return False


async def run(a: argparse.Namespace) -> dict:
    before = tree_memory(a.pid)
    sem = asyncio.Semaphore(a.concurrency)
    t0 = time.monotonic()
    results = await asyncio.gather(
        *(open_idle(a.host, a.port, a.timeout, sem) for _ in range(a.n)), return_exceptions=True)
    t_open = time.monotonic() - t0
    conns = [r for r in results if isinstance(r, tuple)]
    errors: dict[str, int] = {}
    for r in results:
        if isinstance(r, BaseException):
            errors[type(r).__name__] = errors.get(type(r).__name__, 0) + 1
    await asyncio.sleep(1.0)
    after = tree_memory(a.pid)
    try:
        probe_s: float | None = await probe_transaction(a.host, a.port, a.timeout)
    except (OSError, ConnectionError, asyncio.TimeoutError, ValueError) as e:
        print(f"probe failed: {e!r}", file=sys.stderr)
        probe_s = None
    await asyncio.sleep(a.hold)
    alive = await asyncio.gather(*(still_open(r, w, a.timeout) for r, w in conns))
    for _, w in conns:
        w.close()
    n = max(1, len(conns))
    return {
        "target": f"{a.host}:{a.port}", "name": a.name, "wanted": a.n, "established": len(conns),
        "kept": sum(alive), "errors": errors, "open_s": round(t_open, 2),
        "before": before, "after": after,
        "rss_delta_kb": after["rss_kb"] - before["rss_kb"],
        "pss_delta_kb": after["pss_kb"] - before["pss_kb"],
        "rss_kb_per_conn": round((after["rss_kb"] - before["rss_kb"]) / n, 1),
        "pss_kb_per_conn": round((after["pss_kb"] - before["pss_kb"]) / n, 1),
        "probe_ok": int(probe_s is not None),
        "probe_ms": round(probe_s * 1000, 1) if probe_s is not None else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", help="HOST:PORT (loopback)")
    ap.add_argument("--pid", type=int, required=True, help="server PID (descendants included)")
    ap.add_argument("-n", type=int, default=1000, help="idle connections (1000)")
    ap.add_argument("--concurrency", type=int, default=100, help="connections opening at once")
    ap.add_argument("--hold", type=float, default=5.0, help="seconds to hold before the NOOP check")
    ap.add_argument("--timeout", type=float, default=30.0, help="per step (30 s)")
    ap.add_argument("--name", default="")
    ap.add_argument("--json-out", default=None, help="append the JSON record to FILE")
    a = ap.parse_args(argv)
    host, _, port = a.target.rpartition(":")
    a.host, a.port = host.strip("[]") or "127.0.0.1", int(port)
    if not (a.host.startswith("127.") or a.host in ("::1", "localhost")):
        ap.error("loopback targets only")
    if not os.path.exists(f"/proc/{a.pid}"):
        ap.error(f"no process {a.pid}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < a.n + 100:
        ap.error(f"RLIMIT_NOFILE hard limit {hard} < {a.n + 100}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rec = asyncio.run(run(a))
    b, f = rec["before"], rec["after"]
    mb = lambda kb: f"{kb / 1024:.1f}"  # noqa: E731
    print(f"procs {b['procs']} -> {f['procs']}; RSS {mb(b['rss_kb'])} -> {mb(f['rss_kb'])} MB; "
          f"PSS {mb(b['pss_kb'])} -> {mb(f['pss_kb'])} MB; "
          f"opened {rec['established']}/{rec['wanted']} in {rec['open_s']} s "
          f"(errors {rec['errors'] or 0}); kept {rec['kept']} after {a.hold:g} s; "
          f"new-session probe {rec['probe_ms']} ms", file=sys.stderr)
    if a.json_out:
        with open(a.json_out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
    print(f"idle_conns={rec['established']} kept={rec['kept']} "
          f"rss_kb_per_conn={rec['rss_kb_per_conn']} pss_kb_per_conn={rec['pss_kb_per_conn']} "
          f"probe_ok={rec['probe_ok']}")
    ok = rec["established"] == a.n and rec["kept"] == a.n and rec["probe_ok"]
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
