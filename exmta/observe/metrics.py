"""Prometheus metrics: counters fed by tracking and session events, gauges read from the queue.

:class:`Metrics` is an :class:`~exmta.interfaces.IMessageTracker` (it sits
beside the tracking log behind a :class:`~exmta.observe.tracking.MultiTracker`)
and a session observer for the SMTP server factories (connections, TLS,
timeouts, AUTH failures) and the filter chains (verdicts). Queue gauges come
from a :class:`QueueSampler` that lists the store on the injected clock (the
store lists on its thread pool; a scrape never waits for the disk).

Every metric lives in the instance's own ``CollectorRegistry``, never the
process-global one, so that tests (and two servers in one process) do not
share counts. Label values are bounded: reasons are reply codes such as
``451 4.4.1``, never free text.

prometheus-client is an optional dependency (the ``metrics`` extra);
:data:`AVAILABLE` says whether it is installed, and without it the
``/metrics`` resource answers 503 with what to install.

With ``receive_workers > 0`` the workers' events reach these counters
through :mod:`exmta.observe.worker_metrics` (JSON lines on the workers' stdout).
"""
from __future__ import annotations

import collections
import re
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource
from zope.interface import implementer

from exmta.interfaces import IMessageTracker, ISessionObserver
from exmta.model import TrackingEvent, TrackingEventId
from exmta.observe.quarantine_view import QuarantineSummary, summarize
from exmta.queue.errors import StoreUnavailable

try:  # optional: the "metrics" extra
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.core import GaugeMetricFamily

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised by the endpoint's message only
    prometheus_client = None  # type: ignore[assignment]
    AVAILABLE = False

__all__ = ["AVAILABLE", "Metrics", "MetricsResource", "PublicRegistry", "QueueSampler", "QueueSnapshot", "Throughput",
           "reply_reason"]

log = Logger()

#: seconds from receipt to final delivery; mail spans seconds to days
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, float("inf"))

_REPLY = re.compile(r"^\s*(\d{3})(?:[ -]+(\d\.\d{1,3}\.\d{1,3}))?")


def reply_reason(reply: str | None, fallback: str = "none") -> str:
    """A bounded label value for a reply: ``"451 4.4.1"``, ``"550"`` or ``fallback``."""
    if not reply:
        return fallback
    m = _REPLY.match(reply)
    if not m:
        return "other"
    return f"{m.group(1)} {m.group(2)}" if m.group(2) else m.group(1)


def queue_id_time(queue_id: str) -> float | None:
    """The receipt time encoded in an exmta queue id (13 hex digits of microseconds), or None."""
    try:
        return int(queue_id[:13], 16) / 1_000_000 if len(queue_id) >= 13 else None
    except ValueError:
        return None


class QueueSnapshot:
    """Messages waiting, by queue ("incoming", "active", "deferred", "hold") and by next hop."""

    def __init__(self, taken_at: float) -> None:
        self.taken_at = taken_at
        self.by_queue: dict[str, int] = {}
        self.by_nexthop: dict[str, int] = {}
        self.oldest_by_nexthop: dict[str, float] = {}   # receipt time of the oldest message
        self.last_error: dict[str, str] = {}
        self.oldest: float | None = None
        self.quarantine = QuarantineSummary()  # the hold queue less operator holds (the status page)

    @property
    def total(self) -> int:
        return sum(self.by_queue.values())

    def oldest_age(self, now: float) -> float:
        return max(0.0, now - self.oldest) if self.oldest is not None else 0.0


