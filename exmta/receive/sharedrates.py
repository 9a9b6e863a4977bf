"""Receive rate limits counted across every process of every node (with the PostgreSQL queue).

:class:`~exmta.receive.ratelimit.RateCounter` counts in one process, so
behind a load balancer (and with receive workers) a sender got the limit
once per process. Here each process keeps counting locally, exactly as
before, and a :class:`RateExchange` trades counts with the others through the
``exmta_rate`` table once per ``interval`` (1 s): it adds this process's new
counts to per-minute buckets and reads back what every other process counted
in the current and the previous minute, for the keys that count (the
busiest 10,000). A check then sees its own count plus the others' as of the
last exchange: no database round trip on any SMTP command, at the price of
at most one interval's lag between nodes. The table is UNLOGGED (rate counts
need no crash safety) and buckets older than two minutes are deleted.
"""
from __future__ import annotations

import os
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from exmta.receive.ratelimit import RateCounter

__all__ = ["RateExchange", "SharedRateCounter"]

MINUTE = 60


class SharedRateCounter(RateCounter):
    """A RateCounter whose estimate adds what the other processes counted (via a RateExchange)."""

    def __init__(self, exchange: RateExchange, name: str, limit: int, clock: Any) -> None:
        super().__init__(limit, clock)
        self.exchange = exchange
        self.name = name

    def current(self, key: str) -> float:
        return super().current(key) + self.exchange.remote(self.name, key)

    def add(self, key: str, n: int = 1) -> None:
        super().add(key, n)
        if self.limit:
            self.exchange.note(self.name, key, n)


class RateExchange:
    """Trades rate counts with the other processes through PostgreSQL; ``service`` runs the exchange."""

    log = Logger(namespace="exmta.receive.sharedrates")

    def __init__(self, store: Any, clock: Any, interval: float = 1.0, max_keys: int = 10_000) -> None:
        self.store = store                    # an exmta.queue.postgres.PostgresStore (connections, threads)
        self.clock = clock
        self.max_keys = max_keys
        self.source = f"{store.node}:{os.getpid()}"
        self._pending: dict[tuple[str, str], int] = {}
        # (name, key) -> (others' count in the current minute bucket, in the previous one), as of the last exchange
        self._remote: dict[tuple[str, str], tuple[int, int]] = {}
        self._bucket = 0
        self._busy = False
        self.exchanges = 0
        self.service = TimerService(interval, self.exchange)
        self.service.clock = clock

    def counter(self, name: str, limit: int) -> SharedRateCounter:
        return SharedRateCounter(self, name, limit, self.clock)

    def note(self, name: str, key: str, n: int) -> None:
        self._pending[(name, key)] = self._pending.get((name, key), 0) + n

    def remote(self, name: str, key: str) -> float:
        """The other processes' events for (name, key) in the last minute (sliding estimate)."""
        counts = self._remote.get((name, key))
        if counts is None:
            return 0.0
        now = self.clock.seconds()
        bucket = int(now // MINUTE)
        current, previous = counts
        if bucket == self._bucket + 1:  # the exchange has not run in this minute yet
            current, previous = 0, current
        elif bucket != self._bucket:
            return 0.0
        overlap = 1.0 - (now - bucket * MINUTE) / MINUTE
        return current + previous * overlap

    def exchange(self) -> Deferred[Any]:
        """Write this process's new counts, read everyone else's (on the store's threads)."""
        if self._busy:
            return succeed(None)
        pending, self._pending = self._pending, {}
        bucket = int(self.clock.seconds() // MINUTE)
        source, max_keys = self.source, self.max_keys
        self._busy = True

        def work(cur: Any) -> dict[tuple[str, str], tuple[int, int]]:
            if pending:
                cur.executemany(
                    "INSERT INTO exmta_rate (name, key, bucket, source, count) VALUES (%s, %s, %s, %s, %s)"
                    " ON CONFLICT (name, key, bucket, source) DO UPDATE SET count = exmta_rate.count + excluded.count",
                    [(name, key, bucket, source, n) for (name, key), n in pending.items()])
            cur.execute("DELETE FROM exmta_rate WHERE bucket < %s", (bucket - 1,))
            cur.execute(
                "SELECT name, key, sum(count) FILTER (WHERE bucket = %s), sum(count) FILTER (WHERE bucket = %s)"
                " FROM exmta_rate WHERE bucket >= %s AND source <> %s GROUP BY name, key"
                " ORDER BY sum(count) DESC LIMIT %s", (bucket, bucket - 1, bucket - 1, source, max_keys))
            return {(name, key): (int(cur_n or 0), int(prev_n or 0)) for name, key, cur_n, prev_n in cur.fetchall()}

        def done(remote: dict[tuple[str, str], tuple[int, int]]) -> None:
            self._busy = False
            self._remote = remote
            self._bucket = bucket
            self.exchanges += 1

        def failed(f: Any) -> None:
            self._busy = False
            for k, n in pending.items():  # counted again at the next exchange; the local counts still apply
                self._pending[k] = self._pending.get(k, 0) + n
            self.log.warn("rate counts not exchanged with the other nodes: {error}", error=f.getErrorMessage())
        return self.store._in_pool(self.store._tx, work).addCallbacks(done, failed)
