"""Server-side TLS for receive connectors: contexts, SNI, legacy ranges, reload.

:class:`ServerTLS` is what :class:`exmta.smtp.server.ESMTPServerFactory`
gets as ``tls_context_factory``.  It provides Twisted's
``IOpenSSLServerConnectionCreator``, so each handshake (STARTTLS, or the
first byte on an implicit-TLS listener wrapped by :func:`listening_factory`)
asks it for a connection and it can choose per client:

* TLS 1.2 or newer with ECDHE and AEAD ciphers only (TLS 1.3 suites are
  OpenSSL's defaults); clients in ``legacy_networks`` get a second context
  that also allows TLS 1.0/1.1 (old scanners and printers), nobody else;
* the certificate: the connector's default one, or an ``sni`` one whose
  names match the server name the client sent;
* partner connectors ask for a client certificate; a bad chain does not
  break the handshake, it is recorded (:func:`verify_errors`) so that the
  session can refuse with a clear SMTP reply (see :mod:`exmta.tls.verify`).

Certificate files are re-read when their mtime changes (checked every
``reload_interval`` seconds on the injected clock, and on SIGHUP through
:mod:`exmta.tls.reload`); a new file that fails the checks of
:mod:`exmta.tls.certs` is logged and the old certificate stays in use.
Sessions already running keep the context they started with.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from zope.interface import implementer

from exmta.config.schema import ReceiveTLSConfig, TLSCertificateConfig
from exmta.receive.ranges import ip_in
from exmta.tls.certs import CertificateError, LoadedCertificate, load_certificate, mtimes
from exmta.tls.failures import describe_tls_failure, record_verify_error, verify_errors

__all__ = [
    "LEGACY_CIPHERS", "MODERN_CIPHERS", "ImplicitTLSFactory", "ServerTLS", "listening_factory",
    "match_name", "record_verify_error", "verify_errors",
]

log = Logger()

#: TLS 1.2 suites: forward secrecy and AEAD only (Mozilla "intermediate" without DHE)
MODERN_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"
#: for legacy_networks only: CBC suites as well, and OpenSSL security level 0 (SHA-1 signatures
#: in TLS 1.0/1.1 handshakes); never RC4, 3DES or export suites
LEGACY_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:AES:!aNULL:!eNULL:!MD5:!RC4:!3DES:!DSS:@SECLEVEL=0"

_VERSIONS = {"1.0": SSL.TLS1_VERSION, "1.1": SSL.TLS1_1_VERSION, "1.2": SSL.TLS1_2_VERSION,
             "1.3": SSL.TLS1_3_VERSION}
#: seconds an implicit-TLS client has to finish its handshake (at most; see ImplicitTLSFactory)
HANDSHAKE_TIMEOUT = 60.0
#: warn this long before a certificate in use expires
EXPIRY_WARNING = 14 * 86400.0
_OPTIONS = (SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
            | SSL.OP_SINGLE_ECDH_USE)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

def _record_verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    """Accept the handshake whatever the chain; remember the first error for the SMTP gate."""
    if not ok:
        record_verify_error(conn, cert, errno, depth)
    return True


def match_name(pattern: str, name: str) -> bool:
    """``name`` matches ``pattern`` ("host.example", or "*.example" for one more label); no case."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):
        head, sep, rest = name.partition(".")
        return bool(sep) and bool(head) and rest == pattern[2:]
    return pattern == name