class QueueSampler:
    """Lists the store every ``interval`` seconds into a :class:`QueueSnapshot`.

    ``router`` (an IRouter, or a callable returning one so that a reload's
    new router is used) names the next hop of each pending recipient:
    ``connector/nexthop``. ``listeners`` are called with each new snapshot
    (the alert manager, the status page's history).
    """

    QUEUES = ("incoming", "active", "deferred", "hold")

    def __init__(self, store: Any, router: Any, clock: Any, interval: float = 15.0) -> None:
        self.store = store
        self._router = router
        self.clock = clock
        self.interval = interval
        self.snapshot: QueueSnapshot | None = None
        self.listeners: list[Callable[[QueueSnapshot], None]] = []
        self._call: Any = None
        self._running: defer.Deferred | None = None

    @property
    def router(self) -> Any:
        r = self._router
        return r() if callable(r) and not hasattr(r, "route") else r

    def start(self) -> None:
        if self._call is None:
            self._tick()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _tick(self) -> None:
        self._call = self.clock.callLater(self.interval, self._tick)
        if self._running is None:
            self.sample()

    def sample(self) -> defer.Deferred:
        """-> Deferred[QueueSnapshot]: list the store now."""
        d = defer.Deferred.fromCoroutine(self._sample())

        def done(result: Any) -> Any:
            self._running = None
            return result

        self._running = d
        d.addBoth(done)
        d.addErrback(self._eb_sample)
        return d

    @staticmethod
    def _eb_sample(f: Any) -> None:
        if f.check(StoreUnavailable):  # the queue's database is away: the next sample tries again
            log.warn("listing the queue for metrics failed: {error}", error=f.getErrorMessage())
        else:
            log.failure("listing the queue for metrics failed", f)

    async def _sample(self) -> QueueSnapshot:
        snap = QueueSnapshot(self.clock.seconds())
        router = self.router
        for queue in self.QUEUES:
            try:
                envelopes = await defer.maybeDeferred(self.store.list_messages, queue)
            except (KeyError, ValueError):
                continue
            snap.by_queue[queue] = len(envelopes)
            if queue == "hold":
                snap.quarantine = summarize(envelopes, snap.taken_at, received_of=lambda env: (
                    env.received_at or queue_id_time(env.queue_id)))
            for env in envelopes:
                received = env.received_at or queue_id_time(env.queue_id) or snap.taken_at
                if snap.oldest is None or received < snap.oldest:
                    snap.oldest = received
                for hop, error in self._hops(router, env, queue):
                    snap.by_nexthop[hop] = snap.by_nexthop.get(hop, 0) + 1
                    old = snap.oldest_by_nexthop.get(hop)
                    if old is None or received < old:
                        snap.oldest_by_nexthop[hop] = received
                    if error:
                        snap.last_error[hop] = error
        self.snapshot = snap
        for listener in list(self.listeners):
            try:
                listener(snap)
            except Exception:
                log.failure("queue snapshot listener {listener!r} failed", listener=listener)
        return snap

    @staticmethod
    def _hops(router: Any, env: Any, queue: str) -> Iterable[tuple[str, str | None]]:
        if queue == "hold":
            return [("hold", env.held_reason)]
        pending = [r for r in env.recipients if not r.is_final]
        if not pending:
            return []
        errors = {r.address: str(r.last_reply) for r in pending if getattr(r, "last_reply", None)}
        try:
            routes = router.route(env, [r.address for r in pending]) if router is not None else []
        except Exception:
            routes = []
        if not routes:
            return [("unroutable", None)]
        out = []
        for route in routes:
            hop = f"{route.connector}/{route.nexthop or '*'}"
            error = next((errors[a] for a in route.recipients if a in errors), None)
            out.append((hop, error))
        return out


def delivery_latency(event: TrackingEvent) -> float | None:
    """Seconds from receipt to this event: the event's own ``latency`` or the time in its queue id."""
    latency = event.details.get("latency") if event.details else None
    if latency is None:
        received = queue_id_time(event.queue_id)
        latency = event.timestamp - received if received is not None else None
    try:
        return float(latency) if latency is not None and float(latency) >= 0 else None
    except (TypeError, ValueError):
        return None


