"""Filters' own thread pool, and a bound on filter checks in flight (issue 11 item 2).

Filters block (pyspf and dkimpy resolve DNS synchronously). On the pool the
spool and the deliveries use, a DNS server that never answers held every
thread and stalled the end of data of every connector. Filters therefore get
a pool of their own, and a process-wide :class:`CheckAdmission` bounds the
filter runs in flight, in total and per client (an IPv4 address or an IPv6
/64): past either bound the command gets ``451 4.3.2`` at once instead of
queueing behind the others.
"""
from __future__ import annotations

from typing import Any

from twisted.python.threadpool import ThreadPool

from exmta.auth.lockout import source_key
from exmta.model import Action, Reply, Verdict

__all__ = ["BUSY", "CheckAdmission", "make_filter_pool"]

#: what a filter run that cannot be admitted answers
BUSY = Verdict(Action.TEMPFAIL, Reply.make(451, "4.3.2", "Error: too many checks in progress, try again later"))


def make_filter_pool(threads: int) -> ThreadPool:
    """The filters' bounded pool (never the spool's)."""
    return ThreadPool(minthreads=0, maxthreads=max(1, threads), name="exmta-filters")


class CheckAdmission:
    """Counts filter runs in flight; ``enter`` refuses past ``max_total`` or ``max_per_client`` (0 = no bound)."""

    def __init__(self, max_total: int = 0, max_per_client: int = 0) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self.refused = 0
        self._clients: dict[str, int] = {}

    def enter(self, peer_ip: str) -> str | None:
        """Admit one run for ``peer_ip``: the key to give :meth:`leave`, or None when saturated."""
        key = source_key(peer_ip)
        held = self._clients.get(key, 0)
        if (self.max_total and self.total >= self.max_total) or (self.max_per_client and held >= self.max_per_client):
            self.refused += 1
            return None
        self.total += 1
        self._clients[key] = held + 1
        return key

    def leave(self, key: str) -> None:
        self.total -= 1
        held = self._clients.get(key, 0) - 1
        if held > 0:
            self._clients[key] = held
        else:
            self._clients.pop(key, None)

    def status(self) -> dict[str, Any]:
        return {"in_flight": self.total, "clients": len(self._clients), "refused": self.refused}
