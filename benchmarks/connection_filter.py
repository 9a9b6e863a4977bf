#!/usr/bin/env python3
"""CPU cost of connection filtering per connection, in process (no sockets, no DNS server).

    .venv/bin/python benchmarks/connection_filter.py [--connections 20000]

Real receive connectors (config -> policy -> ESMTPServerFactory) behind the
real dispatcher, connections on StringTransport, time on a task.Clock, DNS
answers from the list cache (a lookup function answers the first query of
each name at once). Prints connections/s up to the 220 (or the 554) and
back, for: no screening; three lists, client not listed; three lists,
client listed (refused at connect). The figure is what the reactor thread
spends; real lookups run on the lists' own thread pool.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from exmta.config.load import parse_config
from exmta.filters import FilterChain
from exmta.receive.wiring import ReceiveResources, make_dispatchers, make_policy
from exmta.smtp.server import ESMTPServerFactory
from exmta.testing.memstore import MemoryStore

EP = "tcp:2525:interface=127.0.0.1"


def dispatcher(sites: list[str]) -> Any:
    config = parse_config({
        "receive": {"edge": {"listen": [EP], "dnsbl_sites": sites}},
        "connection_filter": {"lists": {n: {"zone": f"{n}.example", "codes": ["127.0.0.[2..11]"]}
                                        for n in ("zen", "bl2", "bl3")}},
    })
    clock = Clock()
    store = MemoryStore(clock)
    rc = config.receive[0]
    factory = ESMTPServerFactory(rc, make_policy(config, rc, clock, ReceiveResources()),
                                 FilterChain((), clock), store, clock, local_domain=lambda d: False)
    d = dict(make_dispatchers(config.receive, [factory], clock))[EP]
    listed = {"2.2.0.192.zen.example"}
    d.entries[0].factory.screen.lookup = (
        lambda name, rdtype: succeed(((("127.0.0.2",) if name in listed else ()), 3600.0)))
    return d


def run(d: Any, peer: str, n: int) -> float:
    addr = IPv4Address("TCP", peer, 40000)
    start = time.perf_counter()
    for _ in range(n):
        proto = d.buildProtocol(addr)
        t = StringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
        proto.makeConnection(t)
        assert t.value()[:3] in (b"220", b"554")
        proto.connectionLost(Failure(ConnectionDone()))
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=20000)
    n = parser.parse_args().connections
    plain, lists = dispatcher([]), dispatcher(["zen", "bl2", "bl3"])
    run(lists, "192.0.2.2", 10)  # fill the cache
    run(lists, "192.0.2.3", 10)
    cases = [("no screening:                    ", plain, "192.0.2.3"),
             ("3 lists, client not listed (220):", lists, "192.0.2.3"),
             ("3 lists, client listed (554):    ", lists, "192.0.2.2")]
    best = [0.0] * len(cases)
    for _ in range(5):  # interleaved rounds, best of each: the machine is shared
        for i, (_, d, peer) in enumerate(cases):
            best[i] = max(best[i], run(d, peer, n // 5))
    print(f"connections/s, best of 5 rounds of {n // 5} (CPU of the reactor thread, answers cached):")
    for (label, _, _), rate in zip(cases, best):
        print(f"  {label} {rate:10.0f}")


if __name__ == "__main__":
    main()