_THROUGHPUT_KIND = {
    TrackingEventId.RECEIVE: "received", TrackingEventId.SUBMIT: "received",
    TrackingEventId.DELIVER: "delivered", TrackingEventId.SEND: "delivered",
    TrackingEventId.DEFER: "deferred", TrackingEventId.FAIL: "bounced", TrackingEventId.EXPIRE: "bounced",
    TrackingEventId.REJECT: "rejected",
}


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: prometheus-client validates and locks on each call,
    and these are counted several times per message."""
    cache = metric.__dict__.setdefault("_exmta_children", {})
    child = cache.get(labels)
    if child is None:
        child = cache[labels] = metric.labels(*labels)
    return child


@implementer(IMessageTracker)
class Throughput:
    """Per-minute counts of the last ``keep`` seconds: received, delivered, deferred, bounced, latency.

    Needs no prometheus-client: the alert rates and the status page's graphs read it.
    """

    KINDS = ("received", "delivered", "deferred", "bounced", "rejected")

    def __init__(self, clock: Any, keep: float = 3600.0, step: float = 60.0) -> None:
        self.clock = clock
        self.keep = keep
        self.step = step
        #: minute start -> {"received": n, ..., "latency": [sum, count, max]}
        self.buckets: collections.OrderedDict[float, dict[str, Any]] = collections.OrderedDict()
        self.events: collections.deque[tuple[float, str]] = collections.deque(maxlen=200_000)

    def track(self, event: TrackingEvent) -> None:
        try:
            self._count(event)
        except Exception:
            log.failure("throughput: counting {event_id} failed", event_id=getattr(event, "event_id", None))

    def _count(self, event: TrackingEvent) -> None:
        eid = event.event_id
        kind = _THROUGHPUT_KIND.get(eid)
        if kind is None:
            return
        now = self.clock.seconds()
        n = 1 if kind in ("received", "rejected") else max(1, len(event.recipients))
        bucket = self._bucket(now)
        bucket[kind] += n
        if kind == "delivered":
            latency = delivery_latency(event)
            if latency is not None:
                lat = bucket["latency"]
                lat[0] += latency * n
                lat[1] += n
                lat[2] = max(lat[2], latency)
        for _ in range(n):
            self.events.append((now, kind))

    def _bucket(self, now: float) -> dict[str, Any]:
        start = now - now % self.step
        bucket = self.buckets.get(start)
        if bucket is None:
            bucket = {k: 0 for k in self.KINDS}
            bucket["latency"] = [0.0, 0, 0.0]
            self.buckets[start] = bucket
            while self.buckets and next(iter(self.buckets)) < now - self.keep - self.step:
                self.buckets.popitem(last=False)
        return bucket

    def outcomes_since(self, since: float) -> dict[str, int]:
        """Delivered / deferred / bounced recipient events since ``since`` (clock seconds)."""
        out = {"delivered": 0, "deferred": 0, "bounced": 0}
        for ts, kind in reversed(self.events):
            if ts < since:
                break
            if kind in out:
                out[kind] += 1
        return out

    def series(self, now: float | None = None) -> list[tuple[float, dict[str, Any]]]:
        """One (minute start, counts) per minute of the last ``keep`` seconds, oldest first, gaps as zero."""
        now = self.clock.seconds() if now is None else now
        last = now - now % self.step
        first = last - self.keep + self.step
        out = []
        t = first
        while t <= last:
            b = self.buckets.get(t)
            if b is None:
                b = {k: 0 for k in self.KINDS}
                b["latency"] = [0.0, 0, 0.0]
            out.append((t, b))
            t += self.step
        return out


@implementer(IMessageTracker, ISessionObserver)
class Metrics:
    """Every exmta metric, in its own registry; feed it events, scrape ``registry``."""

    def __init__(self, clock: Any, sampler: QueueSampler | None = None,
                 factories: Callable[[], dict[str, Any]] | None = None,
                 scheduler: Any = None) -> None:
        if not AVAILABLE:
            raise RuntimeError("prometheus-client is not installed: pip install 'exmta[metrics]'")
        self.clock = clock
        self.sampler = sampler
        self.factories = factories or (lambda: {})
        self.scheduler = scheduler
        self.back_pressure: Any = None  # exmta.receive.backpressure.BackPressure, for its status()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Counter("exmta_smtp_connections", "SMTP connections accepted", ["connector"], registry=r)
        self.timeouts = Counter("exmta_smtp_timeouts", "SMTP sessions closed for a command or data timeout",
                                ["connector"], registry=r)
        self.tls = Counter("exmta_tls_sessions", "TLS use: sessions and deliveries by direction and version",
                           ["direction", "connector", "version"], registry=r)
        self.auth_failures = Counter("exmta_auth_failures", "Failed SMTP AUTH attempts", ["connector"], registry=r)
        self.received = Counter("exmta_messages_received", "Messages queued (RECEIVE, SUBMIT)",
                                ["connector", "source"], registry=r)
        self.delivered = Counter("exmta_messages_delivered", "Recipients delivered (DELIVER, SEND)",
                                 ["connector"], registry=r)
        self.deferred = Counter("exmta_messages_deferred", "Recipients deferred (DEFER)",
                                ["connector", "reason"], registry=r)
        self.bounced = Counter("exmta_messages_bounced", "Recipients failed or expired (FAIL, EXPIRE)",
                               ["connector", "reason"], registry=r)
        self.rejected = Counter("exmta_messages_rejected", "Messages refused at the SMTP layer or dropped",
                                ["connector", "reason"], registry=r)
        self.dsns = Counter("exmta_dsn_generated", "Delivery status notifications queued", ["action"], registry=r)
        self.poison = Counter("exmta_messages_poison", "Messages moved to hold as poison", registry=r)
        self.filter_verdicts = Counter("exmta_filter_verdicts", "Filter verdicts other than CONTINUE",
                                       ["filter", "phase", "action"], registry=r)
        self.rule_hits = Counter("exmta_transport_rule_hits", "Transport rule matches (AGENTINFO of exmta.rules)",
                                 ["rule", "mode"], registry=r)
        self.latency = Histogram("exmta_delivery_latency_seconds", "Receipt to final delivery, per recipient",
                                 ["connector"], buckets=LATENCY_BUCKETS, registry=r)
        self.screened = Counter("exmta_connection_filter", "Connections screened before the greeting "
                                "(passed, allowed, listed, pregreet, dns_timeout, dns_error)",
                                ["connector", "outcome"], registry=r)
        r.register(_LiveCollector(self))

    # ------------------------------------------------------------ IMessageTracker

    def track(self, event: TrackingEvent) -> None:
        try:
            self._count(event)
        except Exception:  # a tracker must never raise into the data path
            log.failure("metrics: counting {event_id} failed", event_id=getattr(event, "event_id", None))

    def _count(self, event: TrackingEvent) -> None:
        eid = event.event_id
        connector = event.connector or "none"
        n = max(1, len(event.recipients))
        if eid in (TrackingEventId.RECEIVE, TrackingEventId.SUBMIT):
            _child(self.received, connector, event.source or eid.value).inc()  # inbound TLS: per session
        elif eid in (TrackingEventId.DELIVER, TrackingEventId.SEND):
            _child(self.delivered, connector).inc(n)
            latency = delivery_latency(event)
            if latency is not None:
                for _ in range(n):
                    _child(self.latency, connector).observe(latency)
            if eid is TrackingEventId.SEND:
                _child(self.tls, "outbound", connector, _tls_version(event.tls)).inc()
        elif eid is TrackingEventId.DEFER:
            _child(self.deferred, connector, reply_reason(event.reply)).inc(n)
        elif eid in (TrackingEventId.FAIL, TrackingEventId.EXPIRE):
            _child(self.bounced, connector, reply_reason(event.reply, eid.value.lower())).inc(n)
        elif eid in (TrackingEventId.REJECT, TrackingEventId.DROP):
            reason = reply_reason(event.reply, "dropped" if eid is TrackingEventId.DROP else "none")
            _child(self.rejected, connector, reason).inc()
        elif eid is TrackingEventId.DSN:
            _child(self.dsns, str((event.details or {}).get("action", "unknown"))).inc()
        elif eid is TrackingEventId.POISONMESSAGE:
            self.poison.inc()
        elif eid is TrackingEventId.AGENTINFO and (event.details or {}).get("agent") == "TransportRule":
            _child(self.rule_hits, str(event.details["rule"]), str(event.details.get("mode", "enforce"))).inc()

    # ------------------------------------------------------------ session observer

    def session_opened(self, connector: str) -> None:
        _child(self.connections, connector).inc()

    def session_timed_out(self, connector: str) -> None:
        _child(self.timeouts, connector).inc()

    def tls_started(self, connector: str, version: str | None) -> None:
        _child(self.tls, "inbound", connector, _tls_version(version)).inc()

    def auth_failed(self, connector: str) -> None:
        _child(self.auth_failures, connector).inc()

    def filter_verdict(self, filter_name: str, phase: str, action: str) -> None:
        _child(self.filter_verdicts, filter_name, phase, action).inc()

    def connection_screened(self, connector: str, outcome: str) -> None:
        _child(self.screened, connector, outcome).inc()  # exmta.receive.screen

    # ------------------------------------------------------------ reading

    def counter_total(self, metric: Any) -> float:
        """Sum of a counter over all its labels (for alert rules)."""
        total = 0.0
        for family in metric.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    total += sample.value
        return total

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


def _tls_version(version: str | None) -> str:
    if not version:
        return "none"
    return version.split()[0][:16]


class _LiveCollector:
    """Gauges computed at scrape time: sessions open, queue by next hop, oldest message age."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable[Any]:
        m = self.metrics
        now = m.clock.seconds()
        sessions = GaugeMetricFamily("exmta_smtp_sessions", "SMTP sessions open now", labels=["connector"])
        for name, factory in sorted(m.factories().items()):
            sessions.add_metric([name], len(getattr(factory, "sessions", ())))
        yield sessions
        snap = m.sampler.snapshot if m.sampler is not None else None
        by_queue = GaugeMetricFamily("exmta_queue_messages", "Messages in each queue at the last sample",
                                     labels=["queue"])
        by_hop = GaugeMetricFamily("exmta_queue_nexthop_messages",
                                   "Messages waiting per next hop (connector/nexthop) at the last sample",
                                   labels=["nexthop"])
        hop_age = GaugeMetricFamily("exmta_queue_nexthop_oldest_age_seconds",
                                    "Age of the oldest message per next hop", labels=["nexthop"])
        oldest = GaugeMetricFamily("exmta_queue_oldest_message_age_seconds", "Age of the oldest queued message")
        if snap is not None:
            for q, count in sorted(snap.by_queue.items()):
                by_queue.add_metric([q], count)
            for hop, count in sorted(snap.by_nexthop.items()):
                by_hop.add_metric([hop], count)
                hop_age.add_metric([hop], max(0.0, now - snap.oldest_by_nexthop.get(hop, now)))
            oldest.add_metric([], snap.oldest_age(now))
        yield by_queue
        yield by_hop
        yield hop_age
        yield oldest
        sched = m.scheduler
        if sched is not None:
            try:
                stats = sched.stats()
            except Exception:
                stats = None
            if stats:
                active = GaugeMetricFamily("exmta_scheduler_active_messages", "Messages in delivery now")
                active.add_metric([], stats.get("active_messages", 0))
                yield active
                inflight = GaugeMetricFamily("exmta_scheduler_in_flight", "Deliveries in flight now")
                inflight.add_metric([], stats.get("in_flight", 0))
                yield inflight
                dest = GaugeMetricFamily("exmta_destination_active_connections",
                                         "Deliveries in progress per destination", labels=["destination"])
                for key, d in sorted(stats.get("destinations", {}).items()):
                    dest.add_metric([key], d.get("active", 0))
                yield dest
        yield from _back_pressure_gauges(m.back_pressure)


