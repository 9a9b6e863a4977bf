"""Wiring TLS into receive connectors, and reloading certificates without a restart.

:func:`configure_receive_tls` gives an :class:`~exmta.smtp.server.ESMTPServerFactory`
its :class:`~exmta.tls.context.ServerTLS` (STARTTLS, or implicit TLS) and its
:class:`~exmta.tls.verify.TLSGate`; it is called for every receive connector,
in the main process and in receive workers alike.

:class:`TLSReloadService` (main process) checks the certificate files of
every connector every ``reload_interval`` seconds on the injected clock and
at once on SIGHUP (the previous SIGHUP handler, if any, still runs).  Each
:class:`ServerTLS` also checks at handshakes once its interval has passed,
which is how receive workers pick up new files.
"""
from __future__ import annotations

import signal
from typing import Any, Iterable

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from exmta.config.schema import ReceiveConnectorConfig
from exmta.tls.context import ServerTLS
from exmta.tls.verify import TLSGate

__all__ = ["TLSReloadService", "configure_receive_tls"]

log = Logger()

#: seconds between checks for certificates about to expire
EXPIRY_CHECK = 3600.0


def configure_receive_tls(factory: Any, config: ReceiveConnectorConfig, clock: IReactorTime) -> ServerTLS | None:
    """Set ``tls_context_factory``, ``implicit_tls`` and ``tls_gate`` of ``factory`` from ``config``.

    Raises :class:`~exmta.tls.certs.CertificateError` when the certificates
    cannot be used (the service then does not start, with that message).
    """
    server_tls = ServerTLS(config.name, config.tls, clock) if config.tls is not None else None
    factory.tls_context_factory = server_tls
    factory.implicit_tls = bool(config.tls and config.tls.implicit)
    if server_tls is not None or config.require_tls:
        factory.tls_gate = TLSGate(config, server_tls)
    return server_tls


class TLSReloadService(Service):
    """Polls certificate mtimes on ``clock`` and reloads on SIGHUP; see the module docstring."""

    def __init__(self, servers: Iterable[ServerTLS], clock: IReactorTime, reactor: Any = None,
                 install_signal: bool = True) -> None:
        self.servers = list(servers)
        self.clock = clock
        self.reactor = reactor
        self.install_signal = install_signal
        intervals = [s.config.reload_interval for s in self.servers if s.config.reload_interval > 0]
        # at least hourly: certificates about to expire are reported even without file polling
        self.interval = min([*intervals, EXPIRY_CHECK]) if self.servers else 0.0
        self._warned: dict[str, float] = {}
        self._call: IDelayedCall | None = None
        self._previous: Any = None
        self._installed = False

    def check(self, force: bool = False) -> int:
        """Reload what changed (everything with ``force``); the number of connectors reloaded."""
        count = 0
        for server in self.servers:
            try:
                count += server.reload(force=force)
            except Exception:
                log.failure("TLS reload of receive.{connector} failed", connector=server.connector)
        return count

    def _tick(self) -> None:
        self._call = None
        for server in self.servers:
            try:
                server.maybe_reload()
            except Exception:
                log.failure("TLS reload of receive.{connector} failed", connector=server.connector)
        self.warn_expiring()
        self._schedule()

    def warn_expiring(self) -> list[str]:
        """Log (at most daily per certificate) the certificates in use that expire soon or have expired."""
        now = self.clock.seconds()
        said = []
        for server in self.servers:
            for text in server.expiring(now):
                if now - self._warned.get(text.split(" (", 1)[0], -1e18) < 86400:
                    continue
                self._warned[text.split(" (", 1)[0]] = now
                log.warn("TLS certificate of receive.{connector}: {what}; replace the file (it is reloaded "
                         "without a restart)", connector=server.connector, what=text)
                said.append(text)
        return said

    def _schedule(self) -> None:
        if self.running and self.interval > 0:
            self._call = self.clock.callLater(self.interval, self._tick)

    def _on_sighup(self, signum: int, frame: Any) -> None:
        log.info("SIGHUP: checking TLS certificate files")
        if self.reactor is not None:
            self.reactor.callFromThread(self.check, True)
        else:
            self.check(True)
        previous = self._previous
        if callable(previous):
            previous(signum, frame)

    def startService(self) -> None:
        super().startService()
        self.warn_expiring()
        self._schedule()
        if self.install_signal and self.servers and hasattr(signal, "SIGHUP"):
            try:
                self._previous = signal.signal(signal.SIGHUP, self._on_sighup)
                self._installed = True
            except ValueError:  # not the main thread
                log.warn("SIGHUP handler for TLS reload not installed (not in the main thread)")

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
