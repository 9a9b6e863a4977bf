"""Build the running server from a Config: the ordered service tree.

Objects are created from the bottom of the data path upward (threads, log,
store, send connectors, router, scheduler, pickup, receive listeners) and
started in that order; they stop in reverse order, one after the other, each
with a deadline, so listeners close before the queue and the queue before
the store.
"""
from __future__ import annotations

import os
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from exmta.assembly import (build_scheduler, load_receive_filters, make_receive_factories, open_store,
                            receive_resources, resource_services)
from exmta.assembly import make_receive_factory  # noqa: F401  (re-exported: its home was this module)
from exmta.config.schema import Config
from exmta.receive.proxy import listen_service, wrap_proxy
from exmta.receive.wiring import make_dispatchers
from exmta.receive.workers import ListenSpec, WorkerPool, parse_shareable

log = Logger()

INCOMING_RESCAN = 30.0  # seconds between scans of incoming/ for mail committed by workers


class OrderedService(MultiService):
    """A MultiService that starts children in order and stops them in reverse, one at a time.

    Twisted's MultiService stops every child at once and ignores the
    Deferreds of startService; an MTA must close its listeners before it
    stops its queue, and its queue before its store.
    """

    stop_deadline = 30.0

    def __init__(self, clock: Any) -> None:
        super().__init__()
        self.clock = clock

    def startService(self) -> defer.Deferred:
        Service.startService(self)
        return defer.Deferred.fromCoroutine(self._start_all())

    async def _start_all(self) -> None:
        for child in list(self):
            try:
                await defer.maybeDeferred(child.startService)
            except Exception:
                log.failure("exmta: {service} failed to start", service=child.name)
                raise

    def stopService(self) -> defer.Deferred:
        Service.stopService(self)
        return defer.Deferred.fromCoroutine(self._stop_all())

    async def _stop_all(self) -> None:
        for child in reversed(list(self)):
            if not child.running:
                continue
            d = defer.maybeDeferred(child.stopService)
            d.addTimeout(self.stop_deadline, self.clock)
            try:
                await d
            except defer.TimeoutError:
                log.warn("exmta: {service} did not stop within {deadline}s", service=child.name,
                         deadline=self.stop_deadline)
            except Exception:
                log.failure("exmta: {service} failed to stop cleanly", service=child.name)


class ThreadPoolService(Service):
    """Owns the bounded thread pool used for fsync, DNS and other blocking calls."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class StoreService(Service):
    """Recovers the spool at start, before the scheduler claims anything."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def _recover(self) -> None:
        count = await defer.maybeDeferred(self.store.recover)
        log.info("exmta: queue recovered, {count} message(s) waiting", count=count)

    def startService(self) -> defer.Deferred:
        super().startService()
        return defer.Deferred.fromCoroutine(self._recover())


class ReceiveDrainService(Service):
    """Stops after the listeners: lets open sessions finish, then says 421."""

    def __init__(self, factories: list[Any], grace: float) -> None:
        self.factories = factories
        self.grace = grace

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.DeferredList([defer.maybeDeferred(f.shutdown, self.grace) for f in self.factories])


class TrackerService(Service):
    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def stopService(self) -> None:
        super().stopService()
        close = getattr(self.tracker, "close", None)
        if close is not None:
            close()


def data_paths(config: Config) -> dict[str, str]:
    data = os.path.abspath(config.data_dir)
    return {
        "data": data,
        "queue": os.path.join(data, "queue"),
        "pickup": os.path.abspath(config.pickup_dir) if config.pickup_dir else os.path.join(data, "pickup"),
        "tracking": (os.path.abspath(config.tracking_log) if config.tracking_log
                     else os.path.join(data, "log", "tracking.jsonl")),
    }


def make_threadpool() -> ThreadPool:
    return ThreadPool(minthreads=2, maxthreads=8, name="exmta-io")