def _back_pressure_gauges(pressure: Any) -> Iterable[Any]:
    """New mail refused (452 4.3.1) and why: disk, memory or queue size against their limits."""
    if pressure is None:
        return
    status = pressure.status()
    on = GaugeMetricFamily("exmta_back_pressure", "1 while new mail is refused with 452 4.3.1, by reason",
                           labels=["reason"])
    for reason, marker in (("disk", "free disk space"), ("memory", "memory "), ("queue", "in the queue")):
        on.add_metric([reason], 1 if any(marker in r for r in status["reasons"]) else 0)
    yield on
    refused = GaugeMetricFamily("exmta_back_pressure_refused_mail_commands",
                                "MAIL commands refused for back pressure since start")
    refused.add_metric([], status["refused_mail_commands"])
    yield refused
    for key, name, text in (("free_disk_bytes", "exmta_queue_free_disk_bytes", "Free space where the queue is"),
                            ("memory_bytes", "exmta_process_memory_bytes", "Resident memory as back pressure sees it"),
                            ("queued_messages", "exmta_back_pressure_queued_messages",
                             "Messages in the queue as back pressure counts them")):
        if status.get(key) is not None:
            gauge = GaugeMetricFamily(name, text)
            gauge.add_metric([], status[key])
            yield gauge


