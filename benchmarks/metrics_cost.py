#!/usr/bin/env python3
"""CPU microseconds per relayed message spent on metrics, by part (benchmarks/PERFORMANCE.rst).

What one relayed message costs the metrics, outside any network: a session
opened, a RECEIVE and a SEND event (with latency and TLS) through

* ``prometheus``: exmta.observe.metrics.Metrics (prometheus-client counters
  and the latency histogram; only with the ``metrics`` extra);
* ``throughput``: the per-minute counts of the status page and alert rates
  (always on);
* ``worker-lines``: with receive workers, the JSON lines a worker writes for
  those events (exmta.observe.worker_metrics) and the main process decodes and counts.

CPU time (``time.process_time``) of ``-n`` messages (default 20000), best of
``--runs`` (3), so a busy machine inflates it less than wall time. Compare with
the CPU per message of a whole relay (benchmarks/cpu_per_msg.sh: about 2 ms).
Last line: ``prometheus_us_per_msg=.. throughput_us_per_msg=.. worker_lines_us_per_msg=.. total_us_per_msg=..``
(the worker lines' pipe write and read are system calls not counted here).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet.task import Clock  # noqa: E402

from exmta.model import TrackingEvent, TrackingEventId  # noqa: E402
from exmta.observe import metrics as metrics_mod  # noqa: E402
from exmta.observe.worker_metrics import WorkerRelay, dispatch  # noqa: E402


def events(clock: Clock, i: int) -> tuple[TrackingEvent, TrackingEvent]:
    qid = f"{int(clock.seconds() * 1_000_000):013X}{i:08X}"
    receive = TrackingEvent(TrackingEventId.RECEIVE, qid, clock.seconds(), sender="a@x.test",
                            recipients=("b@y.test",), message_id=f"<{i}@x.test>", size=4096, connector="default",
                            source="SMTP", remote_host="127.0.0.1")
    send = TrackingEvent(TrackingEventId.SEND, qid, clock.seconds() + 0.05, sender="a@x.test",
                         recipients=("b@y.test",), size=4096, connector="sink", source="SMTP",
                         remote_host="127.0.0.1[127.0.0.1]:25", reply="250 2.0.0 Ok",
                         tls="TLSv1.3 TLS_AES_256_GCM_SHA384", details={"latency": 0.05})
    return receive, send


def cost(n: int, runs: int, one_message) -> float:
    """Best CPU microseconds per message over ``runs`` runs of ``n``."""
    best = float("inf")
    for _ in range(runs):
        start = time.process_time()
        for i in range(n):
            one_message(i)
        best = min(best, (time.process_time() - start) / n * 1e6)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    clock = Clock()
    clock.advance(1_700_000_000)
    figures = {}
    base = cost(a.n, a.runs, lambda i: events(clock, i))  # making the events: not a metrics cost

    if metrics_mod.AVAILABLE:
        m = metrics_mod.Metrics(clock)

        def prometheus(i: int) -> None:
            receive, send = events(clock, i)
            m.session_opened("default")
            m.track(receive)
            m.track(send)

        figures["prometheus"] = cost(a.n, a.runs, prometheus) - base
    t = metrics_mod.Throughput(clock)

    def throughput(i: int) -> None:
        receive, send = events(clock, i)
        t.track(receive)
        t.track(send)

    figures["throughput"] = cost(a.n, a.runs, throughput) - base
    lines: list[bytes] = []
    relay = WorkerRelay(lines.append)
    main_metrics = metrics_mod.Metrics(clock) if metrics_mod.AVAILABLE else None
    main_throughput = metrics_mod.Throughput(clock)
    trackers = [x for x in (main_metrics, main_throughput) if x is not None]

    def worker_lines(i: int) -> None:
        receive, _ = events(clock, i)
        relay.session_opened("default")
        relay.track(receive)
        for line in lines:
            dispatch(line.rstrip(b"\n"), main_metrics, trackers)
        lines.clear()

    # the relay's own part: the lines, minus counting them (measured above)
    figures["worker_lines"] = max(0.0, cost(a.n, a.runs, worker_lines) - base - figures.get("prometheus", 0.0) / 2
                                  - figures["throughput"] / 2)
    figures["total"] = sum(figures.values())
    for name, us in figures.items():
        print(f"{name}: {us:.1f} us CPU per message", file=sys.stderr)
    print(" ".join(f"{k}_us_per_msg={v:.1f}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
