#!/usr/bin/env python3
"""Issue 11 figures for the admin API and the metrics listener: memory and stall under three attacks.

    benchmarks/admin_attacks.py [--repo DIR] [--body-mb 300] [--records 300000]

Starts ``twistd -n exmta`` from ``--repo`` (default: this checkout; give an
old checkout for the "before" figures) on free loopback ports, then

1. POSTs ``--body-mb`` MB to ``/api/queues`` without a token, and the same
   to the metrics listener's ``/metrics``: the server's peak RSS growth
   (VmHWM) and the answer;
2. writes a tracking log of ``--records`` records and searches it from the
   status page (a query every record matches, then one none matches) while
   another client times SMTP NOOPs: the longest NOOP wait (the stall) and
   the RSS growth.

Prints one ``key=value`` line per figure. Runs well under a minute.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TOML = """
[server]
hostname = "mx.example.test"
data_dir = "{data}"
receive_workers = 0
[accepted_domains]
"example.test" = "authoritative"
[receive.default]
listen = ["tcp:{smtp}:interface=127.0.0.1"]
relay_networks = ["127.0.0.0/8"]
[send.local]
type = "maildir"
root = "mail"
[[route]]
domains = ["example.test"]
connector = "local"
[admin]
listen = ["tcp:{admin}:interface=127.0.0.1"]
[metrics]
listen = "tcp:{metrics}:interface=127.0.0.1"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def wait_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} never opened")


def post_big(port: int, path: str, mb: int, chunked: bool = False) -> tuple[str, int]:
    """Send a ``mb`` MB body (stopping if the server closes); (the answer's status line, MB sent)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    total = mb * 1024 * 1024
    length = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % total
    s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n" % (path.encode(), length))
    block = b"x" * (1024 * 1024)
    if chunked:
        block = b"%x\r\n%s\r\n" % (len(block), block)
    sent = 0
    try:
        for _ in range(mb):
            s.sendall(block)
            sent += 1
        if chunked:
            s.sendall(b"0\r\n\r\n")
    except OSError:
        pass
    try:
        answer = s.recv(200).split(b"\r\n", 1)[0].decode()
    except OSError as e:
        answer = f"({e.__class__.__name__})"
    s.close()
    return answer or "(closed)", sent


def noop_stall(port: int, stop: threading.Event, out: list[float]) -> None:
    """Time NOOPs until ``stop``; a new session every 20 (exmta counts idle NOOPs as errors)."""
    while not stop.is_set():
        t = time.monotonic()
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        f = s.makefile("rb")
        f.readline()
        out.append(time.monotonic() - t)
        for _ in range(20):
            if stop.is_set():
                break
            t = time.monotonic()
            s.sendall(b"NOOP\r\n")
            f.readline()
            out.append(time.monotonic() - t)
            time.sleep(0.01)
        s.sendall(b"QUIT\r\n")
        f.readline()
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--body-mb", type=int, default=300)
    ap.add_argument("--records", type=int, default=300000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="exmta-attacks-"))
    ports = {"smtp": free_port(), "admin": free_port(), "metrics": free_port()}
    data = tmp / "data"
    (data / "log").mkdir(parents=True)
    conf = tmp / "exmta.toml"
    conf.write_text(TOML.format(data=data, **ports))
    env = dict(os.environ, PYTHONPATH=args.repo)
    twistd = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0]='twistd'; run()",
              "-n", "--pidfile", str(tmp / "pid"), "exmta", "-c", str(conf)]
    proc = subprocess.Popen(twistd, env=env, cwd=tmp, stdout=open(tmp / "log", "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        for p in ports.values():
            wait_port(p, deadline)
        while not (data / "admin.token").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        token = (data / "admin.token").read_text().strip()
        for name, port, path, chunked in (("admin_api", ports["admin"], "/api/queues", False),
                                          ("admin_api_chunked", ports["admin"], "/api/queues", True),
                                          ("metrics", ports["metrics"], "/metrics", False),
                                          ("metrics_chunked", ports["metrics"], "/metrics", True)):
            before = vm(proc.pid, "VmHWM")
            start = time.monotonic()
            answer, sent = post_big(port, path, args.body_mb, chunked)
            took = time.monotonic() - start
            time.sleep(0.5)
            print(f"{name}_post_{args.body_mb}mb answer={answer!r} mb_accepted_before_answer={sent} "
                  f"took_s={took:.2f} rss_peak_growth_mb={(vm(proc.pid, 'VmHWM') - before) / 2**20:.0f}")

        with open(data / "log" / "tracking.jsonl", "ab") as f:
            for i in range(args.records):
                f.write(json.dumps({"timestamp": 1.7e9 + i, "event_id": "RECEIVE", "queue_id": f"Q{i:08d}",
                                    "sender": "bulk@example.org", "recipients": ["bob@example.test"],
                                    "message_id": f"<{i}@example.org>", "size": 1234}).encode() + b"\n")
        for label, query in (("matching", "bulk%40example.org"), ("no_match", "nobody%40example.org")):
            stalls: list[float] = []
            stop = threading.Event()
            t = threading.Thread(target=noop_stall, args=(ports["smtp"], stop, stalls))
            t.start()
            time.sleep(0.3)
            before = vm(proc.pid, "VmHWM")
            start = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", ports["admin"], timeout=120)
            conn.request("GET", f"/status?q={query}", headers={"Authorization": f"Bearer {token}"})
            resp = conn.getresponse()
            body = resp.read()
            took = time.monotonic() - start
            time.sleep(0.3)
            stop.set()
            t.join()
            rows = body.count(b'class="event"')
            print(f"status_search_{args.records}_records_{label} status={resp.status} rows={rows} "
                  f"took_s={took:.2f} longest_noop_s={max(stalls):.2f} "
                  f"rss_peak_growth_mb={(vm(proc.pid, 'VmHWM') - before) / 2**20:.0f}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