#: families whose label values are next hops or destinations (recipient domains), and what the
#: unauthenticated listener publishes instead: (per-connector name, how to combine)
_PRIVATE_FAMILIES = {
    "exmta_queue_nexthop_messages": ("exmta_queue_connector_messages", "sum"),
    "exmta_queue_nexthop_oldest_age_seconds": ("exmta_queue_connector_oldest_age_seconds", "max"),
    "exmta_destination_active_connections": ("exmta_connector_active_connections", "sum"),
}


class PublicRegistry:
    """``registry`` as the unauthenticated listener shows it: no recipient domains in labels.

    The next-hop and destination families become per-connector totals (the
    label ``connector``: the part before the ``/``); everything else passes.
    """

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Any]:
        for family in self.registry.collect():
            private = _PRIVATE_FAMILIES.get(family.name)
            if private is None:
                yield family
                continue
            name, how = private
            totals: dict[str, float] = {}
            for sample in family.samples:
                label = next(iter(sample.labels.values()), "")
                connector = label.split("/", 1)[0] or "none"
                if how == "sum":
                    totals[connector] = totals.get(connector, 0.0) + sample.value
                else:
                    totals[connector] = max(totals.get(connector, 0.0), sample.value)
            out = GaugeMetricFamily(name, family.documentation.replace("next hop", "send connector")
                                    .replace("destination", "send connector"), labels=["connector"])
            for connector, value in sorted(totals.items()):
                out.add_metric([connector], value)
            yield out


class MetricsResource(resource.Resource):
    """``GET /metrics`` in the Prometheus text format (503 with advice when unavailable).

    ``public=True`` (the unauthenticated listener): per-connector totals
    instead of families labelled with recipient domains (:class:`PublicRegistry`).
    """

    isLeaf = True

    def __init__(self, metrics: Metrics | None, public: bool = False) -> None:
        super().__init__()
        self.metrics = metrics
        self.public = public

    def render_GET(self, request: Any) -> bytes:
        if self.metrics is None or not AVAILABLE:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return (b"metrics are not available: prometheus-client is not installed "
                    b"(pip install 'exmta[metrics]') or metrics are disabled\n")
        request.setHeader(b"content-type", prometheus_client.CONTENT_TYPE_LATEST.encode("ascii"))
        if self.public:
            return prometheus_client.generate_latest(PublicRegistry(self.metrics.registry))
        return self.metrics.render()
