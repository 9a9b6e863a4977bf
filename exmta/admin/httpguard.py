# -*- test-case-name: tests.admin.test_httpguard -*-
"""HTTP sites that refuse before they read: client networks, methods, body size, cross-site requests.

twisted.web reads a whole request body (into memory or a temporary file)
before any resource sees the request, so an authentication check in a
resource comes too late for a 600 MB POST. :class:`GuardedSite` checks

* the client's address against ``allowed_networks`` when the connection
  opens: a refused client gets a :class:`_Forbidden` protocol, which
  discards at most its request headers (so that closing does not reset the
  connection before the client reads why) and answers 403 (Unix socket
  clients pass);
* the method against ``methods`` (405) and the announced ``Content-Length``
  against ``max_body`` (413) once the headers are in, before the body;
* a chunked body as it arrives: 413 and close when it passes ``max_body``.

:func:`cross_site_refusal` is the CSRF check of the admin API's
state-changing requests: no form content types (a browser sends those from
any page without a preflight), no ``Origin`` other than the request's own
host, no ``Sec-Fetch-Site`` other than ``same-origin`` or ``none``.
"""
from __future__ import annotations

import io
import ipaddress
from collections.abc import Iterable
from typing import Any

from twisted.internet.address import UNIXAddress
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import http, server

from exmta.receive.ranges import ip_in

__all__ = ["ADMIN_MAX_BODY", "GuardedSite", "METRICS_METHODS", "SAFE_METHODS", "cross_site_refusal"]

log = Logger()

#: largest request body the admin API reads (its calls take their arguments in the URL)
ADMIN_MAX_BODY = 4096
#: the metrics listener serves scrapes and health checks only
METRICS_METHODS = frozenset({b"GET", b"HEAD"})
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})
#: the content types a cross-site HTML form or a no-preflight fetch can send
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")

_REASONS = {405: b"Method Not Allowed", 413: b"Content Too Large"}


class GuardedChannel(http.HTTPChannel):
    """An HTTPChannel that refuses a request by method or body size before reading the body."""

    max_body = ADMIN_MAX_BODY
    methods: frozenset[bytes] | None = None
    refused = False

    def allHeadersReceived(self) -> None:
        if self.methods is not None and self._command not in self.methods:
            self.refuse(405, "method not allowed here")
            return
        if self.length is not None and self.length > self.max_body:
            self.refuse(413, f"request body of {self.length} octets is over the limit of {self.max_body}")
            return
        super().allHeadersReceived()

    def body_seen(self, total: int) -> bool:
        """Called by the request for each chunk; False (and refused) once ``total`` is over the limit."""
        if total > self.max_body:
            self.refuse(413, f"chunked request body over the limit of {self.max_body} octets")
            return False
        return True

    def refuse(self, status: int, why: str) -> None:
        """Answer ``status`` and close; whatever else arrives on this connection is dropped."""
        if self.refused:
            return
        self.refused = True
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info("http: refused a request from {peer}: {status} {why}", peer=str(peer), status=status, why=why)
        for req in self.requests:
            content = getattr(req, "content", None)
            if content is not None:
                content.close()  # a chunked body's temporary file
            req.content = io.BytesIO()
        body = why.encode("utf-8", "replace") + b"\n"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, _REASONS.get(status, b"Refused"), len(body), body))
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        if not self.refused:
            super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if not self.refused:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if not self.refused:
            super().allContentReceived()


class _Forbidden(Protocol):
    """For a client outside ``allowed_networks``: read nothing but up to the end of the request
    headers (at most :attr:`limit` octets, for at most :attr:`timeout` seconds), answer 403, close."""

    limit = 16384
    timeout = 10.0
    def __init__(self, clock: Any, body: bytes, content_type: bytes) -> None:
        self.clock = clock
        self.answer = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                       b"Connection: close\r\n\r\n%s" % (content_type, len(body), body))
        self.seen = b""
        self.timer: Any = None

    def connectionMade(self) -> None:
        self.timer = self.clock.callLater(self.timeout, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        if self.seen is None:
            return
        self.seen += data
        if b"\r\n\r\n" in self.seen or b"\n\n" in self.seen or len(self.seen) >= self.limit:
            self.seen = None
            self.transport.write(self.answer)
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()


class GuardedRequest(server.Request):
    """Counts a body as it arrives and stops storing it once the channel refused it."""

    _body_seen = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._body_seen += len(data)
        check = getattr(self.channel, "body_seen", None)
        if check is not None and not check(self._body_seen):
            return
        super().handleContentChunk(data)


class GuardedSite(server.Site):
    """A Site whose connections are checked by address, and whose requests by method and body size."""

    protocol = GuardedChannel
    requestFactory = GuardedRequest

    def __init__(self, resource: Any, allowed_networks: Iterable[str] | None = None, *,
                 max_body: int = ADMIN_MAX_BODY, methods: Iterable[bytes] | None = None,
                 forbidden: tuple[bytes, bytes] = (b"your address may not use this HTTP listener\n",
                                                   b"text/plain; charset=utf-8"), **kw: Any) -> None:
        super().__init__(resource, **kw)
        self.forbidden = forbidden  # (body, content type) of the 403 for a client outside allowed_networks
        self.allowed = ([ipaddress.ip_network(n, strict=False) for n in allowed_networks]
                        if allowed_networks is not None else None)
        self.max_body = max_body
        self.methods = frozenset(methods) if methods is not None else None
        self.displayTracebacks = False
        self.refused_connections = 0

    def allowed_address(self, address: Any) -> bool:
        if self.allowed is None or isinstance(address, UNIXAddress):
            return True
        return ip_in(getattr(address, "host", ""), self.allowed)

    def buildProtocol(self, addr: Any) -> Any:
        if not self.allowed_address(addr):
            self.refused_connections += 1
            log.info("http: refused a connection from {host}, outside allowed_networks",
                     host=getattr(addr, "host", str(addr)))
            return _Forbidden(self.reactor, *self.forbidden)
        channel = super().buildProtocol(addr)
        channel.max_body = self.max_body
        channel.methods = self.methods
        return channel


def _header(request: Any, name: bytes) -> str | None:
    raw = request.getHeader(name)
    if raw is None:
        return None
    return raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)


def cross_site_refusal(request: Any) -> tuple[int, str] | None:
    """(status, why) when a state-changing request may come from another site's page, else None."""
    if request.method.upper() in SAFE_METHODS:
        return None
    ctype = (_header(request, b"content-type") or "").split(";", 1)[0].strip().lower()
    if ctype in FORM_TYPES:
        return 415, f"content type {ctype!r} is refused on {request.method.decode('ascii', 'replace')} requests"
    site = (_header(request, b"sec-fetch-site") or "").strip().lower()
    if site and site not in ("same-origin", "none"):
        return 403, f"cross-site request refused (Sec-Fetch-Site: {site})"
    origin = _header(request, b"origin")
    if origin is not None:
        host = (_header(request, b"host") or "").strip().lower()
        scheme, sep, rest = origin.strip().lower().partition("://")
        if not sep or scheme not in ("http", "https") or not host or rest.rstrip("/") != host:
            return 403, f"cross-site request refused (Origin: {origin[:100]})"
    return None
