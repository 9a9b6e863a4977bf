"""Building the process's TransportRules from the configuration and attaching it where mail enters.

One :class:`~exmta.rules.hook.TransportRules` per process and store (the
main process and each receive worker have their own), with its own bounded
thread pool started and stopped with the reactor. Each receive connector
gets a view that knows whether its sessions count as internal (the
connector's ``trusted``: permission groups, relay right, authentication).
"""
from __future__ import annotations

import weakref
from typing import Any

from exmta.config.schema import Config
from exmta.message import Limits
from exmta.rules.hook import EndOfData, TransportRules

__all__ = ["ConnectorRules", "SCL_HEADER", "attach_to_factory", "scl_of", "transport_rules_for"]

SCL_HEADER = "X-MS-Exchange-Organization-SCL"

_BUILT: weakref.WeakKeyDictionary[Any, TransportRules] = weakref.WeakKeyDictionary()


class ConnectorRules:
    """The rules as one receive connector calls them (its own idea of an internal session)."""

    def __init__(self, rules: TransportRules, factory: Any) -> None:
        self.rules = rules
        self.factory = factory

    async def at_end_of_data(self, session: Any, txn: Any, view: Any, writer: Any) -> EndOfData:
        internal = bool(self.factory.trusted(session))
        trusted = internal or bool(getattr(session, "auth_identity", None))
        return await self.rules.at_end_of_data(session, txn, view, writer, trusted=trusted,
                                               scl=scl_of(view, internal))


def scl_of(view: Any, trusted_headers: bool) -> int | None:
    """The message's SCL for SCLOver: set by a filter at this end of data (the header journal), else the
    ``X-MS-Exchange-Organization-SCL`` field when the session may bring organization headers (the header
    firewall removes it otherwise), else None."""
    value = None
    for op in getattr(getattr(view, "edits", None), "ops", ()):
        if op[0] in ("add", "insert", "replace") and op[1].lower() == SCL_HEADER.lower():
            value = op[2]
    if value is None and trusted_headers:
        value = next(iter(view.field_values(SCL_HEADER)), None)
    try:
        scl = int(str(value).strip()) if value is not None else None
    except ValueError:
        return None
    return scl if scl is not None and -1 <= scl <= 9 else None


def _pool(reactor: Any, threads: int) -> Any:
    from twisted.python.threadpool import ThreadPool
    pool = ThreadPool(minthreads=0, maxthreads=threads, name="exmta-rules")
    if hasattr(reactor, "callWhenRunning"):
        reactor.callWhenRunning(pool.start)
        reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    else:  # a test clock: evaluate inline
        return None
    return pool


def transport_rules_for(config: Config, store: Any, tracker: Any, reactor: Any) -> TransportRules | None:
    """The process's TransportRules for ``store`` (built on first call), or None without a rules file."""
    tr = config.transport_rules
    if not tr.file:
        return None
    rules = _BUILT.get(store)
    if rules is None:
        from exmta.rules.plugins import discover
        plugins, _ = discover()  # problems were reported by check-config / config loading
        send_names = {s.name for s in config.send}
        rules = TransportRules(
            tr.file, reactor, reactor, _pool(reactor, tr.threads),
            internal_domain=lambda d: (a := config.accepted_domain(d)) is not None and a.kind != "external_relay",
            send_connector_known=lambda name: name in send_names, plugins=plugins,
            limits=Limits.from_mapping(dict(tr.limits)), reload_interval=tr.reload_interval,
            tracker=tracker, store=store, hostname=config.hostname, postmaster=config.postmaster,
            member_of=directory_groups(config))
        _BUILT[store] = rules
        if hasattr(reactor, "callWhenRunning"):  # a real reactor: re-read the file even when no mail flows
            def watch() -> None:
                loop = rules.watch()
                reactor.addSystemEventTrigger("before", "shutdown", lambda: loop.running and loop.stop())
            reactor.callWhenRunning(watch)
    return rules


def directory_groups(config: Config) -> Any:
    """``member_of`` from the [auth.NAME] LDAP back end that [transport_rules] directory names, or None."""
    name = config.transport_rules.directory
    backend = config.auth_backend(name) if name else None
    if backend is None:
        return None
    from exmta.auth.ldap import LDAPChecker, LDAPSettings
    from exmta.rules.directory import DirectoryGroups
    checker = LDAPChecker(LDAPSettings(
        uri=backend.uri, base_dn=backend.base_dn, tls=backend.tls, ca_file=backend.ca_file,
        bind_dn=backend.bind_dn, bind_password=backend.bind_password, timeout=backend.timeout,
    ), run_blocking=None)  # only its blocking helpers are used, on the rules' pool
    return DirectoryGroups(checker).member_of


def attach_to_factory(factory: Any, config: Config, store: Any, tracker: Any, reactor: Any) -> None:
    """Give a receive connector's factory the transport rules (nothing when there is no rules file)."""
    rules = transport_rules_for(config, store, tracker, reactor)
    if rules is not None:
        factory.transport_rules = ConnectorRules(rules, factory)
