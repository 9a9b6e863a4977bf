"""The one assembly of the receive side: store, filters, resources and receive factories from a Config.

The main process (:mod:`exmta.service`), every receive worker
(:mod:`exmta.receive.worker`) and the SIGHUP reload (:mod:`exmta.observe.reload`)
call these functions, so that what a worker runs, and what a reload builds,
cannot drift from the main process. Each function builds objects and starts
nothing: the caller decides which services run (the main process adds them
to its ordered service tree, a worker starts them itself). Every provider a
consumer depends on is checked with ``verifyObject`` here (:mod:`exmta.seams`):
a missing method fails the start, naming the seam.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service

from exmta.config.schema import Config, ReceiveConnectorConfig
from exmta.interfaces import (
    IAuthenticator,
    IIncomingFeed,
    IProtocolLog,
    IQueueAdmin,
    IQueueStore,
    IReceivePolicy,
    IRecipientLookup,
    IReconfigurable,
    IRouter,
    ISchedulerAdmin,
    ISendConnector,
    ISessionObserver,
    ISessionTrust,
    ITLSGate,
)
from exmta.plugins import FilterEnv, load_filters, ordered
from exmta.queue.stores import StoreChoice, make_store
from exmta.receive.wiring import ReceiveResources, make_policy, make_resources
from exmta.seams import AssemblyError, require

__all__ = ["AssemblyError", "FilterSetup", "StoreSetup", "build_chain", "build_policy", "build_scheduler",
           "load_receive_filters", "make_receive_factory", "make_receive_factories", "open_store",
           "receive_resources", "verify_receive_factory"]


@dataclass
class StoreSetup:
    """The queue store of a process and the tracker that also writes to the cluster table (if any)."""

    chosen: StoreChoice
    tracker: Any
    cluster_tracking: Any   # exmta.observe.pgtracking: its ``service`` runs while the process runs; or None

    @property
    def store(self) -> Any:
        return self.chosen.store


def open_store(config: Config, paths: dict[str, str], reactor: Any, pool: Any, tracker: Any, *,
               worker: bool) -> StoreSetup:
    """The store (exmta.queue.stores) and ``tracker`` wrapped for cluster tracking when the queue is shared."""
    from exmta.observe.pgtracking import wrap_tracker

    chosen = make_store(config, paths, reactor, pool, worker=worker)
    require(IQueueStore, chosen.store, "the queue store")
    if not worker:  # the claiming process: operator actions, and the mail its receive workers commit
        require(IQueueAdmin, chosen.store, "the queue store (operator actions)")
        require(IIncomingFeed, chosen.store, "the queue store (mail from receive workers)")
    tracker, cluster_tracking = wrap_tracker(config, chosen.store, tracker, reactor)  # every node's events
    return StoreSetup(chosen, tracker, cluster_tracking)


@dataclass
class FilterSetup:
    """The filter instances of a process, their own thread pool, and the env a reload loads new ones with."""

    pool: Any
    env: FilterEnv
    filters: dict[str, Any]


def load_receive_filters(config: Config, paths: dict[str, str], reactor: Any) -> FilterSetup:
    """Every ``[filters.X]`` instance; raises ConfigError naming each plugin that cannot be built."""
    from exmta.filters.admission import make_filter_pool

    filter_pool = make_filter_pool(config.filter_threads)  # never the spool's pool (issue 11 item 2)
    env = FilterEnv(reactor=reactor, clock=reactor, threadpool=filter_pool, hostname=config.hostname,
                    data_dir=paths["data"])
    return FilterSetup(filter_pool, env, load_filters(config.filters, env, source=config.source))


def receive_resources(config: Config, paths: dict[str, str], reactor: Any, pool: Any,
                      store: StoreSetup, worker_lines: Any = None) -> ReceiveResources:
    """What every receive connector of the process shares (back pressure, recipients, lockouts, rates).

    With a shared (PostgreSQL) queue the rate limits count every process of
    every node: ``resources.rates.service`` must then run with the process.
    Else they count every process of the node, as the connection limits
    always do: the main process counts (exmta.receive.noderates.NodeRates)
    and a receive worker, whose ``worker_lines`` write to the main process,
    asks it (``resources.node``).
    """
    resources = make_resources(config, paths["queue"], reactor, reactor, pool)
    if store.chosen.shared:
        from exmta.receive.sharedrates import RateExchange

        resources.rates = RateExchange(store.store, reactor)
    from exmta.receive.noderates import NodeRates, RemoteRates

    # connection limits (and, without a shared queue, rate limits) count every process of the node
    resources.node = NodeRates(reactor) if worker_lines is None else RemoteRates(worker_lines.write, reactor)
    if resources.rates is None:
        resources.rates = resources.node
    return resources


def resource_services(resources: ReceiveResources) -> list[tuple[str, Service]]:
    """The services of ``resources`` that run with the process, in start order, with their names."""
    out: list[tuple[str, Service]] = []
    if isinstance(resources.node, Service):  # a receive worker's channel to the main process's counters
        out.append(("node-channel", resources.node))
    if getattr(resources.rates, "service", None) is not None:
        out.append(("rates-db", resources.rates.service))
    if resources.service is not None:
        out.append(("back-pressure", resources.service))
    return out


def build_policy(config: Config, rc: ReceiveConnectorConfig, clock: Any,
                 resources: ReceiveResources | None = None) -> Any:
    """The receive policy of connector ``rc`` (accepted domains, relay, permissions, limits)."""
    return make_policy(config, rc, clock, resources)


def build_chain(config: Config, rc: ReceiveConnectorConfig, filters: dict[str, Any], clock: Any,
                admission: Any = None, verdict_observer: Any = None) -> Any:
    """The filter chain of connector ``rc`` from the process's filter instances."""
    from exmta.filters.base import FilterChain

    chain = FilterChain(ordered(filters, rc.filters), clock, per_filter=config.filters)
    chain.admission = admission  # checks in flight (exmta.filters.admission)
    if verdict_observer is not None:
        chain.verdict_observer = verdict_observer
    return chain


