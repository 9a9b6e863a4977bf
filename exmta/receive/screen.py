"""Connection filtering before the SMTP session: DNS block/allow lists and the greet pause.

Postfix's postscreen and Exchange's connection filtering judge a client on
its address and its manners before any SMTP is spoken. exmta does it in a
protocol wrapper that sits between the connector dispatcher
(:mod:`exmta.receive.ranges`) and the SMTP session, so the session code is
untouched and a refused client costs no session:

* when the connection is made, the DNS lists of the connector
  (``dnsbl_sites``) are queried at once, all together, through the
  project's resolver (:mod:`exmta.routing.dns`) on a small thread pool of
  their own, with answers cached for their TTL (:class:`ListCache`);
* meanwhile the greeting waits ``greet_pause``; a client that sends
  anything in that time is an early talker (postscreen's pregreet test)
  and gets ``521 5.5.1`` and is disconnected;
* when the pause is over and every list answered (or the lookups' time
  bound ran out: a list that did not answer counts as not listing the
  client), a listed client gets ``554 5.7.1 Service unavailable; client
  [ip] blocked using LIST`` instead of the 220 (RFC 5321 3.1) and 503 to
  anything but QUIT; every other client gets the SMTP session, with
  whatever it sent while the lists were queried.

Behind a PROXY protocol listener the wrapper starts after the header
(exmta.receive.proxy starts the dispatcher then), so the real client is
judged and the header itself is not "early talk". A DNS failure never
refuses anybody: it is logged and counted. Clients in the connector's
``relay_networks`` or ``connection_filter_exempt``, and UNIX socket
clients, are never screened.
"""
from __future__ import annotations

import collections
import functools
from typing import Any, Callable, cast

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from exmta.model import Reply
from exmta.receive.dnslists import ListAnswer, Verdict, code_matcher, decide, query_name, sanitize_txt
from exmta.receive.ranges import ip_in, parse_ranges

__all__ = ["ConnectionScreen", "ListCache", "ScreeningFactory", "blocked_reply", "screened"]

log = Logger()

PREGREET = Reply.make(521, "5.5.1", "Protocol error: talking before the greeting")
AFTER_REFUSAL = Reply.make(503, "5.5.1", "Bad sequence of commands: this connection was refused, send QUIT")
BYE = Reply.make(221, "2.0.0", "Bye")
MAX_EARLY = 64 * 1024        # octets kept from a client while its lists are queried (no greet pause)
REFUSED_COMMANDS = 5         # after a 554 greeting: commands answered with 503 before the connection is closed
REFUSED_LINGER = 30.0        # seconds a refused client may take to send QUIT

LookupFn = Callable[[str, str], Deferred]   # (name, "A" | "TXT") -> Deferred[(records as text, ttl or None)]


def blocked_reply(ip: str, verdict: Verdict) -> Reply:
    """Postfix's reject_rbl_client wording: ``Service unavailable; client [ip] blocked using LIST[; TXT]``."""
    text = f"Service unavailable; client [{ip}] blocked using {', '.join(verdict.decided_by)}"
    if verdict.txt:
        text += f"; {verdict.txt}"
    return Reply.make(554, "5.7.1", text)


