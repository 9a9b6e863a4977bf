"""Client TLS for send connectors: validation levels and the certificate we present.

:class:`SendTLS` is the ``tls_context`` of :class:`exmta.send.smtp.SMTPSendConnector`:
a callable ``(hostname) -> IOpenSSLClientConnectionCreator``.  The levels
are Exchange's ``TlsAuthLevel``:

* ``encryption_only``: no verification (RFC 7435 opportunistic security);
* ``certificate``: the chain must verify against ``tls_ca_file`` or the
  system store (no name check);
* ``domain``: the chain and the name: ``tls_domain`` when set, else the
  host connected to, checked with service_identity (RFC 6125).

``tls_certificate``/``tls_key`` are presented when the server asks (Exchange
Online inbound connectors identify a tenant by it).  Every connection sends
SNI for a host name.  A verification failure is recorded on the connection
so that the client's error says why (:func:`exmta.tls.verify.describe_tls_failure`);
with ``tls = "mandatory"`` the message is deferred with that reason, never
sent in plaintext.  Changed certificate or CA files are picked up at the next
connection.
"""
from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from exmta.config.schema import SendConnectorConfig
from exmta.tls.certs import CertificateError, load_certificate, mtimes
from exmta.tls.context import MODERN_CIPHERS, record_verify_error

__all__ = ["SendTLS", "send_tls_context"]

log = Logger()

#: outbound: anything OpenSSL's default security level accepts, strongest first; mandatory TLS
#: connectors require TLS 1.2
_CLIENT_CIPHERS = MODERN_CIPHERS + ":ECDHE+AES:AES:!aNULL:!eNULL:!MD5:!RC4:!3DES"
_MAX_CACHED_NAMES = 256


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


@implementer(IOpenSSLClientConnectionCreator)
class _Creator:
    """One OpenSSL client connection per handshake: SNI, and verification that says why it failed."""

    def __init__(self, ctx: SSL.Context, hostname: str, verify: bool, check_name: str | None) -> None:
        self.ctx = ctx
        self.hostname = hostname
        self.verify = verify
        self.check_name = check_name

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self.ctx, None)
        if self.hostname and not _is_ip(self.hostname):
            try:
                conn.set_tlsext_host_name(self.hostname.encode("idna"))
            except UnicodeError:
                pass
        if self.verify:
            conn.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify_callback)
        return conn

    def _verify_callback(self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
                         ok: int) -> bool:
        try:
            if not ok:
                record_verify_error(conn, cert, errno, depth)
                return False
            if depth == 0 and self.check_name:
                from service_identity import VerificationError
                from service_identity.pyopenssl import verify_hostname, verify_ip_address

                try:
                    if _is_ip(self.check_name):
                        verify_ip_address(_CertOnly(cert), self.check_name)
                    else:
                        verify_hostname(_CertOnly(cert), self.check_name)
                except VerificationError:
                    from exmta.tls.certs import certificate_names

                    names = ", ".join(certificate_names(cert.to_cryptography())) or "none"
                    record_verify_error(conn, cert, 0, 0,
                                        f"certificate names ({names}) do not match {self.check_name}")
                    return False
            return True
        except Exception:  # never raise inside an OpenSSL callback
            log.failure("TLS certificate verification callback failed")
            return False


class _CertOnly:
    """What service_identity.pyopenssl needs from a connection: the peer certificate."""

    def __init__(self, cert: crypto.X509) -> None:
        self._cert = cert

    def get_peer_certificate(self) -> crypto.X509:
        return self._cert


class SendTLS:
    """``(hostname) -> connection creator`` for one send connector; see the module docstring."""

    def __init__(self, config: SendConnectorConfig) -> None:
        self.config = config
        self.level = config.tls_auth_level
        self._paths = tuple(p for p in (config.tls_certificate, config.tls_key, config.tls_ca_file) if p)
        self._signature = mtimes(self._paths)
        self._ctx = self._build()
        self._creators: OrderedDict[str, _Creator] = OrderedDict()

    def _build(self) -> SSL.Context:
        cfg = self.config
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        if cfg.tls == "mandatory":
            ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(_CLIENT_CIPHERS.encode())
        if cfg.tls_certificate:
            loaded = load_certificate(cfg.tls_certificate, cfg.tls_key)
            ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, loaded.leaf_pem))
            for pem in loaded.chain_pem:
                ctx.add_extra_chain_cert(crypto.load_certificate(crypto.FILETYPE_PEM, pem))
            ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, loaded.key_pem))
            ctx.check_privatekey()
        if self.level != "encryption_only":
            if cfg.tls_ca_file:
                ctx.load_verify_locations(cfg.tls_ca_file)
            else:
                ctx.set_default_verify_paths()
        return ctx

    def _maybe_reload(self) -> None:
        signature = mtimes(self._paths)
        if signature == self._signature:
            return
        self._signature = signature
        try:
            ctx = self._build()
        except (CertificateError, OSError, SSL.Error, crypto.Error) as e:
            log.error("TLS files of send.{connector} not reloaded, the old ones stay in use: {error}",
                      connector=self.config.name, error=str(e))
            return
        self._ctx = ctx
        self._creators.clear()
        log.info("TLS files of send.{connector} reloaded", connector=self.config.name)

    def __call__(self, hostname: str) -> _Creator:
        self._maybe_reload()
        creator = self._creators.get(hostname)
        if creator is None:
            check = (self.config.tls_domain or hostname) if self.level == "domain" else None
            creator = _Creator(self._ctx, hostname, verify=self.level != "encryption_only", check_name=check)
            self._creators[hostname] = creator
            while len(self._creators) > _MAX_CACHED_NAMES:
                self._creators.popitem(last=False)
        else:
            self._creators.move_to_end(hostname)
        return creator


def send_tls_context(config: SendConnectorConfig) -> SendTLS | None:
    """The ``tls_context`` for a send connector, or None when it never does TLS."""
    if config.tls == "none":
        return None
    return SendTLS(config)
