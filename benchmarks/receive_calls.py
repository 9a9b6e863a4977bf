#!/usr/bin/env python3
"""Python and C function calls per received message: a deterministic A/B figure for a busy machine.

    .venv/bin/python benchmarks/receive_calls.py [-n 200] [--size 4096] [--repo DIR]

Runs ``rules_cpu.py``'s in-process receive loop (the real ESMTPServer on a
StringTransport, the in-memory store, a Clock; no rules) under
``sys.setprofile`` and counts the calls per message, after a warm-up of 50
messages. CPU time per message moves by 10-20 % with the neighbours' load on
a shared 2-core machine; these counts do not move at all, so a restructure
that only moves code can be checked with them (``--repo`` another checkout,
e.g. the commit before). Last line: ``python_calls_per_msg=N c_calls_per_msg=N``.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import sys
from types import FrameType
from typing import Any


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200, help="messages counted")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repo", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
                    help="checkout whose exmta is measured (default: this one)")
    args = ap.parse_args()
    path = os.path.join(os.path.abspath(args.repo), "benchmarks", "rules_cpu.py")
    spec = importlib.util.spec_from_file_location("rules_cpu", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # puts that checkout first on sys.path
    factory, store = bench.make_factory(None)
    bench.receive_loop(factory, store, args.size, 50, 60.0)  # warm-up: caches, lazy parsing
    counts: collections.Counter[str] = collections.Counter()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event in ("call", "c_call"):
            counts[event] += 1

    sys.setprofile(profile)
    try:
        n, _, _ = bench.receive_loop(factory, store, args.size, args.n, 600.0)
    finally:
        sys.setprofile(None)
    print(f"exmta from {sys.modules['exmta'].__file__}", file=sys.stderr)
    print(f"python_calls_per_msg={counts['call'] / n:.1f} c_calls_per_msg={counts['c_call'] / n:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
