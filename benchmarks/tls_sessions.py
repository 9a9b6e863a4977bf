#!/usr/bin/env python3
"""TLS session cost: plaintext vs STARTTLS vs implicit TLS against ``twistd -n exmta`` (one process).

    python3 benchmarks/tls_sessions.py

Starts exmta (tests/support/exmta_proc.py) with a STARTTLS connector and an
implicit-TLS connector, certificates from a test CA (trustme, ECDSA P-256),
then runs 400 sessions of each kind from 8 client threads (smtplib) and
prints sessions per second, client latency p50/p99 and the server's CPU
time per session (from /proc/PID/stat).  Loopback only.
"""
import os
import smtplib
import ssl
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.tlscerts import TestPKI
from support.exmta_proc import ExmtaProcess
from support.procs import free_port

work = Path(tempfile.mkdtemp())
pki = TestPKI(work / "pki")
f = pki.server("mx.example.test")
p465 = free_port()
toml = f'''
[server]
hostname = "mx.example.test"
data_dir = "{{data_dir}}"
receive_workers = 0
[accepted_domains]
"example.test" = "authoritative"
[receive.default]
listen = ["tcp:{{port}}:interface=127.0.0.1"]
max_connections = 1000
max_connections_per_ip = 1000
[receive.default.tls]
cert = "{f.cert}"
key = "{f.key}"
[receive.smtps]
listen = ["tcp:{p465}:interface=127.0.0.1"]
[receive.smtps.tls]
cert = "{f.cert}"
key = "{f.key}"
implicit = true
[send.local]
type = "maildir"
root = "mail"
[[route]]
domains = ["example.test"]
connector = "local"
'''
ex = ExmtaProcess(work / "ex", toml=toml).start()
ctx = ssl.create_default_context(cafile=str(pki.ca_file)); ctx.check_hostname = False

def plain():
    t = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", ex.port, timeout=30) as s:
        s.ehlo("c.test")
    return time.perf_counter() - t

def starttls():
    t = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", ex.port, timeout=30) as s:
        s.ehlo("c.test"); s.starttls(context=ctx); s.ehlo("c.test")
    return time.perf_counter() - t

def implicit():
    t = time.perf_counter()
    with smtplib.SMTP_SSL("127.0.0.1", p465, timeout=30, context=ctx) as s:
        s.ehlo("c.test")
    return time.perf_counter() - t

try:
    for name, fn in (("plaintext EHLO+QUIT", plain), ("STARTTLS EHLO+STARTTLS+EHLO+QUIT", starttls),
                     ("implicit TLS EHLO+QUIT", implicit)):
        for _ in range(20): fn()
        n = 400
        def cpu():
            fields = open(f"/proc/{ex.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        c0 = cpu()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            lat = list(pool.map(lambda _: fn(), range(n)))
        dt = time.perf_counter() - t0
        c1 = cpu()
        lat.sort()
        print(f"   server CPU {1000*(c1-c0)/n:.2f} ms per session")
        print(f"{name:40s} {n/dt:7.0f} sessions/s (8 clients)  p50 {statistics.median(lat)*1000:6.1f} ms  p99 {lat[int(n*0.99)]*1000:6.1f} ms")
    print("errors in log:", ex.error_lines())
finally:
    ex.stop()