def make_send_connectors(config: Config, reactor: Any, pool: ThreadPool) -> dict[str, Any]:
    from exmta.routing.dns import DNSResolver, parse_nameservers
    from exmta.send import build_wire_connector
    from exmta.send.maildir import MaildirConnector

    connectors: dict[str, Any] = {}
    for sc in config.send:
        if sc.kind == "maildir":
            root = os.path.abspath(sc.maildir_root or os.path.join(config.data_dir, "mail"))
            connectors[sc.name] = MaildirConnector(sc.name, root, clock=reactor, threadpool=pool,
                                                   reactor=reactor, hostname=config.hostname)
        else:
            resolver = None
            if sc.kind == "smtp" and not sc.smarthosts:
                resolver = DNSResolver(reactor, pool, nameservers=parse_nameservers(sc.dns_servers) or None)
            from exmta.tls.client import send_tls_context
            connectors[sc.name] = build_wire_connector(sc, reactor, reactor, resolver, config.hostname,
                                                       send_tls_context(sc))
    from exmta.send.header_firewall import attach_header_firewalls
    attach_header_firewalls(config, connectors)  # before DKIM: strip, then sign
    if config.dkim_keys:  # DKIM signing on connectors with dkim_sign = true (exmta.send.dkim_sign)
        from exmta.send.dkim_sign import attach_signers
        attach_signers(config, connectors, reactor, pool)
    if any(sc.auth == "xoauth2" for sc in config.send):  # OAuth2 tokens for XOAUTH2 (exmta.send.oauth2)
        from exmta.send.oauth2 import attach_token_sources
        attach_token_sources(config.send, connectors, reactor, reactor)
    from exmta.tlspolicy.wiring import attach_tls_policy
    attach_tls_policy(config, connectors, reactor, pool)  # MTA-STS and DANE for MX delivery (exmta.tlspolicy)
    return connectors


class ConnectorsService(Service):
    """Closes the send connectors' cached connections (QUIT) after the scheduler stops."""

    def __init__(self, connectors: dict[str, Any]) -> None:
        self.connectors = connectors

    def stopService(self) -> defer.Deferred:
        super().stopService()
        closing = [defer.maybeDeferred(c.close) for c in self.connectors.values() if hasattr(c, "close")]
        return defer.DeferredList(closing, consumeErrors=True)


