#!/usr/bin/env python3
"""CPU that node-wide limits add per relayed message with receive workers (exmta.receive.noderates).

With a connection limit and a per-IP message and recipient rate limit, one
message (one session, one MAIL, one RCPT) costs a receive worker three
requests to the main process (session open, MAIL, RCPT) and one line when
the session ends; the main process answers each. This times both sides in
one process, without pipes (the lines are handed over directly), so the
figure is the CPU of encoding, answering and decoding, not of the pipe
writes, which share the writes a worker already makes for each message.

    .venv/bin/python benchmarks/node_limits_cpu.py [-n 20000]

Prints microseconds of CPU per message for the worker side and the main
process side, and ``key=value`` figures last.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from twisted.internet.task import Clock

from exmta.receive.noderates import NodeRates, RemoteRates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20000, help="messages (default 20000)")
    args = parser.parse_args()
    clock = Clock()
    clock.advance(1_000_000)
    node = NodeRates(clock)
    lines: list[bytes] = []
    remote = RemoteRates(lines.append, clock, fd=-1)
    remote.running = True
    messages = remote.counter("inbound/messages_per_ip", 10**9)
    recipients = remote.counter("inbound/recipients_per_ip", 10**9)
    answered: list[Any] = []
    worker_cpu = main_cpu = 0.0
    for i in range(args.n):
        ip = f"192.0.2.{i % 200}"
        for ask in (lambda: remote.open_connection("inbound", ip, 10**5, 10**5),
                    lambda: remote.take([(messages, ip)]), lambda: remote.take([(recipients, ip)])):
            t0 = time.process_time()
            ask().addCallback(answered.append)
            t1 = time.process_time()
            answer = node.answer(lines.pop()[1:-1], 0)
            t2 = time.process_time()
            remote.lines_received(answer)
            t3 = time.process_time()
            worker_cpu += (t1 - t0) + (t3 - t2)
            main_cpu += t2 - t1
        t0 = time.process_time()
        remote.close_connection("inbound", ip)
        t1 = time.process_time()
        node.answer(lines.pop()[1:-1], 0)
        t2 = time.process_time()
        worker_cpu += t1 - t0
        main_cpu += t2 - t1
    assert len(answered) == 3 * args.n and not any(answered), "every check must pass"
    assert node.connection_counter("inbound").total == 0
    per_worker = worker_cpu / args.n * 1e6
    per_main = main_cpu / args.n * 1e6
    print(f"{args.n} messages: worker {per_worker:.1f} us CPU per message, main process {per_main:.1f} us")
    print(f"node_limits_worker_us_per_msg={per_worker:.1f} node_limits_main_us_per_msg={per_main:.1f}")


if __name__ == "__main__":
    main()
