"""Wires metrics, health, alerts and the status page into the running server.

:func:`build_observability` is called once by :func:`exmta.service.build_service`.
It returns an :class:`Observability` holding the trackers to fan out to,
the queue sampler, the alert manager and the readiness checks, and two
services to add to the ordered tree:

* ``http`` (added early, so it stops late): the optional dedicated listener
  ``[metrics] listen`` serving ``/metrics``, ``/healthz`` and ``/readyz``
  (unauthenticated, for Prometheus and load balancers; no message data, and
  queue gauges per connector, not per next hop: no recipient domains). It
  closes clients outside ``[metrics] allowed_networks`` when they connect and
  answers GET/HEAD only, refused before any request body is read;
* ``service`` (added last, so it starts when everything listens and stops
  first): marks the server ready, runs the sampler and the alerts; while the
  rest of the tree drains, ``/readyz`` already says "stopping".

The admin API mounts :meth:`Observability.admin_children` (metrics, health,
status page with the tracking search) behind its authentication.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from twisted.application import strports
from twisted.application.service import Service
from twisted.logger import Logger
from twisted.web import resource

from exmta.interfaces import ISessionObserver
from exmta.observe import metrics as metrics_mod
from exmta.observe.alerts import AlertManager, LogNotifier, MailNotifier, Sources, WebhookNotifier, build_rules
from exmta.observe.health import HealthResource, ReadinessChecks, ReadyResource, disk_free
from exmta.seams import require

__all__ = ["Observability", "build_observability"]

log = Logger()


class _StateService(Service):
    """Started last, stopped first: readiness, sampler and alert loops."""

    def __init__(self, owner: Observability) -> None:
        self.owner = owner

    def startService(self) -> None:
        super().startService()
        self.owner.started = True
        self.owner.sampler.start()
        if self.owner.alerts is not None:
            self.owner.alerts.start()

    def stopService(self) -> None:
        super().stopService()
        self.owner.stopping = True
        self.owner.sampler.stop()
        if self.owner.alerts is not None:
            self.owner.alerts.stop()


class Observability:
    """Everything operators look at, for one running server."""

    def __init__(self, config: Any, reactor: Any, store: Any, paths: dict[str, str]) -> None:
        self.config = config
        self.reactor = reactor
        self.store = store
        self.paths = paths
        self.started = False
        self.stopping = False
        self.factories: dict[str, Any] = {}
        self.scheduler: Any = None
        self._router: Callable[[], Any] = lambda: None
        self.throughput = metrics_mod.Throughput(reactor)
        self.sampler = metrics_mod.QueueSampler(store, lambda: self._router(), reactor,
                                                interval=config.metrics.sample_interval)
        self.history: list[tuple[float, int]] = []   # (time, queued) for the status page, last hour
        self.sampler.listeners.append(self._remember_queue)
        self.metrics: metrics_mod.Metrics | None = None
        if config.metrics.enabled and metrics_mod.AVAILABLE:
            self.metrics = metrics_mod.Metrics(reactor, self.sampler, lambda: self.factories)
        elif config.metrics.enabled:
            log.warn("metrics: prometheus-client is not installed (pip install 'exmta[metrics]'); "
                     "/metrics will say so")
        self.readiness = ReadinessChecks()
        self.readiness.add("started", lambda: (self.started, "every service started (listening, queue recovered)")
                           if self.started else (False, "starting"))
        self.readiness.add("not stopping", lambda: (not self.stopping, "stopping" if self.stopping else "running"))
        self.readiness.add("queue disk", ReadinessChecks.disk_floor(paths["queue"], config.metrics.min_free_disk))
        self.alerts = self._build_alerts(config)
        # queue rules follow each queue sample, not only their own timer: the status page then never
        # shows a queue sample together with an alert state evaluated on an older one
        self.sampler.listeners.append(lambda _snap: self.alerts.evaluate() if self.alerts is not None else None)
        self.service = _StateService(self)
        self.http: Service | None = None
        if config.metrics.listen:
            from exmta.admin.httpguard import METRICS_METHODS, GuardedSite

            listen = config.metrics.listen
            # refused before any body is read
            site = GuardedSite(self.public_root(), config.metrics.allowed_networks, max_body=0,
                               methods=METRICS_METHODS)
            if isinstance(listen, str):
                self.http = strports.service(listen, site, reactor=reactor)
            else:  # several endpoints: one service over them all
                from twisted.application.service import MultiService

                self.http = MultiService()
                for ep in listen:
                    strports.service(ep, site, reactor=reactor).setServiceParent(self.http)

    # ------------------------------------------------------------ wiring

    def trackers(self) -> list[Any]:
        """IMessageTrackers to put beside the tracking log."""
        return [t for t in (self.metrics, self.throughput) if t is not None]

    def fan_out(self, tracking_log: Any) -> Any:
        """The tracker to give the server, scheduler and pickup: the tracking log plus ours."""
        from exmta.observe.tracking import MultiTracker

        extra = self.trackers()
        return MultiTracker(tracking_log, *extra) if extra else tracking_log

    def attach(self, scheduler: Any, factories: list[Any], receive: Any) -> None:
        """Give the sampler and gauges the scheduler and the receive factories (name -> factory)."""
        self.scheduler = scheduler
        self._router = lambda: getattr(scheduler, "_router", None)
        if self.metrics is not None:
            self.metrics.scheduler = scheduler
        for rc, factory in zip(receive, factories):
            self.factories[rc.name] = factory
            self.observe_factory(factory)

    def worker_event(self, line: bytes) -> None:
        """One metrics line from a receive worker process (exmta.observe.worker_metrics)."""
        from exmta.observe.worker_metrics import dispatch

        dispatch(line, self.metrics, self.trackers())

    def reload_service(self, scheduler: Any, factories: list[Any], filters: dict[str, Any],
                       filter_env: Any, resources: Any = None, workers: Any = None) -> Service:
        """The SIGHUP configuration reload (exmta.observe.reload) for this server and its receive ``workers``."""
        from exmta.observe.reload import ConfigReloader, ReloadService

        self.reloader = ConfigReloader(
            self.config, self.reactor, scheduler=scheduler,
            factories={rc.name: f for rc, f in zip(self.config.receive, factories)},
            filters=filters, filter_env=filter_env, observability=self, resources=resources, workers=workers,
        )
        return ReloadService(self.reloader, self.reactor)

    def observe_factory(self, factory: Any) -> None:
        """Make ``factory`` (and its filter chain) report sessions and verdicts to the metrics."""
        if self.metrics is None:
            return
        factory.session_observer = require(ISessionObserver, self.metrics, "the session observer (metrics)")
        chain = getattr(factory, "filters", None)
        if chain is not None:
            chain.verdict_observer = self.metrics.filter_verdict

    def _build_alerts(self, config: Any) -> AlertManager | None:
        ac = config.alerts
        if not ac.rules:
            return None
        notifiers: list[Any] = [LogNotifier()]
        if ac.mail_postmaster:
            primary = next((d.name for d in config.accepted_domains if not d.name.startswith("*")), None)
            notifiers.append(MailNotifier(self.store, f"{config.postmaster}@{primary or config.hostname}",
                                          config.hostname, self.reactor))
        if ac.webhook:
            notifiers.append(WebhookNotifier(self.reactor, ac.webhook, ac.webhook_timeout))
        return AlertManager(self.reactor, self.rules_for(config), self._sources(), notifiers,
                            interval=ac.interval, repeat=ac.repeat)

    def rules_for(self, config: Any) -> list[Any]:
        rules = build_rules(config.alerts.rules)
        default_certs = tuple(
            rc.tls.certificate.cert for rc in config.receive
            if getattr(getattr(rc, "tls", None), "certificate", None) is not None
        )
        out = []
        for rule in rules:
            if rule.kind == "cert_expiry" and not rule.certificates:
                rule = type(rule)(**{**rule.__dict__, "certificates": default_certs})
            out.append(rule)
        return out

    def _sources(self) -> Sources:
        m = self.metrics
        return Sources(
            snapshot=lambda: self.sampler.snapshot,
            outcomes_since=self.throughput.outcomes_since,
            sessions_total=(lambda: m.counter_total(m.connections)) if m else None,
            timeouts_total=(lambda: m.counter_total(m.timeouts)) if m else None,
            auth_failures_total=(lambda: m.counter_total(m.auth_failures)) if m else None,
            disk_free=lambda: disk_free(self.paths["queue"]),
            now_wall=self.reactor.seconds,
        )

    def reload(self, config: Any) -> list[str]:
        """Apply a new configuration's alert rules and intervals; -> what changed."""
        changed = []
        self.config = config
        self.sampler.interval = config.metrics.sample_interval
        if self.alerts is not None:
            self.alerts.set_rules(self.rules_for(config))
            self.alerts.interval = config.alerts.interval
            self.alerts.repeat = config.alerts.repeat
            changed.append(f"alerts: {len(config.alerts.rules)} rule(s)")
        elif config.alerts.rules:
            changed.append("alerts: new rules need a restart (no alert manager was running)")
        return changed

    def _remember_queue(self, snap: metrics_mod.QueueSnapshot) -> None:
        self.history.append((snap.taken_at, snap.total))
        cutoff = snap.taken_at - 3600.0
        while self.history and self.history[0][0] < cutoff:
            self.history.pop(0)

    # ------------------------------------------------------------ web

    def public_root(self) -> resource.Resource:
        """/metrics, /healthz, /readyz (and /status with ``status_page``): the unauthenticated listener's tree."""
        root = resource.Resource()
        children = self.admin_children() if self.config.metrics.status_page else self.public_children()
        children[b"metrics"] = metrics_mod.MetricsResource(self.metrics, public=True)  # no recipient domains
        for name, child in children.items():
            root.putChild(name, child)
        return root

    def public_children(self) -> dict[bytes, resource.Resource]:
        return {
            b"metrics": metrics_mod.MetricsResource(self.metrics),
            b"healthz": HealthResource(),
            b"readyz": ReadyResource(self.readiness),
        }

    def admin_children(self, search: Callable[..., Any] | None = None) -> dict[bytes, resource.Resource]:
        """Everything above plus ``status`` (the page): mount these under the admin API's root."""
        from exmta.admin.status import StatusResource

        children = self.public_children()
        children[b"status"] = StatusResource(self, search=search)
        return children


def build_observability(config: Any, reactor: Any, store: Any, paths: dict[str, str]) -> Observability:
    os.makedirs(paths["queue"], exist_ok=True)
    return Observability(config, reactor, store, paths)
