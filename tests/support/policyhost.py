"""A local MTA-STS policy host: HTTPS on 127.0.0.1:<free port>, a certificate of the test CA.

It serves ``/.well-known/mta-sts.txt`` by the ``Host`` header from
``policies`` (host -> (status, content type, body)), which a test may change
while it runs; an unknown host gets 404.  It runs in the test's reactor.

    host = PolicyHost(pki, ["mta-sts.a.test", "mta-sts.b.test"])
    port = host.listen(reactor)
    host.policies["mta-sts.a.test"] = (200, "text/plain", POLICY)
"""
from __future__ import annotations

from typing import Any

from twisted.web import resource, server

from .tlscerts import TestPKI


class _Policy(resource.Resource):
    isLeaf = True

    def __init__(self, host: PolicyHost) -> None:
        super().__init__()
        self.host = host

    def render_GET(self, request: Any) -> bytes:
        name = (request.getRequestHostname() or b"").decode("ascii", "replace").lower()
        self.host.requests.append((name, request.path.decode("ascii", "replace")))
        entry = self.host.policies.get(name)
        if request.path != b"/.well-known/mta-sts.txt" or entry is None:
            request.setResponseCode(404)
            return b"not found"
        status, ctype, body = entry
        request.setResponseCode(status)
        request.setHeader(b"content-type", ctype.encode())
        return body.encode() if isinstance(body, str) else body


class PolicyHost:
    """See the module docstring."""

    def __init__(self, pki: TestPKI, names: list[str]) -> None:
        self.files = pki.server(*names, file="policy-host")
        self.policies: dict[str, tuple[int, str, str | bytes]] = {}
        self.requests: list[tuple[str, str]] = []
        self.port: Any = None
        self.port_number = 0  # kept after the first listen(): a restarted host comes back on it

    def listen(self, reactor: Any) -> int:
        from twisted.internet import ssl

        pem = self.files.cert.read_bytes() + self.files.key.read_bytes()
        cert = ssl.PrivateCertificate.loadPEM(pem)
        chain = [ssl.Certificate.loadPEM(p).original for p in _pems(self.files.cert.read_bytes())[1:]]
        ctx = ssl.CertificateOptions(privateKey=cert.privateKey.original, certificate=cert.original,
                                     extraCertChain=chain)
        self.port = reactor.listenSSL(self.port_number, server.Site(_Policy(self)), ctx, interface="127.0.0.1")
        self.port_number = int(self.port.getHost().port)
        return self.port_number

    def stop(self) -> Any:
        return self.port.stopListening() if self.port is not None else None


def _pems(data: bytes) -> list[bytes]:
    import re

    return re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", data, re.S)


def policy(mode: str, *mx: str, max_age: int = 86400) -> str:
    """A policy file as RFC 8461 3.2 writes it (CRLF lines)."""
    lines = ["version: STSv1", f"mode: {mode}"] + [f"mx: {m}" for m in mx] + [f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"
