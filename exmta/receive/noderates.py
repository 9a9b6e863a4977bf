"""Receive rate limits counted once per node: the main process counts for its receive workers.

With the spool store each process used to keep its own
:class:`~exmta.receive.ratelimit.RateCounter`, so ``receive_workers = N`` let
a client spread over the workers send N times every configured limit. Here
the main process owns the node's counters (:class:`NodeRates`, one
RateCounter per connector and limit name, shared by its own policies) and a
receive worker asks it over the pipes it already has (:class:`RemoteRates`):
a request line ``?{"id": 7, "take": [[name, limit, key, n], ...]}`` on the
worker's stdout, the answer ``{"id": 7, "refused": i}`` on its stdin (``i``
is the first item over its limit, -1 when none). The main process checks
every item and counts all of them or none in one reactor turn, so the limit
is exact whatever the number of workers: no lag, no file, no lock. Only
connectors with a limit configured ask (the defaults have none); a
request costs one line each way, batched with the worker's other lines.

With the PostgreSQL queue :mod:`exmta.receive.sharedrates` counts for the
whole cluster instead.
"""
from __future__ import annotations

import errno
import itertools
import json
import os
from typing import Any, Callable, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from exmta.receive.ratelimit import RateCounter

__all__ = ["NodeRates", "RemoteCounter", "RemoteRates", "RateCheckFailed", "REQUEST_PREFIX", "take_local"]

REQUEST_PREFIX = b"?"  # a worker's line that asks the main process (not a queue id, event or state line)

log = Logger(namespace="exmta.receive.noderates")


class RateCheckFailed(Exception):
    """The main process did not answer a worker's rate check (the caller answers 4xx)."""


def take_local(pairs: Sequence[tuple[Any, str]]) -> Any | None:
    """Count one event for each (RateCounter, key) when all allow it; -> the first counter that refuses, or None."""
    for counter, key in pairs:
        if not counter.allows(key):
            return counter
    for counter, key in pairs:
        counter.add(key)
    return None


class NodeRates:
    """The node's rate counters, in the main process: its policies' and its workers' requests."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.counters: dict[str, RateCounter] = {}
        self.requests = 0  # answered for workers, for an operator's curiosity and the tests

    def counter(self, name: str, limit: int) -> RateCounter:
        """The counter ``name`` (``connector/limit``) with ``limit``; kept across reloads, counts and all."""
        counter = self.counters.get(name)
        if counter is None:
            counter = self.counters[name] = RateCounter(limit, self.clock)
        counter.limit = limit
        return counter

    def take_items(self, items: Sequence[Sequence[Any]]) -> int:
        """``[[name, limit, key, n], ...]``: count all when all fit their limits; -> first refusing index or -1."""
        fits: list[tuple[RateCounter, str, int]] = []
        for i, (name, limit, key, n) in enumerate(items):
            limit, n = int(limit), int(n)
            if limit <= 0:
                continue
            counter = self.counters.get(name)
            if counter is None:
                counter = self.counters[name] = RateCounter(limit, self.clock)
            if counter.current(str(key)) + n > limit:  # the worker's limit: its config may be a reload apart
                return i
            fits.append((counter, str(key), n))
        for counter, key, n in fits:
            if counter.limit:
                counter.add(key, n)
        return -1

    def answer(self, line: bytes) -> bytes:
        """The answer line to one request line of a worker (without REQUEST_PREFIX)."""
        self.requests += 1
        try:
            request = json.loads(line)
            refused = self.take_items(request["take"])
            return json.dumps({"id": request["id"], "refused": refused}).encode("ascii") + b"\n"
        except (ValueError, KeyError, TypeError) as e:
            log.warn("rate check from a receive worker not understood: {error}", error=str(e))
            try:
                ident = json.loads(line)["id"]
            except (ValueError, KeyError, TypeError):
                return b""
            return json.dumps({"id": ident, "error": str(e)}).encode("ascii") + b"\n"


class RemoteCounter:
    """A worker's handle on one of the main process's counters (its name and this process's limit)."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit


class RemoteRates(Service):
    """A receive worker's rate checks, answered by the main process (:class:`NodeRates`).

    ``write`` puts a line on the worker's stdout (exmta.receive.worker.LineBatcher.write);
    the service reads the answers from ``fd`` (the worker's stdin) while it runs.
    A check that gets no answer within ``timeout`` seconds fails with
    :class:`RateCheckFailed`.
    """

    def __init__(self, write: Callable[[bytes], None], reactor: Any, fd: int = 0, timeout: float = 10.0) -> None:
        self.write = write
        self.reactor = reactor
        self.fd = fd
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[Deferred[Any], Sequence[tuple[Any, str]], Any]] = {}
        self._buffer = b""

    def counter(self, name: str, limit: int) -> RemoteCounter:
        return RemoteCounter(name, limit)

    def take(self, pairs: Sequence[tuple[Any, str]]) -> Deferred[Any]:
        """:func:`take_local` done by the main process: fires with the refusing counter or None."""
        if not self.running:
            return fail(RateCheckFailed("the rate check channel is not open"))
        ident = next(self._ids)
        d: Deferred[Any] = Deferred()
        timer = self.reactor.callLater(self.timeout, self._expire, ident)
        self._pending[ident] = (d, pairs, timer)
        items = [[c.name, c.limit, key, 1] for c, key in pairs]
        self.write(REQUEST_PREFIX + json.dumps({"id": ident, "take": items}).encode("ascii") + b"\n")
        return d

    def _expire(self, ident: int) -> None:
        entry = self._pending.pop(ident, None)
        if entry is not None:
            entry[0].errback(RateCheckFailed(f"no answer from the main process within {self.timeout:g}s"))

    def lines_received(self, data: bytes) -> None:
        """Answers from the main process (any chunking)."""
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                answer = json.loads(line)
                entry = self._pending.pop(int(answer["id"]), None)
            except (ValueError, KeyError, TypeError):
                log.warn("unreadable rate answer from the main process: {line!r}", line=line[:200])
                continue
            if entry is None:
                continue  # expired already
            d, pairs, timer = entry
            if timer.active():
                timer.cancel()
            refused = answer.get("refused")
            if not isinstance(refused, int):
                d.errback(RateCheckFailed(f"the main process could not check: {answer.get('error')}"))
            else:
                d.callback(pairs[refused][0] if 0 <= refused < len(pairs) else None)

    # reading the worker's stdin (a pipe from the main process) on the reactor

    def startService(self) -> None:
        super().startService()
        os.set_blocking(self.fd, False)
        self.reactor.addReader(self)

    def stopService(self) -> None:
        super().stopService()
        self.reactor.removeReader(self)
        for ident in list(self._pending):
            self._expire(ident)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "exmta-rates"

    def doRead(self) -> Any:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno == errno.EINTR:
                return None
            raise
        if not data:
            from twisted.internet.main import CONNECTION_DONE
            return CONNECTION_DONE  # the main process is gone; the worker stops on its own (pdeathsig)
        self.lines_received(data)
        return None

    def connectionLost(self, reason: Any) -> None:
        self.reactor.removeReader(self)
