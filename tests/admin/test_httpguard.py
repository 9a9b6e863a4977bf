"""GuardedSite and the CSRF check without a network (StringTransport, DummyRequest)."""
from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import resource
from twisted.web.test.requesthelper import DummyRequest

from exmta.admin.httpguard import METRICS_METHODS, GuardedSite, cross_site_refusal


class Counter(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render(self, request: Any) -> bytes:
        self.bodies.append(request.content.read())
        return b"ok"


def connect(site: GuardedSite, host: str = "127.0.0.1") -> tuple[Any, StringTransport]:
    channel = site.buildProtocol(IPv4Address("TCP", host, 1234))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 1234))
    channel.makeConnection(transport)
    return channel, transport


def test_refused_at_connect_outside_allowed_networks() -> None:
    clock = Clock()
    leaf = Counter()
    site = GuardedSite(leaf, ["127.0.0.0/8"], reactor=clock)
    proto = site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 1))
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n")
    assert transport.value() == b""
    proto.dataReceived(b"\r\n" + b"x" * 100000)
    assert transport.value().startswith(b"HTTP/1.1 403 ") and transport.disconnecting and leaf.bodies == []
    silent = site.buildProtocol(IPv4Address("TCP", "192.0.2.8", 1))
    silent.makeConnection(StringTransport())
    clock.advance(10)
    assert silent.transport.disconnected  # a client that sends nothing is aborted after the timeout
    assert site.buildProtocol(IPv4Address("TCP", "127.0.0.2", 1)) is not None
    assert site.buildProtocol(UNIXAddress(b"/run/x.sock")) is not None
    assert site.refused_connections == 2


def test_announced_body_over_limit_refused_from_headers() -> None:
    leaf = Counter()
    channel, transport = connect(GuardedSite(leaf, None, max_body=4096))
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n\r\n" + b"x" * 1000)
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.disconnecting and leaf.bodies == []
    channel.dataReceived(b"x" * 100000)  # dropped, never stored
    assert leaf.bodies == []


def test_chunked_body_cut_off_at_limit() -> None:
    leaf = Counter()
    channel, transport = connect(GuardedSite(leaf, None, max_body=4096))
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):
        channel.dataReceived(b"800\r\n" + b"y" * 0x800 + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    channel.dataReceived(b"0\r\n\r\n")
    assert leaf.bodies == []
    assert all(r.content.closed is False and r.content.getvalue() == b"" for r in channel.requests)
    channel.connectionLost(None)


def test_small_body_and_methods() -> None:
    leaf = Counter()
    channel, transport = connect(GuardedSite(leaf, None, max_body=4096))
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert leaf.bodies == [b"abc"] and b" 200 " in transport.value()
    channel, transport = connect(GuardedSite(leaf, None, max_body=0, methods=METRICS_METHODS))
    channel.dataReceived(b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 405 ") and len(leaf.bodies) == 1


@pytest.mark.parametrize("method,headers,refused", [
    (b"GET", {b"origin": b"http://evil.example", b"sec-fetch-site": b"cross-site"}, None),
    (b"POST", {}, None),
    (b"POST", {b"content-type": b"application/json"}, None),
    (b"POST", {b"content-type": b"application/x-www-form-urlencoded; charset=utf-8"}, 415),
    (b"POST", {b"content-type": b"multipart/form-data; boundary=x"}, 415),
    (b"DELETE", {b"content-type": b"text/plain"}, 415),
    (b"POST", {b"origin": b"http://evil.example"}, 403),
    (b"POST", {b"origin": b"null"}, 403),
    (b"POST", {b"origin": b"http://127.0.0.1:8025"}, None),
    (b"POST", {b"sec-fetch-site": b"cross-site"}, 403),
    (b"POST", {b"sec-fetch-site": b"same-site"}, 403),
    (b"POST", {b"sec-fetch-site": b"same-origin"}, None),
    (b"POST", {b"sec-fetch-site": b"none"}, None),
])
def test_cross_site_refusal(method: bytes, headers: dict[bytes, bytes], refused: int | None) -> None:
    request = DummyRequest([b"api"])
    request.method = method
    request.requestHeaders.addRawHeader(b"host", b"127.0.0.1:8025")
    for k, v in headers.items():
        request.requestHeaders.addRawHeader(k, v)
    result = cross_site_refusal(request)
    assert (result[0] if result else None) == refused
