"""Wiring of operations into the running server: admin API listener, protocol logs, log upkeep.

:func:`add_operations` is called once by :func:`exmta.service.build_service`
after everything else is built. The admin API is an :class:`AdminService`
(started last, stopped first). A listen endpoint that cannot be bound is
logged as an error and the mail server runs on: mail flow matters more than
the admin API, and `exmta queue` then says it cannot reach the server.
"""
from __future__ import annotations

import json
import os
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, endpoints
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from exmta.admin.api import QueueOperations, TokenGuard, make_admin_root
from exmta.admin.httpguard import ADMIN_MAX_BODY, GuardedSite
from exmta.admin.config import rotation_kwargs
from exmta.admin.token import ensure_token, token_path
from exmta.interfaces import IProtocolLog
from exmta.observe.protocol import ProtocolLogs
from exmta.seams import require

__all__ = ["AdminService", "add_operations", "attach_protocol_logs"]

log = Logger()

LOG_CHECK_INTERVAL = 60.0  # seconds between age-rotation checks of idle logs


def _unix_private(endpoint: str) -> str:
    """A unix endpoint without ``mode=`` gets 0600: only the server's user may connect."""
    if endpoint.startswith("unix:") and ":mode=" not in endpoint:
        return endpoint + ":mode=600"
    return endpoint


class AdminService(Service):
    """Listens with the admin web tree on every [admin] listen endpoint."""

    def __init__(self, reactor: Any, listen: tuple[str, ...], site: Any, token_file: str) -> None:
        self.reactor = reactor
        self.listen = listen
        self.site = site
        self.token_file = token_file
        self.token = ""
        self.ports: list[Any] = []

    def startService(self) -> defer.Deferred[None]:
        super().startService()
        try:
            self.token = ensure_token(self.token_file)
        except (OSError, ValueError) as e:
            log.error("exmta: the admin API is off: its token file {path} cannot be used ({error}); fix or "
                      "remove the file and restart", path=self.token_file, error=str(e))
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(self._listen())

    async def _listen(self) -> None:
        for ep in self.listen:
            try:
                port = await endpoints.serverFromString(self.reactor, _unix_private(ep)).listen(self.site)
            except Exception as e:
                log.error("exmta: the admin API cannot listen on {endpoint}: {error}; `exmta queue` will not "
                          "work until [admin] listen is fixed", endpoint=ep, error=str(e))
                continue
            self.ports.append(port)
            log.info("exmta: admin API on {endpoint}", endpoint=ep)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        ports, self.ports = self.ports, []
        return defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in ports])


class LogUpkeep(Service):
    """Closes the protocol logs at stop; a timer rotates idle logs by age and applies retention."""

    def __init__(self, logs: list[Any]) -> None:
        self.logs = logs

    def check(self) -> None:
        for rotating in self.logs:
            if rotating.max_age and rotating.written and rotating._due(0):
                rotating.rotate()

    def stopService(self) -> None:
        super().stopService()
        for rotating in self.logs:
            rotating.close()


def attach_protocol_logs(config: Any, paths: dict[str, str], clock: Any, factories: Any,
                         rotate: bool = True) -> ProtocolLogs:
    """Give each receive connector's factory its protocol log (None when off).

    Receive worker processes pass ``rotate=False``: they append to the same
    files and follow the main process's rotations.
    """
    protocol_dir = (os.path.abspath(config.logs.protocol_dir) if config.logs.protocol_dir
                    else os.path.join(paths["data"], "log", "protocol"))
    rotation = rotation_kwargs(config.logs) if rotate else {"max_size": 0, "max_age": 0, "keep_age": 0,
                                                              "keep_size": 0}
    plogs = ProtocolLogs(protocol_dir, clock, **rotation)
    for rc, factory in zip(config.receive, factories):
        factory.protocol_log = plogs.get("receive", rc.name, rc.protocol_log)
        if factory.protocol_log is not None:
            require(IProtocolLog, factory.protocol_log, f"receive.{rc.name}: the protocol log")
    return plogs


def add_operations(top: MultiService, config: Any, reactor: Any, paths: dict[str, str], *, store: Any,
                   scheduler: Any, tracker: Any, pool: Any, connectors: dict[str, Any],
                   factories: list[Any], tracking_log: Any = None) -> Any:
    """Protocol logs on the connectors, log upkeep and the admin API; returns the admin root (or None).

    ``tracker`` is what events go to (maybe a fan-out); ``tracking_log`` the
    TrackingLog itself, whose age rotation the upkeep timer checks.
    """
    from exmta.config.schema import SendConnectorConfig, SmartHost
    from exmta.send import build_wire_connector

    plogs = attach_protocol_logs(config, paths, reactor, factories)
    for sc in config.send:
        if sc.name in connectors and hasattr(connectors[sc.name], "protocol_log"):
            connectors[sc.name].protocol_log = plogs.get("send", sc.name, sc.protocol_log)
    rotating = [pl.file for pl in plogs.logs.values()]
    if tracking_log is not None and hasattr(tracking_log, "file"):
        rotating.append(tracking_log.file)
    upkeep = LogUpkeep(rotating)
    upkeep.setName("log-upkeep")
    upkeep.setServiceParent(top)
    timer = TimerService(LOG_CHECK_INTERVAL, upkeep.check)
    timer.clock = reactor
    timer.setName("log-rotation")
    timer.setServiceParent(top)

    if not config.admin.enabled:
        return None

    def redirect_connector(host: str, port: int) -> Any:
        name = "redirect"
        while name in {s.name for s in config.send}:
            name += "_"  # never replaces a configured send connector
        sc = SendConnectorConfig(name=name, kind="smtp", smarthosts=(SmartHost(host, port),),
                                 tls="opportunistic")
        connector = build_wire_connector(sc, reactor, reactor, None, config.hostname)
        connectors[name] = connector  # closed (QUIT) with the other send connectors at stop
        return connector

    ops = QueueOperations(
        scheduler, store, reactor, tracker=tracker, make_redirect_connector=redirect_connector,
        run_blocking=lambda f, *a: deferToThreadPool(reactor, pool, f, *a),
        connectors=[sc.name for sc in config.send],
    )
    ops.quarantine_expiry = config.admin.quarantine_expiry  # type: ignore[attr-defined]
    from exmta.admin.quarantine import add_expiry_timer

    add_expiry_timer(top, ops, config.admin.quarantine_expiry, reactor)  # quarantined mail past its expiry
    path = token_path(config.data_dir, config.admin.token_file)
    service: AdminService | None = None
    root = make_admin_root(ops, lambda: service.token if service is not None else "",
                           config.admin.allowed_networks)
    observe = getattr(top, "observability", None)
    if observe is not None and hasattr(observe, "admin_children"):
        for name, child in observe.admin_children().items():
            root.putChild(name, TokenGuard(child, root.token, basic=name == b"status"))  # read-only page
    refusal = json.dumps({"error": "your address may not use the admin API",
                          "hint": "connect from an address in [admin] allowed_networks (loopback by default)"})
    site = GuardedSite(root, config.admin.allowed_networks, max_body=ADMIN_MAX_BODY,
                       forbidden=(refusal.encode() + b"\n", b"application/json; charset=utf-8"))
    service = AdminService(reactor, config.admin.listen, site, path)
    service.setName("admin")
    service.setServiceParent(top)
    return root
