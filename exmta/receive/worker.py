"""Entry point of one receive worker process (started by exmta.receive.workers).

``python -m exmta.receive.worker [--config FILE] --data DIR --fds FD=LISTENER=FAMILY=HAPROXY,...``

LISTENER is the index of the listen endpoint in exmta.receive.wiring.make_dispatchers.

The worker adopts the listening sockets it inherited, accepts SMTP on them
with the same receive connectors as the main process, commits into the
shared spool, and prints each committed queue id on its stdout.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, cast

from twisted.internet import defer
from twisted.logger import FileLogObserver, Logger, eventAsText, globalLogBeginner

log = Logger()


class LineBatcher:
    """Lines for the main process, written to ``fd`` once per reactor iteration.

    Each committed message gave three pipe writes (its queue id, its tracking
    event, the session's event); messages finishing in one iteration now
    share one write, and the main process one read. Order is kept.
    """

    def __init__(self, clock: Any, fd: int = 1) -> None:
        self.clock = clock
        self.fd = fd
        self.pending: list[bytes] = []
        self.call: Any = None

    def write(self, line: bytes) -> None:
        self.pending.append(line)
        if self.call is None:
            self.call = self.clock.callLater(0, self.flush)

    def announce(self, queue_id: str) -> None:
        self.write(queue_id.encode("ascii") + b"\n")

    def flush(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None
        data, self.pending = b"".join(self.pending), []
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the main process dies, even by kill -9.

    An orphaned worker would keep the listening socket and accept mail that
    no scheduler delivers; with this it drains and exits instead.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


READY_LINE = b"!ready\n"  # not a queue id nor a metrics event: this worker accepts connections


def _reload_worker(reloader: Any) -> None:
    if reloader.config.source.startswith("<"):
        return  # the embedded default: no file
    reloader.reload()


def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="exmta-receive-worker")
    parser.add_argument("--config")
    parser.add_argument("--data", required=True)
    parser.add_argument("--fds", required=True)
    parser.add_argument("--index", type=int, default=0)  # which worker of the pool: names it in the log
    args = parser.parse_args(argv)
    early_hup: list[int] = []  # a SIGHUP before the reload is wired must neither kill us nor be lost
    signal.signal(signal.SIGHUP, lambda *a: early_hup.append(1))

    # no timestamp: the main process stamps each line it relays (exmta.receive.workers)
    observer = FileLogObserver(sys.stderr, lambda event: eventAsText(event, includeTimestamp=False) + "\n")
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    from twisted.internet import reactor

    from exmta.assembly import (load_receive_filters, make_receive_factories, open_store, receive_resources,
                                resource_services)
    from exmta.config.load import embedded_default, load_config
    from exmta.observe.tracking import TrackingLog
    from exmta.service import data_paths, make_threadpool

    config = load_config(args.config, data_dir=args.data) if args.config else embedded_default(args.data)
    paths = data_paths(config)
    pool = make_threadpool()
    pool.start()
    tracker = TrackingLog(paths["tracking"])
    from exmta.observe.worker_metrics import WorkerRelay
    lines = LineBatcher(reactor)
    relay = WorkerRelay(lines.write)  # metrics: events to the main process too
    tracker = relay.wrap(tracker)
    file_tracker = tracker
    # the same assembly as the main process (exmta.assembly); only the main process claims (exmta.queue.stores)
    opened = open_store(config, paths, reactor, pool, tracker, worker=True)
    chosen, store, tracker, cluster_tracking = opened.chosen, opened.store, opened.tracker, opened.cluster_tracking
    if chosen.service is not None:
        store.open()  # connections only: leases, heartbeats and polling belong to the main process
    if cluster_tracking is not None:
        cluster_tracking.service.startService()
    store.add_listener(lines.announce)
    loaded = load_receive_filters(config, paths, reactor)
    filter_pool, env, filters = loaded.pool, loaded.env, loaded.filters
    filter_pool.start()
    from exmta.receive.proxy import wrap_proxy
    from exmta.receive.wiring import make_dispatchers

    # rate limits: counted by the main process (or the cluster's database), asked over our stdin/stdout
    resources = receive_resources(config, paths, reactor, pool, opened, worker_lines=lines)
    services = [service for _name, service in resource_services(resources)]
    for service in services:
        service.startService()
    factories: dict[str, Any] = dict(zip(
        [rc.name for rc in config.receive],
        make_receive_factories(config, store, filters, tracker, reactor, resources)))
    relay.observe(factories.values())
    from exmta.admin.service import attach_protocol_logs
    protocol_logs = attach_protocol_logs(config, paths, reactor, factories.values(), rotate=False)
    # the same listeners in the same order as the main process: the index names the socket
    dispatchers = make_dispatchers(config.receive, list(factories.values()), reactor, node=resources.node)

    ports = []
    for item in args.fds.split(","):
        fd_text, index, family_text, haproxy = item.split("=")
        factory = wrap_proxy(dispatchers[int(index)][1], haproxy == "1")
        ports.append(reactor.adoptStreamPort(int(fd_text), int(family_text), factory))

    async def shutdown() -> None:
        for port in ports:
            await defer.maybeDeferred(port.stopListening)
        await defer.DeferredList([defer.maybeDeferred(f.shutdown, 10.0) for f in factories.values()])
        if resources.service is not None:
            resources.service.stopService()
        file_tracker.close()
        protocol_logs.close()
        for name, service in resource_services(resources):
            if name in ("rates-db", "node-channel"):  # the cluster's exchange, the channel to the main process
                await defer.maybeDeferred(service.stopService)
        if cluster_tracking is not None:
            await defer.maybeDeferred(cluster_tracking.service.stopService)
        if chosen.service is not None:
            store.close()
        pool.stop()
        filter_pool.stop()
        lines.flush()

    stopping = []

    def on_term(*_: Any) -> None:
        if stopping:
            return
        stopping.append(True)
        d = defer.Deferred.fromCoroutine(shutdown())
        d.addErrback(lambda f: log.failure("worker shutdown failed", f))
        d.addBoth(lambda _: reactor.stop())

    signal.signal(signal.SIGTERM, lambda *a: reactor.callFromThread(on_term))
    # SIGHUP from the main process once its own reload succeeded: the same reload (exmta.observe.reload),
    # built through the same assembly, all or nothing; the log lines say what this worker applied
    from exmta.observe.reload import ConfigReloader

    reloader = ConfigReloader(config, reactor, factories=factories, filters=filters, filter_env=env,
                              data_dir=args.data, resources=resources, process=f"receive worker {args.index}")
    signal.signal(signal.SIGHUP, lambda *a: cast(Any, reactor).callFromThread(_reload_worker, reloader))
    if early_hup:
        reactor.callWhenRunning(_reload_worker, reloader)
    if config.receive_worker_nice:
        # under CPU contention delivery goes first: measured, equal shares let the two workers
        # out-accept the main process and the queue grow (benchmarks/PERFORMANCE.rst)
        os.nice(config.receive_worker_nice)
    _die_with_parent()
    if os.getppid() == 1:  # the main process died before we got here
        reactor.callWhenRunning(on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when workers stop
    log.info("receive worker ready, pid {pid}", pid=os.getpid())
    lines.write(READY_LINE)  # /readyz counts this worker from now on (exmta.receive.workers)
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    run(sys.argv[1:])
