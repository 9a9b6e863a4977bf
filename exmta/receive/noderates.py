"""Receive limits counted once per node: the main process counts for its receive workers.

With the spool store each process used to keep its own
:class:`~exmta.receive.ratelimit.RateCounter` and its own connection counts,
so ``receive_workers = N`` let a client spread over the workers send N times
every configured rate limit and hold N times ``max_connections_per_ip``
sessions. Here the main process owns the node's counters (:class:`NodeRates`:
one RateCounter per connector and limit name, one ConnectionCounter per
connector, shared by its own policies and listeners) and a receive worker
asks it over the pipes it already has (:class:`RemoteRates`): a request line
``?{"id": 7, "take": [[name, limit, key, n], ...]}`` on the worker's stdout,
the answer ``{"id": 7, "refused": i}`` on its stdin (``i`` is the first item
over its limit, -1 when none). The main process checks every item and counts
all of them or none in one reactor turn, so a limit is exact whatever the
number of workers: no lag, no file, no lock. A new session asks
``{"id": 8, "open": [connector, ip, max_total, max_per_ip]}`` (answer: null,
or why not) before its banner, and says ``{"close": [connector, ip]}`` when
it ends; the sessions of a worker that dies are released with it.
Rate checks are asked only by connectors with a rate limit (the defaults
have none); each costs one line each way, batched with the worker's other
lines (benchmarks/PERFORMANCE.rst).

With the PostgreSQL queue :mod:`exmta.receive.sharedrates` counts the rate
limits for the whole cluster instead; connections are still counted here.
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

from exmta.receive.ranges import ConnectionCounter
from exmta.receive.ratelimit import RateCounter

__all__ = ["NodeRates", "RemoteCounter", "RemoteRates", "RateCheckFailed", "REQUEST_PREFIX", "take_local"]

MAX_LATE = 10_000  # expired session requests remembered, to release what a late answer admitted
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
        self.connections: dict[str, ConnectionCounter] = {}  # receive connector -> its open sessions
        self.held: dict[int, dict[tuple[str, str], int]] = {}  # worker -> (connector, ip) -> sessions it holds
        self.requests = 0  # answered for workers, for an operator's curiosity and the tests

    def connection_counter(self, name: str) -> ConnectionCounter:
        """The open sessions of receive connector ``name`` on the whole node (the main process's own too)."""
        counter = self.connections.get(name)
        if counter is None:
            counter = self.connections[name] = ConnectionCounter()
        return counter

    def admit(self, worker: int, name: str, ip: str, max_total: int, max_per_ip: int) -> str | None:
        """Count one session a worker accepted, or say why it is one too many (the worker's limits)."""
        counter = self.connection_counter(name)
        probe = ConnectionCounter(int(max_total), int(max_per_ip))
        probe.total, probe.per_ip = counter.total, counter.per_ip
        why = probe.refusal(ip)
        if why is None:
            counter.opened(ip)
            held = self.held.setdefault(worker, {})
            held[(name, ip)] = held.get((name, ip), 0) + 1
        return why

    def release(self, worker: int, name: str, ip: str) -> None:
        held = self.held.get(worker, {})
        n = held.get((name, ip), 0)
        if n <= 0:
            return  # not admitted here, or already released when its worker ended
        if n == 1:
            del held[(name, ip)]
        else:
            held[(name, ip)] = n - 1
        self.connection_counter(name).closed(ip)

    def worker_ended(self, worker: int) -> None:
        """A worker process ended: the sessions it held are gone with it."""
        for (name, ip), n in self.held.pop(worker, {}).items():
            for _ in range(n):
                self.connection_counter(name).closed(ip)

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

    def answer(self, line: bytes, worker: int = 0) -> bytes:
        """The answer line to one request line of worker ``worker`` (without REQUEST_PREFIX); b"" for none."""
        self.requests += 1
        try:
            request = json.loads(line)
            refused: Any
            if "close" in request:  # a session ended: nothing to answer
                name, ip = request["close"]
                self.release(worker, str(name), str(ip))
                return b""
            if "open" in request:
                name, ip, max_total, max_per_ip = request["open"]
                refused = self.admit(worker, str(name), str(ip), max_total, max_per_ip)
            else:
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
        # id -> (its Deferred, what the answer's "refused" becomes, the timeout call)
        self._pending: dict[int, tuple[Deferred[Any], Callable[[Any], Any], Any]] = {}
        self._buffer = b""
        self._late_handlers: dict[int, Callable[[dict[str, Any]], None]] = {}  # id -> what a late answer undoes
        self._late: dict[int, Callable[[dict[str, Any]], None]] = {}  # expired ids whose answer may still come

    def counter(self, name: str, limit: int) -> RemoteCounter:
        return RemoteCounter(name, limit)

    def take(self, pairs: Sequence[tuple[Any, str]]) -> Deferred[Any]:
        """:func:`take_local` done by the main process: fires with the refusing counter or None."""
        def counter(refused: Any) -> Any:
            if not isinstance(refused, int):
                raise ValueError(refused)
            return pairs[refused][0] if 0 <= refused < len(pairs) else None
        return self._ask({"take": [[c.name, c.limit, key, 1] for c, key in pairs]}, counter)

    def open_connection(self, name: str, ip: str, max_total: int, max_per_ip: int) -> Deferred[Any]:
        """Ask for one more session of connector ``name`` from ``ip``: fires with None or why not."""
        def late(answer: dict[str, Any]) -> None:  # admitted after this worker gave up: release it at once
            if "refused" in answer and answer["refused"] is None:
                self.close_connection(name, ip)
        return self._ask({"open": [name, ip, max_total, max_per_ip]}, lambda why: None if why is None else str(why),
                         late)

    def close_connection(self, name: str, ip: str) -> None:
        """An admitted session ended (no answer)."""
        self.write(REQUEST_PREFIX + json.dumps({"close": [name, ip]}).encode("ascii") + b"\n")

    def _ask(self, request: dict[str, Any], convert: Callable[[Any], Any],
             late: Callable[[dict[str, Any]], None] | None = None) -> Deferred[Any]:
        if not self.running:
            return fail(RateCheckFailed("the channel to the main process is not open"))
        ident = next(self._ids)
        d: Deferred[Any] = Deferred()
        timer = self.reactor.callLater(self.timeout, self._expire, ident)
        self._pending[ident] = (d, convert, timer)
        if late is not None:
            self._late_handlers[ident] = late
        self.write(REQUEST_PREFIX + json.dumps({"id": ident, **request}).encode("ascii") + b"\n")
        return d

    def _expire(self, ident: int) -> None:
        entry = self._pending.pop(ident, None)
        late = self._late_handlers.pop(ident, None)
        if late is not None:  # its answer may still come: kept (bounded) to undo what it did
            self._late[ident] = late
            while len(self._late) > MAX_LATE:
                del self._late[next(iter(self._late))]
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
                ident = int(answer["id"])
            except (ValueError, KeyError, TypeError):
                log.warn("unreadable rate answer from the main process: {line!r}", line=line[:200])
                continue
            entry = self._pending.pop(ident, None)
            self._late_handlers.pop(ident, None)
            if entry is None:  # expired already
                late = self._late.pop(ident, None)
                if late is not None:
                    late(answer)
                continue
            d, convert, timer = entry
            if timer.active():
                timer.cancel()
            try:
                if "refused" not in answer:
                    raise ValueError(answer.get("error"))
                result = convert(answer["refused"])
            except (ValueError, TypeError) as e:
                d.errback(RateCheckFailed(f"the main process could not check: {e}"))
            else:
                d.callback(result)

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
