"""A listening service that binds early but accepts only once the server has started.

twistd calls ``privilegedStartService`` on every service before it drops
root, and Twisted's :class:`StreamServerEndpointService` listens *and*
starts accepting there. exmta must not take a session before the spool's
``recover()`` has run (a session's temp file would look like an orphan of
the last run, and an orphan of the last run like a live session's file:
issue 10 item 4). So this service binds and listens in
``privilegedStartService`` (port 25 needs root), stops reading the
listening socket at once (clients wait in the kernel's backlog, they are
not refused), and starts accepting in ``startService``, which the ordered
service tree (:class:`exmta.service.OrderedService`) calls after the store
has recovered.
"""
from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService

__all__ = ["GatedListenService"]


class GatedListenService(StreamServerEndpointService):
    """StreamServerEndpointService that accepts connections only from startService on."""

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._hold)

    def _hold(self, port: Any) -> Any:
        if port is not None and not self.running and hasattr(port, "stopReading"):
            port.stopReading()  # bound and listening; connections queue in the backlog
        return port

    def startService(self) -> None:
        super().startService()
        self._waitingForPort.addCallback(self._accept)

    def _accept(self, port: Any) -> Any:
        if port is not None and self.running and hasattr(port, "startReading"):
            port.startReading()
        return port