def build_service(config: Config, reactor: Any) -> OrderedService:
    """Wire every component for ``config`` into one ordered service tree."""
    from exmta.observe.tracking import TrackingLog
    from exmta.queue.pickup import PickupDirectory
    paths = data_paths(config)
    for key in ("data", "queue", "pickup"):
        os.makedirs(paths[key], exist_ok=True)
    os.makedirs(os.path.dirname(paths["tracking"]), exist_ok=True)
    from exmta.filemodes import close_directories
    close_directories([paths["data"], paths["pickup"], os.path.dirname(paths["tracking"])])  # no "other" access

    top = OrderedService(reactor)
    pool = make_threadpool()
    _add(top, "threads", ThreadPoolService(pool))

    from exmta.admin.config import rotation_kwargs
    tracker = TrackingLog(paths["tracking"], reactor, **rotation_kwargs(config.logs))
    tracking_log = tracker
    _add(top, "tracking", TrackerService(tracker))

    opened = open_store(config, paths, reactor, pool, tracker, worker=False)  # the same call as each worker
    chosen, store, tracker, cluster_tracking = opened.chosen, opened.store, opened.tracker, opened.cluster_tracking
    if chosen.service is not None:
        _add(top, "store-db", chosen.service)  # PostgreSQL: connections, lease renewal, heartbeats
    top.store_service = chosen.service
    if cluster_tracking is not None:
        _add(top, "tracking-db", cluster_tracking.service)
    _add(top, "store", StoreService(store))

    from exmta.observe.runtime import build_observability
    observe = top.observability = build_observability(config, reactor, store, paths)
    if chosen.service is not None:
        observe.readiness.add("cluster", chosen.service.readiness)  # draining, or PostgreSQL unreachable
    if observe.http is not None:
        _add(top, "observe-http", observe.http)  # stops late: /readyz answers "stopping" while draining
    tracker = observe.fan_out(tracker)

    connectors = make_send_connectors(config, reactor, pool)
    _add(top, "send", ConnectorsService(connectors))
    scheduler = build_scheduler(config, store, connectors, reactor, tracker=tracker)  # verifyObject on each seam
    from exmta.queue.operator_state import OperatorStateFile, redirect_connector_factory
    scheduler.restore_operator_state(OperatorStateFile(paths["queue"]),  # suspensions, redirect: kept across restarts
                                     redirect_connector_factory(config, reactor, connectors))
    _add(top, "scheduler", scheduler)
    store.add_listener(lambda queue_id: scheduler.wake())

    pickup = PickupDirectory(paths["pickup"], store, reactor, config.queue.pickup_interval, tracker=tracker,
                             hostname=config.hostname,
                             run_blocking=lambda f, *a: deferToThreadPool(reactor, pool, f, *a))  # off the reactor
    from exmta.rules.wiring import transport_rules_for
    pickup.transport_rules = transport_rules_for(config, store, tracker, reactor)  # rules on picked-up mail
    _add(top, "pickup", pickup)

    loaded = load_receive_filters(config, paths, reactor)  # the same call as each worker and each reload
    _add(top, "filter-threads", ThreadPoolService(loaded.pool))
    env, filters = loaded.env, loaded.filters
    from exmta.filters.dmarc_reports import add_report_service
    add_report_service(top, config, store, reactor, pool, paths["data"])  # [filters.X] dmarc with reports = true
    from exmta.tlspolicy.report import add_tls_report_service
    add_tls_report_service(top, config, store, reactor, pool, connectors)  # [tls_policy] tls_rpt = true
    resources = receive_resources(config, paths, reactor, pool, opened)  # rates shared by the cluster, if any
    for name, service in resource_services(resources):
        _add(top, name, service)
    top.back_pressure = resources.back_pressure  # .status() for an operator's metrics
    factories = make_receive_factories(config, store, filters, tracker, reactor, resources)
    _add(top, "receive-drain", ReceiveDrainService(factories, grace=10.0))
    from exmta.tls.reload import TLSReloadService
    _add(top, "tls-reload", TLSReloadService(
        [f.tls_context_factory for f in factories if f.tls_context_factory is not None], reactor, reactor))
    shared: list[tuple[ListenSpec, Any]] = []
    workers: WorkerPool | None = None  # SIGHUP reaches them through the reload service
    # one listener per endpoint; it hands each connection to the connector whose remote_ranges fit best
    dispatchers = make_dispatchers(config.receive, factories, reactor, node=resources.node)  # node-wide limits
    for i, (endpoint, dispatcher) in enumerate(dispatchers):
        spec = parse_shareable(str(i), endpoint) if config.receive_workers else None
        if spec is not None:
            shared.append((spec, None))  # bound by the pool's privilegedStartService, before twistd drops root
        else:
            _add(top, f"receive.{i}", listen_service(endpoint, dispatcher, reactor))
    if shared:
        def committed_elsewhere(queue_id: str) -> None:
            store.notice(queue_id)
            scheduler.wake()

        worker_args = ["--data", paths["data"]]
        if config.source and os.path.exists(config.source):
            worker_args += ["--config", os.path.abspath(config.source)]
        workers = WorkerPool(reactor, config.receive_workers, shared, worker_args, committed_elsewhere,
                             on_event=observe.worker_event, node=resources.node,
                             serve_here=lambda spec: wrap_proxy(dispatchers[int(spec.connector)][1], spec.haproxy))
        _add(top, "receive-workers", workers)
        observe.readiness.add("receive workers", workers.readiness)  # each alive and accepting
        # the safety net for a queue id whose line from a worker was lost
        rescan = TimerService(INCOMING_RESCAN, store.scan_incoming)
        rescan.clock = reactor
        _add(top, "incoming-rescan", rescan)
    observe.attach(scheduler, factories, config.receive)
    if observe.metrics is not None:
        observe.metrics.back_pressure = resources.back_pressure
        from exmta.send.oauth2 import register_metrics
        register_metrics(observe.metrics, connectors)  # token requests and cache hits (XOAUTH2)
    _add(top, "reload", observe.reload_service(scheduler, factories, filters, env, resources, workers))  # SIGHUP
    _add(top, "observe", observe.service)  # last: started when all listen, stopped first
    from exmta.admin.service import add_operations
    top.admin_root = add_operations(  # protocol logs, log rotation, admin API (/api); others putChild here
        top, config, reactor, paths, store=store, scheduler=scheduler, tracker=tracker, pool=pool,
        connectors=connectors, factories=factories, tracking_log=tracking_log)
    log.info("exmta: {count} receive connector(s), {send} send connector(s), data in {data}",
             count=len(config.receive), send=len(connectors), data=paths["data"])
    return top


def _add(parent: MultiService, name: str, child: Service) -> None:
    child.setName(name)
    child.setServiceParent(parent)
