"""The TLS gate of a receive session: require_tls and partner client certificates.

:class:`TLSGate` is set as ``ESMTPServerFactory.tls_gate``; the server calls

* :meth:`TLSGate.handshake_done` once the handshake is over (first command
  over TLS): it checks the client certificate, records the result in
  ``session.tls`` (``peer_certificate_names``, ``peer_certificate_verified``,
  ``partner``) and logs it;
* :meth:`TLSGate.check_mail` at MAIL: ``530 5.7.0 Must issue a STARTTLS
  command first`` on a ``require_tls`` connector without TLS (clients in
  ``plaintext_networks`` excepted, RFC 3207 4), and Exchange's ``530 5.7.1
  Client was not authenticated`` when a partner connector
  (``client_certificate = "require"``) got no certificate, an untrusted one,
  or one whose subject CN / SAN DNS names match none of ``client_names``;
* :meth:`TLSGate.connection_lost`: a handshake that failed (garbage, no
  shared version or cipher) is logged as one line with the reason.

Names match exactly, or a configured ``*.example`` matches one more label.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from exmta.config.schema import ReceiveConnectorConfig
from exmta.interfaces import ITLSGate
from exmta.model import Reply
from exmta.tls.context import ServerTLS, ip_in, match_name
from exmta.tls.failures import describe_tls_failure, verify_errors

__all__ = ["MUST_STARTTLS", "TLSGate", "describe_tls_failure"]

log = Logger()

#: RFC 3207 4
MUST_STARTTLS = Reply.make(530, "5.7.0", "Must issue a STARTTLS command first")


def _not_authenticated(why: str) -> Reply:
    return Reply.make(530, "5.7.1", f"Client was not authenticated: {why}")


@implementer(ITLSGate)
class TLSGate:
    """Per-connector TLS requirements, checked by the SMTP session; see the module docstring."""

    def __init__(self, config: ReceiveConnectorConfig, server_tls: ServerTLS | None) -> None:
        self.connector = config.name
        self.require_tls = config.require_tls
        self.tls = config.tls
        self.server_tls = server_tls
        self.client_mode = config.tls.client_certificate if config.tls else "none"
        self.client_names = tuple(n.lower() for n in (config.tls.client_names if config.tls else ()))
        #: without client_names only a private client_ca makes a partner (never the public CAs)
        self.private_ca = bool(config.tls and config.tls.client_ca)

    # ------------------------------------------------------------ hooks

    def handshake_done(self, server: Any) -> None:
        """Check the client certificate once, record the result on ``session.tls``, log it."""
        session = server.session
        if session is None or session.tls is None or self.client_mode == "none":
            return
        conn = _handle(server.transport)
        cert = None
        try:
            cert = conn.get_peer_certificate() if conn is not None else None
        except Exception:
            cert = None
        names: tuple[str, ...] = ()
        verified = False
        partner = None
        problem = None
        if cert is None:
            problem = "no client certificate"
        else:
            from exmta.tls.certs import certificate_names

            names = certificate_names(cert.to_cryptography())
            error = verify_errors(conn)
            if error is not None:
                problem = f"certificate not trusted: {error}"
            else:
                verified = True
                partner = next((n for n in names for p in self.client_names if match_name(p, n)), None)
                if self.client_names and partner is None:
                    problem = (f"certificate names {', '.join(names) or '(none)'} match none of "
                               f"{', '.join(self.client_names)}")
                elif not self.client_names and self.private_ca:
                    partner = names[0] if names else None  # any certificate of the private CA
        session.tls = dataclasses.replace(
            session.tls, peer_certificate_names=names, peer_certificate_verified=verified,
            partner=partner if problem is None else None)
        server.tls_client_problem = problem
        if problem is None:
            log.info("session {session_id}: client certificate accepted for {peer_ip} on {connector}: {partner}",
                     session_id=session.session_id, peer_ip=session.peer_ip, connector=self.connector,
                     partner=partner)
        else:
            log.warn("session {session_id}: client certificate refused for {peer_ip} on {connector}: {problem}",
                     session_id=session.session_id, peer_ip=session.peer_ip, connector=self.connector,
                     problem=problem)

    def check_mail(self, server: Any) -> Reply | None:
        """The refusal for MAIL in this session, or None when TLS requirements are met."""
        session = server.session
        peer_ip = session.peer_ip if session is not None else None
        if not server.tls_active:
            if self.require_tls and not (self.server_tls is not None
                                         and ip_in(peer_ip, self.server_tls.plaintext_networks)):
                log.info("session {session_id}: MAIL before STARTTLS refused for {peer_ip} on {connector}",
                         session_id=session.session_id if session else "", peer_ip=peer_ip,
                         connector=self.connector)
                return MUST_STARTTLS
            if self.client_mode == "require":
                return MUST_STARTTLS
            return None
        if self.client_mode != "require":
            return None
        if session is None or session.tls is None:
            return _not_authenticated("TLS details unavailable")
        problem = getattr(server, "tls_client_problem", None)
        if problem is None and session.tls.partner is None:
            problem = "no client certificate"
        if problem is None:
            return None
        if problem == "no client certificate":
            return _not_authenticated("this connector requires a client certificate")
        return _not_authenticated(problem)

    def connection_lost(self, server: Any, reason: Failure | None) -> None:
        """Log a failed handshake (garbage, protocol or cipher mismatch) with its reason."""
        session = server.session
        why = describe_tls_failure(reason, _handle(server.transport))
        if why is None or session is None:  # no session: implicit TLS, logged by exmta.tls.context
            return
        log.info("session {session_id}: TLS with {peer_ip} on {connector} failed: {why}",
                 session_id=session.session_id, peer_ip=session.peer_ip, connector=self.connector, why=why)


def _handle(transport: Any) -> Any:
    get = getattr(transport, "getHandle", None)
    try:
        return get() if get is not None else None
    except Exception:
        return None