class ListCache:
    """Answers of DNS lists by (name, type), each kept for its TTL; at most ``size``, least recent dropped."""

    def __init__(self, clock: Any, size: int = 10000) -> None:
        self.clock = clock
        self.size = size
        self._items: collections.OrderedDict[tuple[str, str], tuple[float, tuple[str, ...]]] = \
            collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, str]) -> tuple[str, ...] | None:
        item = self._items.get(key)
        if item is None or item[0] <= self.clock.seconds():
            if item is not None:
                del self._items[key]
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[1]

    def put(self, key: tuple[str, str], records: tuple[str, ...], ttl: float) -> None:
        if self.size <= 0 or ttl <= 0:
            return
        self._items[key] = (self.clock.seconds() + ttl, records)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class ConnectionScreen:
    """What the screened connections of one process share: resolver, thread pool, cache, lookups in flight.

    ``lookup`` (tests) replaces the resolver: ``lookup(name, rdtype)`` fires with
    ``(records as text, ttl)`` and fails with DNSTemporaryError.
    """

    def __init__(self, clock: Any, reactor: Any = None, lookup: LookupFn | None = None) -> None:
        self.clock = clock
        self.reactor = reactor if reactor is not None else clock
        self.cache = ListCache(clock)
        self.lookup = lookup
        self._resolver: Any = None
        self._resolver_key: tuple[Any, ...] | None = None
        self._pool: Any = None
        self._inflight: dict[tuple[str, str], list[Deferred]] = {}
        self._matchers: dict[tuple[tuple[str, ...], int], Callable[[str], bool]] = {}
        self.dns_failures = 0

    # ------------------------------------------------------------ resolver

    def _lookup_fn(self, cfg: Any) -> LookupFn:
        if self.lookup is not None:
            return self.lookup
        key = (cfg.dns_servers, cfg.timeout)
        if self._resolver is None or key != self._resolver_key:
            from exmta.routing.dns import DNSResolver, parse_nameservers

            self._resolver = DNSResolver(self.reactor, self._threadpool(),
                                         nameservers=parse_nameservers(cfg.dns_servers) or None, timeout=cfg.timeout)
            self._resolver_key = key
        resolver = self._resolver

        def lookup(name: str, rdtype: str) -> Deferred:
            from twisted.internet.threads import deferToThreadPool

            def blocking() -> tuple[tuple[str, ...], float | None]:
                records, ttl = resolver.records_with_ttl_blocking(name, rdtype)
                if rdtype == "TXT":
                    return tuple(b"".join(r.strings).decode("ascii", "replace") for r in records), ttl
                return tuple(r.address for r in records), ttl

            return deferToThreadPool(self.reactor, self._threadpool(), blocking)

        return lookup

    def _threadpool(self) -> Any:
        """A pool of its own (never the spool's or the filters'): a slow DNS server holds only these threads."""
        if self._pool is None:
            from twisted.python.threadpool import ThreadPool

            self._pool = ThreadPool(minthreads=0, maxthreads=8, name="exmta-dnsbl")
            self._pool.start()
            trigger = getattr(self.reactor, "addSystemEventTrigger", None)
            if trigger is not None:
                trigger("during", "shutdown", self._pool.stop)
        return self._pool

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool = None

    # ------------------------------------------------------------ lookups

    async def _records(self, cfg: Any, name: str, rdtype: str) -> tuple[tuple[str, ...], bool]:
        """(records, from the cache); one query in flight per name and type."""
        key = (name, rdtype)
        self.cache.size = cfg.cache_size
        cached = self.cache.get(key)
        if cached is not None:
            return cached, True
        waiting = self._inflight.get(key)
        if waiting is not None:
            d: Deferred = Deferred()
            waiting.append(d)
            return await d, False
        self._inflight[key] = []
        try:
            records, ttl = await self._lookup_fn(cfg)(name, rdtype)
        except Exception as e:
            for w in self._inflight.pop(key, []):
                w.errback(e)
            raise
        records = tuple(records)
        self.cache.put(key, records, min(cfg.negative_ttl if ttl is None else ttl, cfg.max_cache_ttl))
        for w in self._inflight.pop(key, []):
            w.callback(records)
        return records, False

    def _matcher(self, item: Any) -> Callable[[str], bool]:
        key = (item.codes, item.bitmask)
        m = self._matchers.get(key)
        if m is None:
            m = self._matchers[key] = code_matcher(item.codes, item.bitmask)
        return m

    def cached_answer(self, cfg: Any, item: Any, ip: str) -> ListAnswer | None:
        """The answer of list ``item`` from the cache alone (no coroutine, no timer), or None on a miss."""
        name = query_name(ip, item.zone)
        if name is None:
            return ListAnswer(item.label, item.action, item.weight)
        self.cache.size = cfg.cache_size
        records = self.cache.get((name, "A"))
        if records is None:
            return None
        matched = tuple(r for r in records if self._matcher(item)(r))
        if not matched:
            return ListAnswer(item.label, item.action, item.weight, cached=True)
        txt = ""
        if item.txt:
            texts = self.cache.get((name, "TXT"))
            if texts is None:
                return None
            txt = sanitize_txt(" ".join(texts))
        return ListAnswer(item.label, item.action, item.weight, True, matched, txt, cached=True)

    async def answer(self, cfg: Any, item: Any, ip: str) -> ListAnswer:
        """What list ``item`` says about ``ip``; a failed lookup is an answer with ``error``, never a listing."""
        base = ListAnswer(item.label, item.action, item.weight)
        name = query_name(ip, item.zone)
        if name is None:
            return base
        try:
            records, cached = await self._records(cfg, name, "A")
            matched = tuple(r for r in records if self._matcher(item)(r))
            if not matched:
                return ListAnswer(item.label, item.action, item.weight, cached=cached)
            txt = ""
            if item.txt:
                try:
                    texts, _ = await self._records(cfg, name, "TXT")
                    txt = sanitize_txt(" ".join(texts))
                except Exception:
                    pass  # the listing stands without its text
            return ListAnswer(item.label, item.action, item.weight, True, matched, txt, cached=cached)
        except Exception as e:
            self.dns_failures += 1
            kind = "timeout" if "timeout" in str(e).lower() else "error"
            log.warn("connection filter: {list} lookup for {peer_ip} failed ({kind}): {error}; not counted as listed",
                     list=item.label, peer_ip=ip, kind=kind, error=str(e)[:200])
            return ListAnswer(item.label, item.action, item.weight, error=kind)