def _parse_networks(networks: Sequence[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in networks)


@dataclass
class _ContextSet:
    """The contexts of one flavour (modern or legacy): the default one and the SNI ones."""

    default: SSL.Context
    by_name: list[tuple[tuple[str, ...], SSL.Context]]

    def for_name(self, name: str) -> SSL.Context | None:
        for patterns, ctx in self.by_name:
            if any(match_name(p, name) for p in patterns):
                return ctx
        return None


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The TLS side of one receive connector; see the module docstring.

    Raises :class:`~exmta.tls.certs.CertificateError` when the certificates
    cannot be used at construction; later reloads only log.
    """

    def __init__(self, connector: str, config: ReceiveTLSConfig, clock: IReactorTime,
                 load: Callable[..., LoadedCertificate] = load_certificate) -> None:
        self.connector = connector
        self.config = config
        self.clock = clock
        self._load = load
        self.legacy_networks = _parse_networks(config.legacy_networks)
        self.plaintext_networks = _parse_networks(config.plaintext_networks)
        self.session_id = f"exmta-{connector}".encode()[:32]
        self.reloads = 0
        self.reload_failures = 0
        self._modern: _ContextSet
        self._legacy: _ContextSet | None
        self.certificates: list[LoadedCertificate] = []
        self._signature = mtimes(self.paths)
        self._build()
        self._last_check = clock.seconds()

    # ------------------------------------------------------------ files

    @property
    def paths(self) -> tuple[str, ...]:
        out: list[str] = []
        for c in (self.config.certificate, *self.config.sni):
            out += [p for p in (c.cert, c.key, c.chain) if p]
        if self.config.client_ca:
            out.append(self.config.client_ca)
        return tuple(dict.fromkeys(out))

    def _build(self) -> None:
        """Read every certificate and build both context sets, or raise CertificateError."""
        entries: list[tuple[TLSCertificateConfig, LoadedCertificate]] = []
        for c in (self.config.certificate, *self.config.sni):
            entries.append((c, self._load(c.cert, c.key, c.chain)))
        try:
            modern = self._context_set(entries, legacy=False)
            legacy = self._context_set(entries, legacy=True) if self.legacy_networks else None
        except CertificateError:
            raise
        except (OSError, ValueError, SSL.Error, crypto.Error) as e:
            raise CertificateError(f"receive.{self.connector}.tls: cannot build the TLS context: {e}") from None
        self._modern, self._legacy = modern, legacy
        self.certificates = [loaded for _, loaded in entries]

    def _context_set(self, entries: list[tuple[TLSCertificateConfig, LoadedCertificate]],
                     legacy: bool) -> _ContextSet:
        contexts = [(c, self._context(loaded, legacy)) for c, loaded in entries]
        default = contexts[0][1]
        by_name = [(c.names or loaded.names, ctx)
                   for (c, ctx), (_, loaded) in zip(contexts[1:], entries[1:])]
        ctx_set = _ContextSet(default, by_name)
        if by_name:
            def on_servername(conn: SSL.Connection) -> None:
                name = conn.get_servername()
                if not name:
                    return
                chosen = ctx_set.for_name(name.decode("ascii", "replace"))
                if chosen is not None:
                    conn.set_context(chosen)

            default.set_tlsext_servername_callback(on_servername)
        return ctx_set

    def _context(self, loaded: LoadedCertificate, legacy: bool) -> SSL.Context:
        cfg = self.config
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_options(_OPTIONS)
        if legacy:
            ctx.set_min_proto_version(SSL.TLS1_VERSION)
            ctx.set_cipher_list(LEGACY_CIPHERS.encode())
        else:
            ctx.set_min_proto_version(_VERSIONS[cfg.min_version])
            ctx.set_cipher_list((cfg.ciphers or MODERN_CIPHERS).encode())
        ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, loaded.leaf_pem))
        for pem in loaded.chain_pem:
            ctx.add_extra_chain_cert(crypto.load_certificate(crypto.FILETYPE_PEM, pem))
        ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, loaded.key_pem))
        ctx.check_privatekey()
        ctx.set_session_id(self.session_id)
        if cfg.client_certificate != "none":
            ctx.set_verify(SSL.VERIFY_PEER, _record_verify)
            if cfg.client_ca:
                ctx.load_verify_locations(cfg.client_ca)
                ctx.load_client_ca(cfg.client_ca.encode())  # the CA names sent in CertificateRequest
            else:
                ctx.set_default_verify_paths()
        return ctx

    # ------------------------------------------------------------ reload

    def reload(self, force: bool = False) -> bool:
        """Re-read the files if they changed (or ``force``); True when new contexts are in use."""
        self._last_check = self.clock.seconds()
        signature = mtimes(self.paths)
        if signature == self._signature and not force:
            return False
        self._signature = signature
        try:
            self._build()
        except CertificateError as e:
            self.reload_failures += 1
            log.error("TLS certificates of receive.{connector} not reloaded, the old ones stay in use: {error}",
                      connector=self.connector, error=str(e))
            return False
        self.reloads += 1
        log.info("TLS certificates of receive.{connector} reloaded: {subjects}", connector=self.connector,
                 subjects="; ".join(f"{c.subject} (until {c.not_after:%Y-%m-%d})" for c in self.certificates))
        return True

    def expiring(self, now: float, within: float = EXPIRY_WARNING) -> list[str]:
        """A sentence per certificate in use that expires within ``within`` seconds of ``now`` (or has)."""
        out = []
        for c in self.certificates:
            left = c.not_after.timestamp() - now
            if left <= 0:
                out.append(f"{c.subject} ({', '.join(c.paths)}) expired on {c.not_after:%Y-%m-%d %H:%M} UTC")
            elif left <= within:
                out.append(f"{c.subject} ({', '.join(c.paths)}) expires in {left / 86400:.1f} day(s), "
                           f"on {c.not_after:%Y-%m-%d %H:%M} UTC")
        return out

    def maybe_reload(self) -> None:
        """Reload when ``reload_interval`` has passed since the last check (checked per handshake too)."""
        interval = self.config.reload_interval
        if interval > 0 and self.clock.seconds() - self._last_check >= interval:
            self.reload()

    # ------------------------------------------------------------ IOpenSSLServerConnectionCreator

    def context_for(self, peer_ip: str | None) -> SSL.Context:
        """The default context a client at ``peer_ip`` starts with (legacy or modern)."""
        if self._legacy is not None and ip_in(peer_ip, self.legacy_networks):
            return self._legacy.default
        return self._modern.default

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        try:
            self.maybe_reload()
        except Exception:  # a reload must never break a handshake
            log.failure("TLS reload check of receive.{connector} failed", connector=self.connector)
        return SSL.Connection(self.context_for(_peer_ip(tlsProtocol)), None)


def _peer_ip(tls_protocol: Any) -> str | None:
    """The client address: from the SMTP session (STARTTLS) or the accepted socket (implicit TLS)."""
    session = getattr(getattr(tls_protocol, "wrappedProtocol", None), "session", None)
    if session is not None and getattr(session, "peer_ip", None):
        return session.peer_ip
    addr = getattr(tls_protocol, "exmta_peer", None)
    return getattr(addr, "host", None)


class ImplicitTLSProtocol(BufferingTLSTransport):
    """Starts the SMTP session only once the handshake is done.

    The greeting written before the handshake would be buffered by the TLS
    layer, which pauses its producer (the session), which stops reading,
    so the handshake could never finish; and nothing of SMTP should happen
    before TLS anyway.  A failed handshake is logged here with its reason;
    one that does not finish within the factory's ``handshake_timeout`` is
    aborted (a client that connects and sends nothing holds no slot).
    """

    exmta_peer: Any = None

    def __init__(self, factory: ImplicitTLSFactory, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol, _connectWrapped=False)
        self._session_started = False
        self._handshake_timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        try:  # the client's address as the layers below see it (PROXY protocol included)
            self.exmta_peer = transport.getPeer() or self.exmta_peer
        except Exception:
            pass
        clock = self.factory._clock
        self._handshake_timer = clock.callLater(self.factory.handshake_timeout, self._handshake_expired)
        super().makeConnection(transport)

    def _cancel_handshake_timer(self) -> None:
        timer, self._handshake_timer = self._handshake_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if not self._session_started and self.transport is not None:
            log.info("implicit TLS with {peer_ip}: no handshake within {timeout:g}s, closing",
                     peer_ip=getattr(self.exmta_peer, "host", "?"), timeout=self.factory.handshake_timeout)
            self.transport.abortConnection()

    def _checkHandshakeStatus(self) -> None:
        super()._checkHandshakeStatus()
        if self._handshakeDone and not self._session_started and not self._lostTLSConnection:
            self._session_started = True
            self._cancel_handshake_timer()
            ProtocolWrapper.makeConnection(self, self.transport)

    def connectionLost(self, reason: Any = None) -> None:
        self._cancel_handshake_timer()
        if not self._session_started:
            log.info("implicit TLS with {peer_ip} failed before the session started: {why}",
                     peer_ip=getattr(self.exmta_peer, "host", "?"),
                     why=describe_tls_failure(reason) or "connection closed")
            self._session_started = True  # so the session sees connectionLost without a session
        super().connectionLost(reason)


class ImplicitTLSFactory(TLSMemoryBIOFactory):
    """TLS from the first byte (port 465) in front of an SMTP server factory."""

    protocol = ImplicitTLSProtocol

    def __init__(self, creator: ServerTLS, wrapped: Any, clock: IReactorTime | None = None,
                 handshake_timeout: float | None = None) -> None:
        super().__init__(creator, False, wrapped, clock=clock)
        if handshake_timeout is None:  # the connector's command timeout, at most a minute
            handshake_timeout = min(HANDSHAKE_TIMEOUT, getattr(getattr(wrapped, "config", None),
                                                               "command_timeout", HANDSHAKE_TIMEOUT))
        self.handshake_timeout = handshake_timeout

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            protocol.exmta_peer = addr  # known before the TLS connection is made (legacy ranges)
        return protocol


def listening_factory(factory: Any, clock: IReactorTime | None = None) -> Any:
    """The factory to listen with: wrapped for implicit TLS when the connector asks for it."""
    if getattr(factory, "implicit_tls", False) and factory.tls_context_factory is not None:
        return ImplicitTLSFactory(factory.tls_context_factory, factory, clock=clock)
    return factory
