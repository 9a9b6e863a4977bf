"""PROXY protocol (v1 and v2) in front of the receive listeners, and the listening service.

Behind a PROXY protocol (``haproxy:`` endpoints) the client address is only
known once the PROXY header has been read, so :class:`ProxyHeaderFactory`
holds the SMTP session back until then (Twisted's own wrapper starts it at
once, with the proxy's address); the connector is then chosen by
:mod:`exmta.receive.ranges` for the real client. :func:`listen_service`
listens on one endpoint string and puts the PROXY layer in front of
``haproxy:`` ones.
"""
from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory

from exmta.receive.gated import GatedListenService
from exmta.receive.ranges import ANY_RANGES, ConnectionCounter, ip_in, parse_ranges

__all__ = ["ProxyHeaderFactory", "listen_service", "wrap_proxy"]

log = Logger()


class _ProxyHeaderWrapper(HAProxyProtocolWrapper):
    """Twisted's PROXY wrapper, but the wrapped protocol starts only once the header is read.

    Only peers in the connectors' ``trusted_proxies`` may send a header (a client cannot claim a
    relay address); until it is complete the connection counts against the connection limits of
    the proxy's address, and it is closed after ``proxy_header_timeout`` (issue 11 item 9).
    """

    def makeConnection(self, transport: Any) -> None:
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._started = False
        self._closed = False
        self._timer: Any = None
        self._peer_ip = getattr(transport.getPeer(), "host", "") or ""
        self._pending: ConnectionCounter | None = None
        why = self.factory.admit(self._peer_ip)
        if why is not None:
            log.warn("connection from {peer_ip} closed before a PROXY header: {why}", peer_ip=self._peer_ip, why=why)
            self._closed = True
            transport.loseConnection()
            return
        self._pending = self.factory.pending
        self._pending.opened(self._peer_ip)
        self._timer = self.factory.clock().callLater(self.factory.header_timeout(), self._header_timeout)

    def _header_timeout(self) -> None:
        self._timer = None
        log.info("connection from {peer_ip} closed: no PROXY header within {timeout}s", peer_ip=self._peer_ip,
                 timeout=self.factory.header_timeout())
        self._header_done()
        self._closed = True
        self.transport.loseConnection()

    def _header_done(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._pending is not None:
            self._pending.closed(self._peer_ip)
            self._pending = None

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._closed:
            return
        parser = self._parser
        if parser is None:
            from twisted.protocols.haproxy._v1parser import V1Parser
            from twisted.protocols.haproxy._v2parser import V2Parser

            if len(data) >= 16 and data[:12] == V2Parser.PREFIX and ord(data[12:13]) & 0xF0 == 0x20:
                self._parser = parser = V2Parser()
            elif len(data) >= 8 and data[:5] == V1Parser.PROXYSTR:
                self._parser = parser = V1Parser()
            else:
                log.info("connection from {peer} closed: no PROXY header", peer=self.transport.getPeer())
                self.transport.loseConnection()
                return
        try:
            self._proxyInfo, remaining = parser.feed(data)
        except Exception:
            log.info("connection from {peer} closed: bad PROXY header", peer=self.transport.getPeer())
            self.transport.loseConnection()
            return
        if self._proxyInfo is None:
            return  # header incomplete
        self._header_done()
        self._started = True
        self.wrappedProtocol.makeConnection(self)
        if remaining:
            self.wrappedProtocol.dataReceived(remaining)

    def connectionLost(self, reason: Any) -> None:
        self._header_done()
        self.factory.unregisterProtocol(self)
        if self._started:
            self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None


class ProxyHeaderFactory(HAProxyWrappingFactory):
    """PROXY protocol v1/v2 in front of ``wrappedFactory``; the session starts after the header.

    Trusted proxies, the header timeout and the limits on connections waiting for their header
    come from the receive connectors of the wrapped DispatchingFactory (their loosest values).
    """

    protocol = _ProxyHeaderWrapper
    noisy = False

    def __init__(self, wrappedFactory: Any) -> None:
        super().__init__(wrappedFactory)
        self.pending = ConnectionCounter()

    def _configs(self) -> list[Any]:
        entries = getattr(self.wrappedFactory, "entries", ())
        for entry in entries:
            entry.refresh()
        return [entry._config for entry in entries if entry._config is not None]

    def clock(self) -> Any:
        clock = getattr(self.wrappedFactory, "clock", None)
        if clock is None:
            from twisted.internet import reactor as clock
        return clock

    def header_timeout(self) -> float:
        return max((getattr(rc, "proxy_header_timeout", 10.0) for rc in self._configs()), default=10.0)

    def admit(self, peer_ip: str) -> str | None:
        """Why a connection from ``peer_ip`` may not send a PROXY header now, or None."""
        configs = self._configs()
        trusted = [n for rc in configs for n in getattr(rc, "trusted_proxies", ANY_RANGES)]
        if configs and peer_ip and not ip_in(peer_ip, parse_ranges(trusted)):  # (a UNIX socket is local)
            return "not a trusted proxy (trusted_proxies)"
        per_ip = [rc.max_connections_per_ip for rc in configs]
        total = [rc.max_connections for rc in configs]
        self.pending.max_per_ip = 0 if not per_ip or 0 in per_ip else max(per_ip)
        self.pending.max_total = 0 if not total or 0 in total else max(total)
        return self.pending.refusal(peer_ip)


def wrap_proxy(factory: Any, haproxy: bool) -> Any:
    return ProxyHeaderFactory(factory) if haproxy else factory


def listen_service(endpoint: str, factory: Any, reactor: Any) -> Service:
    """A service listening on ``endpoint``; ``haproxy:`` endpoints get :class:`ProxyHeaderFactory`."""
    haproxy = endpoint.startswith("haproxy:")
    inner = endpoint[len("haproxy:"):] if haproxy else endpoint
    ep = endpoints.serverFromString(reactor, inner)
    service = GatedListenService(ep, wrap_proxy(factory, haproxy))  # accepts after recovery (exmta.receive.gated)
    service._raiseSynchronously = True  # a port in use stops twistd at start, as strports did
    return service