class _Screening(ProtocolWrapper):
    """One screened connection: holds the SMTP session back until the pause and the lists are done."""

    transport: Any
    factory: Any  # ScreeningFactory

    def __init__(self, factory: ScreeningFactory, addr: Any, rc: Any) -> None:
        super().__init__(cast(Any, factory), Protocol())
        self.addr = addr
        self.rc = rc
        self.peer_ip = ""
        self.state = "waiting"           # waiting | started | refused | closed
        self.buffer = b""
        self.pending = 0
        self.answers: list[ListAnswer] = []
        self.pause_over = rc.greet_pause <= 0
        self.timers: list[Any] = []
        self.refused_lines = 0
        self.started_at = 0.0

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))  # STARTTLS and friends, as ProtocolWrapper does
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        clock = self.factory.clock
        self.started_at = clock.seconds()
        self.peer_ip = getattr(self.transport.getPeer(), "host", "") or ""  # behind PROXY: the real client
        if not self.peer_ip or self.factory.exempt(self.rc, self.peer_ip):
            self.pause_over = True
            self._start_session()
            return
        cfg = self.rc.connection_filter
        if not self.pause_over:
            self.timers.append(clock.callLater(self.rc.greet_pause, self._pause_over))
        if cfg is not None and cfg.lists:
            screen = self.factory.screen
            missing = []
            for item in cfg.lists:
                known = screen.cached_answer(cfg, item, self.peer_ip)  # most clients: all from the cache
                if known is None:
                    missing.append(item)
                else:
                    self.answers.append(known)
            self.pending = len(missing)
            if missing:
                self.timers.append(clock.callLater(cfg.timeout + 1.0, self._lookups_overdue))
            for item in missing:
                d = ensureDeferred(screen.answer(cfg, item, self.peer_ip))
                d.addCallback(self._answered)
                d.addErrback(lambda f: log.failure("connection filter: a lookup failed unexpectedly", f))
        self._maybe_start()

    # ------------------------------------------------------------ waiting

    def _pause_over(self) -> None:
        self.pause_over = True
        self._maybe_start()

    def _answered(self, answer: ListAnswer) -> None:
        if self.state != "waiting" or self.pending <= 0:
            return
        self.answers.append(answer)
        self.pending -= 1
        self._maybe_start()

    def _lookups_overdue(self) -> None:
        if self.state != "waiting" or self.pending <= 0:
            return
        answered = {a.name for a in self.answers}
        for item in self.rc.connection_filter.lists:
            if item.label not in answered:
                self.answers.append(ListAnswer(item.label, item.action, item.weight, error="timeout"))
        log.warn("connection filter: lists for {peer_ip} did not answer in time; not counted as listed",
                 peer_ip=self.peer_ip)
        self.pending = 0
        self._maybe_start()

    def _maybe_start(self) -> None:
        if self.state != "waiting" or not self.pause_over or self.pending > 0:
            return
        self._cancel_timers()
        cfg = self.rc.connection_filter
        verdict = decide(self.answers, cfg.threshold if cfg is not None else 1)
        for a in self.answers:
            if a.error:
                self.factory.count(self.rc.name, f"dns_{a.error}")
        if verdict.reject:
            self._refuse(verdict)
            return
        self.factory.count(self.rc.name, "allowed" if verdict.decided_by else "passed")
        if verdict.decided_by or verdict.score:
            log.info("connection filter: {peer_ip} on {connector}: {reason}", peer_ip=self.peer_ip,
                     connector=self.rc.name, reason=verdict.reason)
        self._start_session()

    def _start_session(self) -> None:
        self.state = "started"
        self.wrappedProtocol = self.factory.inner.buildProtocol(self.addr)
        self.wrappedProtocol.makeConnection(cast(Any, self))
        if self.buffer and self.state == "started":
            data, self.buffer = self.buffer, b""
            self.wrappedProtocol.dataReceived(data)

    # ------------------------------------------------------------ refusals

    def _refuse(self, verdict: Verdict) -> None:
        reply = blocked_reply(self.peer_ip, verdict)
        self.state = "refused"
        self.buffer = b""
        self.factory.count(self.rc.name, "listed")
        lists = ", ".join(verdict.decided_by)
        log.info("connection filter: {peer_ip} refused on {connector}: {reason}", peer_ip=self.peer_ip,
                 connector=self.rc.name, reason=verdict.reason, lists=lists, reply=str(reply))
        self.factory.record(self, reply, "dnsbl", f"connection filter: {verdict.reason}", {"lists": lists})
        self.transport.write(reply.to_bytes())
        self.timers.append(self.factory.clock.callLater(REFUSED_LINGER, self._close))

    def _early_talker(self) -> None:
        self.state = "closed"
        self._cancel_timers()
        self.factory.count(self.rc.name, "pregreet")
        waited = self.factory.clock.seconds() - self.started_at
        log.info("connection filter: {peer_ip} on {connector} talked before the greeting (after {waited:.3f}s)",
                 peer_ip=self.peer_ip, connector=self.rc.name, waited=waited)
        self.factory.record(self, PREGREET, "pregreet", "connection filter: talked before the greeting", {})
        self.transport.write(PREGREET.to_bytes())
        self.transport.loseConnection()

    def _close(self) -> None:
        self.state = "closed"
        self._cancel_timers()
        self.transport.loseConnection()

    def _refused_data(self, data: bytes) -> None:
        self.buffer = (self.buffer + data)[-2048:]
        while b"\n" in self.buffer and self.state == "refused":
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip().upper() == b"QUIT":
                self.transport.write(BYE.to_bytes())
                self._close()
                return
            self.refused_lines += 1
            self.transport.write(AFTER_REFUSAL.to_bytes())
            if self.refused_lines >= REFUSED_COMMANDS:
                self._close()

    # ------------------------------------------------------------ the wire

    def dataReceived(self, data: bytes) -> None:
        if self.state == "started":
            self.wrappedProtocol.dataReceived(data)
        elif self.state == "refused":
            self._refused_data(data)
        elif self.state == "waiting":
            if not self.pause_over:
                self._early_talker()
                return
            self.buffer += data  # pipelined early: the session reads it once it starts
            if len(self.buffer) > MAX_EARLY:
                self._close()

    def _cancel_timers(self) -> None:
        for t in self.timers:
            if t.active():
                t.cancel()
        self.timers = []

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timers()
        started = self.state == "started"
        self.state = "closed"
        if started:
            self.wrappedProtocol.connectionLost(reason)


