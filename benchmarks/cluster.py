#!/usr/bin/env python3
"""Relay throughput with the PostgreSQL queue against the spool, in one run (loopback only, bounded).

    .venv/bin/python benchmarks/cluster.py [-m 2000] [-M 400] [--clients 20] [--variants spool,pg1,pg2,pg3]

For each variant and message size (4 KiB with ``-m`` messages, 100 KiB with
``-M``): start the node(s) (``spool``: one node on its spool; ``pgN``: N
nodes sharing one private PostgreSQL, started from Debian's binaries in a
temporary directory on a Unix socket), relay everything to a counting sink,
send the messages with ``--clients`` concurrent SMTP clients (a new
connection per message, spread round-robin over the nodes), and report

* relay msgs/s: messages / (first connect .. last message counted by the sink)
* CPU per message: user+system CPU of the node processes (and of PostgreSQL
  for pgN) divided by the messages

Every loop is bounded by its count and a time limit; every process started is
stopped by its PID. The figures are for quoting in benchmarks/PERFORMANCE.rst:
run it on a quiet machine (compare ``other_cpu`` in the output).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.postgres import PostgresCluster  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu(pid: int) -> float:
    """CPU seconds of pid and its live descendants (utime+stime, with reaped children's)."""
    total = 0.0
    pids = [pid]
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK
        except (OSError, IndexError, ValueError):
            pass
    return total


class Sink:
    """A counting SMTP sink on 127.0.0.1 (asyncio, in this process's event loop)."""

    def __init__(self) -> None:
        self.count = 0
        self.last = 0.0
        self.port = free_port()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        try:
            await self._session(reader, writer)
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if True:
            while True:
                line = await reader.readline()
                if not line:
                    return
                cmd = line[:4].upper()
                if cmd == b"DATA":
                    writer.write(b"354 go\r\n")
                    while True:
                        chunk = await reader.readline()
                        if not chunk or chunk == b".\r\n":
                            break
                    self.count += 1
                    self.last = time.monotonic()
                    writer.write(b"250 2.0.0 ok\r\n")
                elif cmd == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                elif cmd in (b"EHLO", b"HELO"):
                    writer.write(b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()


async def send_one(port: int, payload: bytes, timeout: float = 30.0) -> bool:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        async def reply() -> bytes:
            while True:
                line = await asyncio.wait_for(reader.readline(), timeout)
                if not line or line[3:4] != b"-":
                    return line
        await reply()
        for cmd in (b"EHLO bench\r\n", b"MAIL FROM:<a@bench.test>\r\n", b"RCPT TO:<r@dest.test>\r\n", b"DATA\r\n"):
            writer.write(cmd)
            code = await reply()
            if not code[:1] in (b"2", b"3"):
                return False
        writer.write(payload + b".\r\n")
        ok = (await reply())[:3] == b"250"
        writer.write(b"QUIT\r\n")
        return ok
    finally:
        writer.close()


def node_config(workdir: Path, port: int, sink_port: int, dsn: str | None, name: str) -> Path:
    queue = f'[queue]\nstore = "postgres"\n\n[postgres]\ndsn = "{dsn}"\nnode = "{name}"\n' if dsn else ""
    text = f"""[server]
hostname = "{name}.bench.test"
data_dir = "{workdir / 'data'}"

[accepted_domains]
"bench.test" = "authoritative"

[receive.default]
listen = ["tcp:{port}:interface=127.0.0.1"]
relay_networks = ["127.0.0.0/8"]
max_connections_per_ip = 1000         # the load generator is one address

[send.out]
type = "smtp"
smarthosts = ["[127.0.0.1]:{sink_port}"]
tls = "none"

[[route]]
domains = ["*"]
connector = "out"

[admin]
enabled = false

[metrics]
enabled = false

{queue}"""
    path = workdir / "exmta.toml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(4) == b"220 ":
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers on {port}")


async def run_variant(variant: str, size: int, count: int, clients: int, tmp: Path,
                      pg: PostgresCluster | None) -> dict[str, float]:
    sink = Sink()
    server = await asyncio.start_server(sink.handle, "127.0.0.1", sink.port)
    nodes = 1 if variant == "spool" else int(variant[2:])
    dsn = None
    if variant != "spool":
        assert pg is not None
        dsn = pg.create_database()
        from exmta.queue.postgres import migrate_dsn
        migrate_dsn(dsn)
    procs = []
    ports = []
    try:
        for i in range(nodes):
            port = free_port()
            conf = node_config(tmp / f"{variant}-{size}-{i}", port, sink.port, dsn, f"n{i}")
            log = open(conf.parent / "exmta.log", "wb")
            procs.append(subprocess.Popen([str(REPO / ".venv" / "bin" / "twistd"), "-n", "--pidfile", "",
                                           "exmta", "-c", str(conf)], cwd=conf.parent, stdout=log, stderr=log,
                                          env={**os.environ, "PYTHONPATH": str(REPO)}))
            ports.append(port)
        for port in ports:
            await asyncio.get_running_loop().run_in_executor(None, wait_port, port)
        line = b"x" * 76 + b"\r\n"
        body = line * max(1, size // len(line))
        payload = b"Subject: bench\r\nFrom: a@bench.test\r\n\r\n" + body
        cpu0 = sum(tree_cpu(p.pid) for p in procs)
        pg_cpu0 = tree_cpu(pg.proc.pid) if pg and pg.proc and dsn else 0.0
        start = time.monotonic()
        sent = 0
        failed = 0
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(count):
            queue.put_nowait(n)

        async def client() -> None:
            nonlocal sent, failed
            while not queue.empty():
                n = queue.get_nowait()
                try:
                    ok = await send_one(ports[n % len(ports)], payload)
                except (OSError, asyncio.TimeoutError):
                    ok = False
                sent += ok
                failed += not ok
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), timeout=600)
        deadline = time.monotonic() + 300
        while sink.count < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        elapsed = (sink.last or time.monotonic()) - start
        cpu = sum(tree_cpu(p.pid) for p in procs) - cpu0
        pg_cpu = (tree_cpu(pg.proc.pid) - pg_cpu0) if pg and pg.proc and dsn else 0.0
        return {"sent": sent, "failed": failed, "delivered": sink.count,
                "msgs_per_s": sink.count / elapsed if elapsed > 0 else 0.0,
                "cpu_ms_per_msg": 1000 * cpu / max(1, sink.count),
                "pg_cpu_ms_per_msg": 1000 * pg_cpu / max(1, sink.count)}
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        server.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", type=int, default=2000, help="4 KiB messages per variant")
    ap.add_argument("-M", type=int, default=400, help="100 KiB messages per variant")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--variants", default="spool,pg1,pg2,pg3")
    args = ap.parse_args()
    variants = args.variants.split(",")
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="exmta-bench-cluster-") as tmp, PostgresCluster() as pg:
        for size, count in ((4096, args.m), (102400, args.M)):
            for variant in variants:
                r = asyncio.run(run_variant(variant, size, count, args.clients, Path(tmp), pg))
                print(f"{variant:>5} {size // 1024:>3} KiB: {r['msgs_per_s']:7.1f} msgs/s relayed "
                      f"({r['delivered']}/{r['sent']} delivered, {r['failed']} refused), exmta CPU "
                      f"{r['cpu_ms_per_msg']:.2f} ms/msg, PostgreSQL CPU {r['pg_cpu_ms_per_msg']:.2f} ms/msg",
                      flush=True)
    print(f"load average before the run: {load0:.2f} (a busy machine makes these figures noise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
