"""Per-client rate counters for receive connectors (Postfix's anvil idea).

A :class:`RateCounter` counts events per key (a source address or an
authenticated user) over a sliding window of ``window`` seconds on an
injected clock. It keeps two fixed windows per key and weighs the previous
one by how much of it still overlaps the sliding window (the estimate never
lets a burst of twice the limit through at a window boundary, and needs two
numbers per key, not one timestamp per event). Keys idle for two windows are
forgotten, so memory stays bounded by the number of recently active clients;
``max_keys`` caps it outright.

A RateCounter counts in one process. The receive side counts once per
node all the same: the main process keeps the counters and its receive
workers ask it (exmta.receive.noderates, as Postfix's anvil is one server),
or once per cluster with the PostgreSQL queue (exmta.receive.sharedrates).
"""
from __future__ import annotations

from typing import Any

__all__ = ["RateCounter"]


class RateCounter:
    """Events per key in a sliding window; ``limit`` 0 means no limit (nothing is counted)."""

    def __init__(self, limit: int, clock: Any, window: float = 60.0, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.clock = clock
        self.window = window
        self.max_keys = max_keys
        # key -> [start of the current fixed window, count in it, count in the previous one]
        self._slots: dict[str, list[float]] = {}
        self._last_sweep = clock.seconds() if limit else 0.0

    def _slot(self, key: str, now: float) -> list[float]:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = [now, 0.0, 0.0]
            return slot
        elapsed = now - slot[0]
        if elapsed >= 2 * self.window:
            slot[:] = [now, 0.0, 0.0]
        elif elapsed >= self.window:
            slot[:] = [slot[0] + self.window, 0.0, slot[1]]
        return slot

    def current(self, key: str) -> float:
        """The estimated number of events for ``key`` in the last ``window`` seconds."""
        if key not in self._slots:
            return 0.0
        now = self.clock.seconds()
        start, count, previous = self._slot(key, now)
        overlap = max(0.0, 1.0 - (now - start) / self.window)
        return count + previous * overlap

    def allows(self, key: str, n: int = 1) -> bool:
        """Whether ``n`` more events for ``key`` stay within the limit (nothing is counted)."""
        if not self.limit:
            return True
        return self.current(key) + n <= self.limit

    def add(self, key: str, n: int = 1) -> None:
        """Count ``n`` events for ``key``."""
        if not self.limit:
            return
        now = self.clock.seconds()
        self._sweep(now)
        self._slot(key, now)[1] += n

    def _sweep(self, now: float) -> None:
        """Forget idle keys (at most once a window) and the oldest ones past ``max_keys``."""
        if now - self._last_sweep >= self.window:
            self._last_sweep = now
            stale = [k for k, s in self._slots.items() if now - s[0] >= 2 * self.window]
            for k in stale:
                del self._slots[k]
        while len(self._slots) >= self.max_keys:
            del self._slots[next(iter(self._slots))]

    def __len__(self) -> int:
        return len(self._slots)