class ScreeningFactory:
    """Wraps one connector's listening factory; screens connections when its config asks for it.

    ``config_source`` is the connector's ESMTPServerFactory: its ``config``
    (replaced by a reload), tracker, clock, protocol log and session observer.
    Connectors without DNS lists and greet pause get the session directly.
    """

    def __init__(self, inner: Any, config_source: Any, screen: ConnectionScreen) -> None:
        self.inner = inner
        self.config_source = config_source
        self.screen = screen
        self.clock = screen.clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # doStart, protocol, ... of the listening factory

    def buildProtocol(self, addr: Any) -> Any:
        rc = getattr(self.config_source, "config", None)
        if rc is None or (rc.greet_pause <= 0 and rc.connection_filter is None):
            return self.inner.buildProtocol(addr)
        if getattr(addr, "host", None) is None:
            return self.inner.buildProtocol(addr)  # a UNIX socket client: local, never screened
        return _Screening(self, addr, rc)  # behind PROXY, addr is the proxy's: exemptions are checked later

    @staticmethod
    def exempt(rc: Any, ip: str) -> bool:
        if rc.externally_secured:
            return True
        return ip_in(ip, _networks(rc.relay_networks + rc.connection_filter_exempt))

    def count(self, connector: str, outcome: str) -> None:
        observer = getattr(self.config_source, "session_observer", None)
        screened = getattr(observer, "connection_screened", None)
        if screened is not None:
            try:
                screened(connector, outcome)
            except Exception:
                log.failure("metrics: counting a screened connection failed")

    def record(self, conn: _Screening, reply: Reply, check: str, reason: str, details: dict[str, str]) -> None:
        """A REJECT tracking event and protocol log lines naming the check (and list) that decided."""
        source = self.config_source
        tracker = getattr(source, "tracker", None)
        if tracker is not None:
            from exmta.model import TrackingEvent, TrackingEventId

            try:
                tracker.track(TrackingEvent(
                    TrackingEventId.REJECT, "", self.clock.seconds(), connector=conn.rc.name, source="SMTP",
                    remote_host=conn.peer_ip, reply=str(reply),
                    details={"reason": reason, "check": check, **details}))
            except Exception:
                log.failure("tracker failed for a screened connection")
        plog = getattr(source, "protocol_log", None)
        if plog is not None:
            try:
                ps = plog.for_transport(conn.transport)
                ps.record("connect")
                ps.reply(reply)
                ps.end(reason)
            except Exception:
                log.failure("protocol log failed for a screened connection")


@functools.lru_cache(maxsize=64)
def _networks(ranges: tuple[str, ...]) -> tuple[Any, ...]:
    return parse_ranges(ranges)


def screened(inner: Any, config_source: Any, screen: ConnectionScreen | None) -> Any:
    """``inner`` behind a :class:`ScreeningFactory` (``screen`` None: as it is)."""
    if screen is None or config_source is None or not hasattr(config_source, "config"):
        return inner
    return ScreeningFactory(inner, config_source, screen)
