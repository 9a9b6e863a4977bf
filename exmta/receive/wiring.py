"""Builds the connector-security parts of the receive side from a Config.

Used by :mod:`exmta.service` (the main process) and
:mod:`exmta.receive.worker` (receive worker processes), so that both build
the same policies and the same listeners in the same order: the worker finds
its inherited sockets by their index in :func:`make_dispatchers`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

from exmta.config.schema import Config, ReceiveConnectorConfig
from exmta.receive.backpressure import BackPressure, BackPressureService
from exmta.receive.policy import DefaultReceivePolicy
from exmta.receive.ranges import ConnectorEntry, DispatchingFactory, group_listeners
from exmta.receive.recipients import RecipientList, RecipientValidator

__all__ = ["ReceiveResources", "make_dispatchers", "make_policy", "make_resources"]


@dataclass
class ReceiveResources:
    """What all receive connectors of one process share."""

    back_pressure: BackPressure | None = None
    recipients: RecipientValidator | None = None
    service: BackPressureService | None = None   # measures back pressure while running
    admission: Any = None  # exmta.filters.admission.CheckAdmission: filter runs in flight
    lockouts: Any = None   # exmta.auth.lockstore.LockoutStore: AUTH failures of the node (all processes)
    rates: Any = None      # rate limits beyond one process: the node's (= node) or the cluster's (RateExchange)
    #: exmta.receive.noderates: NodeRates in the main process, RemoteRates in a receive worker (asks the main one)
    node: Any = None


def make_resources(config: Config, queue_dir: str, clock: Any, reactor: Any = None,
                   threadpool: Any = None) -> ReceiveResources:
    """Back pressure on ``queue_dir`` and the recipient list of ``config``."""
    bp_config = config.back_pressure
    pressure = BackPressure(
        queue_dir, min_free_disk=bp_config.min_free_disk, max_memory=bp_config.max_memory,
        max_queued_messages=bp_config.max_queued_messages, clock=clock,
    )
    service = BackPressureService(pressure, clock, bp_config.check_interval, reactor=reactor,
                                  threadpool=threadpool) if pressure.enabled else None
    recipients = None
    if config.recipient_list:
        recipients = RecipientValidator(
            RecipientList(os.path.abspath(config.recipient_list), clock, reactor=reactor, threadpool=threadpool),
            postmaster=config.postmaster,
        )
    else:
        recipients = RecipientValidator(postmaster=config.postmaster)  # directory lookups may be added
    if config.recipient_directory:  # LDAP / AD: mail and proxyAddresses (exmta.receive.directory)
        recipients.lookups.append(_directory_lookup(config, clock, reactor))
    from exmta.filters.admission import CheckAdmission

    admission = CheckAdmission(config.filter_checks_in_flight, config.filter_checks_per_client)
    lockouts = None
    if any(rc.auth and rc.auth_backend for rc in config.receive):
        from exmta.auth.lockout_stores import lockout_store_for

        lockouts = lockout_store_for(config, clock)
    return ReceiveResources(pressure if pressure.enabled else None, recipients, service, admission, lockouts)


def _directory_lookup(config: Config, clock: Any, reactor: Any) -> Any:
    """The cached LDAP recipient lookup of ``[server] recipient_directory`` (on the reactor's pool, as AUTH)."""
    from exmta.auth.ldap import LDAPChecker, LDAPSettings
    from exmta.auth.smtp import blocking_runner
    from exmta.receive.directory import DirectoryRecipients

    backend = config.auth_backend(config.recipient_directory or "")
    assert backend is not None and backend.kind == "ldap"  # exmta.config.abuse checked it
    run = blocking_runner(reactor if reactor is not None else clock)
    checker = LDAPChecker(LDAPSettings.from_backend(backend), run)
    return DirectoryRecipients(checker.has_address, run, clock, ttl=config.recipient_cache_ttl)


def make_policy(config: Config, rc: ReceiveConnectorConfig, clock: Any,
                resources: ReceiveResources | None = None) -> DefaultReceivePolicy:
    resources = resources or ReceiveResources()
    return DefaultReceivePolicy.for_connector(config, rc, clock, recipients=resources.recipients,
                                              back_pressure=resources.back_pressure, rates=resources.rates)


def _listening(factory: Any, clock: Any) -> Any:
    """The connector's own listening factory (implicit TLS wraps it; exmta.tls.context)."""
    try:
        from exmta.tls.context import listening_factory
    except ImportError:
        return factory
    return listening_factory(factory, clock)


def make_dispatchers(connectors: Sequence[ReceiveConnectorConfig], factories: Sequence[Any],
                     clock: Any = None, node: Any = None) -> list[tuple[str, DispatchingFactory]]:
    """One dispatching factory per distinct listen endpoint, in a stable order.

    ``factories[i]`` is the session factory of ``connectors[i]``. A connector
    listening on several endpoints has one :class:`ConnectorEntry`, so its
    connection limits count all of them together; with ``node``
    (ReceiveResources.node) they count every process of the node.
    """
    from exmta.receive.screen import ConnectionScreen, screened

    screen = ConnectionScreen(clock) if clock is not None else None  # DNS lists and greet pause (one per process)
    entries = {
        rc.name: ConnectorEntry.from_config(rc, screened(_listening(f, clock), f, screen), f)
        for rc, f in zip(connectors, factories)
    }
    if hasattr(node, "connection_counter"):  # the main process: its sessions and its workers' in one count
        for rc in connectors:
            counter = node.connection_counter(rc.name)
            counter.max_total, counter.max_per_ip = entries[rc.name].counter.max_total, \
                entries[rc.name].counter.max_per_ip
            entries[rc.name].counter = counter
    dispatchers = [
        (endpoint, DispatchingFactory([entries[rc.name] for rc in rcs], endpoint))
        for endpoint, rcs in group_listeners(connectors)
    ]
    # sessions stay below the open files limit, raised first (exmta.receive.fdlimit)
    from exmta.receive.fdlimit import raise_nofile, session_budget
    from exmta.receive.ranges import ConnectionCounter

    cap = session_budget(connectors, raise_nofile()[0])
    budget = ConnectionCounter(max_total=cap) if cap else None
    for _, dispatcher in dispatchers:
        dispatcher.budget = budget
        dispatcher.clock = clock
        if hasattr(node, "open_connection"):  # a receive worker asks the main process before each session
            dispatcher.node = node
    return dispatchers