def accepts_locally(config: Config) -> Any:
    """``local_domain(domain)`` of the receive factories: is ``domain`` one of ours."""
    return lambda domain: config.accepted_domain(domain) is not None


def postmaster_domain(config: Config, default: str | None = None) -> str | None:
    """The first accepted domain that is not a wildcard (for postmaster@ without a domain)."""
    return next((d.name for d in config.accepted_domains if not d.name.startswith("*")), default)


def make_receive_factory(config: Config, rc: ReceiveConnectorConfig, store: Any, filters: dict[str, Any],
                         tracker: Any, clock: Any, resources: Any = None) -> Any:
    """The protocol factory of one receive connector (shared by all its listen endpoints).

    ``resources`` (exmta.receive.wiring.ReceiveResources) are shared by every connector of the process.
    """
    from exmta.smtp.server import ESMTPServerFactory

    policy = build_policy(config, rc, clock, resources)
    chain = build_chain(config, rc, filters, clock, admission=getattr(resources, "admission", None))
    factory = ESMTPServerFactory(
        rc, policy, chain, store, clock, tracker=tracker, postmaster=config.postmaster,
        local_domain=accepts_locally(config), postmaster_domain=postmaster_domain(config),
    )
    from exmta.tls.reload import configure_receive_tls
    configure_receive_tls(factory, rc, clock)  # STARTTLS / implicit TLS, require_tls, client certificates
    from exmta.auth.smtp import build_authenticator
    factory.authenticator = build_authenticator(  # SMTP AUTH and send-as, or None; lockouts shared by the node
        config, rc, clock, lockouts=getattr(resources, "lockouts", None))
    from exmta.rules.wiring import attach_to_factory
    attach_to_factory(factory, config, store, tracker, clock)  # transport rules at end of data, or none
    from exmta.malware.notices import bind_outbox
    bind_outbox(store, clock, config.hostname,  # attachment-removed notices, queued once a message is committed
                f"{config.postmaster}@{postmaster_domain(config) or config.hostname}")
    return verify_receive_factory(factory)


def verify_receive_factory(factory: Any) -> Any:
    """``factory`` once every seam the SMTP server depends on is checked with verifyObject.

    Raises :class:`~exmta.seams.AssemblyError` naming the connector, the role
    and the provider that lacks its interface (exmta.interfaces opens with the
    map of which seam is used at which step).
    """
    where = f"receive.{factory.config.name}"
    require(IReceivePolicy, factory.policy, f"{where}: the receive policy")
    require(ISessionTrust, factory.policy, f"{where}: the receive policy (trusted, may_relay)")
    require(IQueueStore, factory.store, f"{where}: the queue store")
    recipients = getattr(factory.policy, "recipients", None)
    optional = ((IRecipientLookup, recipients, "the recipient lookup"),
                (IAuthenticator, factory.authenticator, "the authenticator"),
                (ITLSGate, factory.tls_gate, "the TLS gate"),
                (IProtocolLog, factory.protocol_log, "the protocol log"),
                (ISessionObserver, factory.session_observer, "the session observer"))
    for interface, provider, role in optional:
        if provider is not None:
            require(interface, provider, f"{where}: {role}")
    return factory


def build_scheduler(config: Config, store: Any, connectors: dict[str, Any], clock: Any, tracker: Any = None) -> Any:
    """The delivery scheduler of the main process, with its store, router and send connectors checked."""
    from exmta.queue.scheduler import DeliveryScheduler

    require(IQueueStore, store, "the queue store")
    require(IQueueAdmin, store, "the queue store (operator actions)")
    for name, connector in connectors.items():
        require(ISendConnector, connector, f"send.{name}")
    scheduler = DeliveryScheduler.from_config(config, store, connectors, clock, tracker=tracker)
    require(IRouter, scheduler._router, "the router")
    require(ISchedulerAdmin, scheduler, "the delivery scheduler (operator actions)")
    return require(IReconfigurable, scheduler, "the delivery scheduler (reload)")


def make_receive_factories(config: Config, store: Any, filters: dict[str, Any], tracker: Any, clock: Any,
                           resources: ReceiveResources) -> list[Any]:
    """One factory per ``[receive.X]``, in the order of ``config.receive`` (listeners are found by index)."""
    return [make_receive_factory(config, rc, store, filters, tracker, clock, resources) for rc in config.receive]
