"""SMTP AUTH in the ESMTP server: the AUTH command and exchange, and send-as at MAIL and end of data.

The server (:mod:`exmta.smtp.server`) holds one :class:`Authenticator` per
receive connector (``factory.authenticator``) and calls it for the AUTH
command, for each line of an exchange in progress (``proto._sasl``), for the
EHLO keyword, at MAIL and at end of data. Rules:

- AUTH is offered and accepted only over TLS, or from the connector's
  ``auth_before_tls_networks``; otherwise it is not advertised and gets
  ``538 5.7.11``.
- Refusals: ``*`` cancels (501 5.7.0); bad base64 or a malformed PLAIN
  response is 501 5.5.2; AUTH twice or inside a transaction is 503 5.5.1;
  an unknown mechanism 504 5.5.4. Success is 235 2.7.0; a failed login waits
  ``auth_tarpit`` seconds on the injected clock, then gets 535 5.7.8.
- Past the lockout thresholds a source gets 421 4.7.0 and is disconnected;
  a locked user gets 454 4.7.0 without the password being checked.
- Every failure is logged with the source address, the mechanism and the
  user name; credentials and the base64 lines never are.
- An authenticated session may use only the envelope senders and From:
  addresses its avatar's grants allow (550 5.7.60), unless the connector
  has ``accept_any_sender``.
"""
from __future__ import annotations

import base64
import ipaddress
import os
from typing import Any, Callable, Sequence

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from exmta.auth.avatar import ISubmitter, Submitter, TemporaryAuthFailure
from exmta.auth.lockout import LockoutSettings, LoginThrottle
from exmta.auth.sasl import MECHANISMS, Credentials, SASLError
from exmta.auth.sendas import SEND_AS_DENIED, from_addresses
from exmta.interfaces import IAuthenticator
from exmta.model import Address, MailParams, Reply
from exmta.receive.ranges import ip_in

__all__ = ["Authenticator", "build_authenticator", "REPLIES"]

log = Logger()

R = Reply.make
REPLIES = {
    "success": R(235, "2.7.0", "Authentication successful"),
    "failed": R(535, "5.7.8", "Error: authentication failed"),
    "need_tls": R(538, "5.7.11", "Encryption required for requested authentication mechanism"),
    "twice": R(503, "5.5.1", "Error: already authenticated"),
    "in_transaction": R(503, "5.5.1", "Error: AUTH not allowed during a mail transaction"),
    "need_helo": R(503, "5.5.1", "Error: send EHLO first"),
    "syntax": R(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"),
    "mechanism": R(504, "5.5.4", "Error: unrecognized authentication type"),
    "temporary": R(454, "4.7.0", "Temporary authentication failure, try again later"),
    "user_locked": R(454, "4.7.0", "Error: too many failed logins for this user, try again later"),
    "source_locked": R(421, "4.7.0", "Error: too many failed logins from your address, try again later"),
}


class _Challenge(Reply):
    """``334 <base64>``: written with its space even when the challenge is empty (RFC 4954 4)."""

    def to_bytes(self) -> bytes:
        return f"334 {self.lines[0]}\r\n".encode("ascii")


def _challenge(data: bytes) -> Reply:
    return _Challenge(334, None, (base64.b64encode(data).decode("ascii"),))


def _loggable(name: str) -> str:
    """A user name as it may appear in a log line: printable, bounded."""
    return "".join(c if c.isprintable() else "?" for c in name[:128])


@implementer(IAuthenticator)
class Authenticator:
    """SMTP AUTH for one receive connector: a twisted.cred Portal plus throttle and send-as policy."""

    def __init__(
        self,
        portal: Portal,
        clock: IReactorTime,
        mechanisms: Sequence[str] = ("PLAIN", "LOGIN"),
        lockout: LockoutSettings | None = None,
        before_tls_networks: Sequence[str] = (),
        accept_any_sender: bool = False,
        throttle: Any = None,
        max_concurrent_checks: int = 4,
        run_blocking: Callable[..., Deferred] | None = None,
    ) -> None:
        """``throttle``: a LoginThrottle (memory, this connector) or a lockstore.SharedThrottle (the node),
        whose blocking methods run through ``run_blocking``."""
        unknown = [m for m in mechanisms if m.upper() not in MECHANISMS]
        if unknown:
            raise ValueError(f"unsupported SASL mechanism(s): {', '.join(unknown)}")
        self.portal = portal
        self.clock = clock
        self.mechanisms = tuple(m.upper() for m in mechanisms)
        self.lockout = lockout or LockoutSettings()
        self.throttle = throttle or LoginThrottle(clock, self.lockout)
        self.before_tls_networks = tuple(ipaddress.ip_network(n, strict=False) for n in before_tls_networks)
        self.accept_any_sender = accept_any_sender
        #: password checks running at once (argon2 takes 64 MiB and tens of ms each; a flood of AUTH
        #: attempts from many connections queues here instead of exhausting memory and the thread pool)
        self.checks = DeferredSemaphore(max_concurrent_checks)
        self.run_blocking = run_blocking

    async def _throttle(self, method: str, *args: Any) -> Any:
        """Call a throttle method; a shared (file-backed) throttle runs on the pool."""
        fn = getattr(self.throttle, method)
        if getattr(self.throttle, "blocking", False) and self.run_blocking is not None:
            return await self.run_blocking(fn, *args)
        return fn(*args)

    # ------------------------------------------------------------ when AUTH is possible

    @staticmethod
    def secure(proto: Any) -> bool:
        """Whether the session is protected by TLS (STARTTLS, or an implicit-TLS listener)."""
        return bool(proto.tls_active) or ISSLTransport.providedBy(proto.transport)

    def allowed(self, proto: Any) -> bool:
        if self.secure(proto):
            return True
        return proto.session is not None and ip_in(proto.session.peer_ip, self.before_tls_networks)

    def ehlo_keywords(self, proto: Any) -> list[str]:
        if not self.mechanisms or not self.allowed(proto):
            return []
        return ["AUTH " + " ".join(self.mechanisms)]

    # ------------------------------------------------------------ the exchange

    async def command(self, proto: Any, argument: str) -> None:
        """``AUTH mechanism [initial-response]``."""
        session = proto.session
        if session is None or session.helo_name is None or not session.esmtp:
            proto._error(REPLIES["need_helo"])  # AUTH is an ESMTP extension (RFC 4954): EHLO first
            return
        if session.auth_identity is not None:
            proto._error(REPLIES["twice"])
            return
        if proto.txn is not None:
            proto._error(REPLIES["in_transaction"])
            return
        if not self.allowed(proto):
            log.info("session {session_id}: AUTH refused without TLS from {peer_ip}",
                     session_id=session.session_id, peer_ip=session.peer_ip)
            proto._error(REPLIES["need_tls"])
            return
        parts = argument.split()
        if not parts or len(parts) > 2:
            proto._error(REPLIES["syntax"])
            return
        name = parts[0].upper()
        if name not in self.mechanisms:
            proto._error(REPLIES["mechanism"])
            return
        if await self._throttle("source_locked", session.peer_ip):
            log.warn("session {session_id}: AUTH from locked-out source {peer_ip} refused",
                     session_id=session.session_id, peer_ip=session.peer_ip)
            proto._close(REPLIES["source_locked"])
            return
        mechanism = MECHANISMS[name]()
        initial = parts[1].encode("ascii", "replace") if len(parts) == 2 else None
        await self._step(proto, mechanism, lambda: mechanism.start(initial))

    async def response(self, proto: Any, line: bytes) -> None:
        """One client line inside an exchange (never logged: it carries credentials)."""
        mechanism, proto._sasl = proto._sasl, None
        if mechanism is None:
            return
        await self._step(proto, mechanism, lambda: mechanism.respond(line))

    async def _step(self, proto: Any, mechanism: Any, step: Callable[[], bytes | Credentials]) -> None:
        try:
            result = step()
        except SASLError as e:
            proto._sasl = None
            if e.reply.status == "5.7.0":
                log.info("session {session_id}: AUTH {mechanism} cancelled by {peer_ip}",
                         session_id=proto.session.session_id, mechanism=mechanism.name,
                         peer_ip=proto.session.peer_ip)
            proto._error(e.reply)
            return
        if isinstance(result, bytes):
            proto._sasl = mechanism
            proto._reply(_challenge(result))
            return
        await self._verify(proto, mechanism.name, result)

    async def _verify(self, proto: Any, mechanism: str, creds: Credentials) -> None:
        session = proto.session
        user = creds.username
        fields = dict(session_id=session.session_id, peer_ip=session.peer_ip, mechanism=mechanism,
                      user=_loggable(user), connector=session.connector)
        if user != user.strip() or not user.isprintable():
            # " alice" or "alice " would be a name with its own lockout count (issue 11 item 11): refused
            # without a check, counted for the source and for the name without the white space
            await self._failed(proto, fields, "user name with surrounding white space or control characters",
                               user.strip() or None, None)
            return
        if await self._throttle("user_locked", user):
            await self._locked(proto, fields)
            return
        avatar: Submitter | None = None
        why = ""
        identity: str | None = None
        try:
            if creds.authzid and creds.authzid.casefold() != user.casefold():
                raise UnauthorizedLogin("authorization identity differs (proxy authorization is not supported)")
            if not user or not creds.password:
                raise UnauthorizedLogin("empty user name or password")
            _, avatar, _ = await self.checks.run(
                self.portal.login,
                UsernamePassword(user.encode("utf-8"), creds.password.encode("utf-8")), None, ISubmitter)
        except UnauthorizedLogin as e:
            why = str(e) or "unauthorized"
            identity = getattr(e, "identity", None)  # a known user: the lock is shared by its name variants
        except TemporaryAuthFailure as e:
            log.error("session {session_id}: AUTH {mechanism} for {user!r} from {peer_ip}: back end "
                      "unavailable: {error}", error=str(e), **fields)
            if not proto._closing:
                proto._reply(REPLIES["temporary"])
            return
        except Exception:
            log.failure("session {session_id}: AUTH {mechanism} for {user!r} from {peer_ip}: back end error",
                        **fields)
            if not proto._closing:
                proto._reply(REPLIES["temporary"])
            return
        resolved = avatar.identity if avatar is not None else identity
        if resolved and await self._throttle("identity_locked", resolved):
            await self._locked(proto, fields)  # the same answer whether the password was right or not
            return
        if avatar is not None:
            await self._throttle("record_success", user, avatar.identity)
            if proto._closing:
                return
            session.auth_identity = avatar.identity
            proto.auth_avatar = avatar
            log.info("session {session_id}: AUTH {mechanism} as {identity} from {peer_ip}",
                     identity=_loggable(avatar.identity), **fields)
            proto._reply(REPLIES["success"])
            return
        await self._failed(proto, fields, why, user, identity)

    async def _locked(self, proto: Any, fields: dict[str, Any]) -> None:
        """A locked-out user (by name or resolved identity): 454, counted for the source."""
        await self._throttle("record_failure", proto.session.peer_ip, None)
        log.warn("session {session_id}: AUTH {mechanism} for locked-out user {user!r} from {peer_ip} refused",
                 **fields)
        if not proto._closing:
            proto._error(REPLIES["user_locked"])

    async def _failed(self, proto: Any, fields: dict[str, Any], why: str, user: str | None,
                      identity: str | None) -> None:
        """A failed login: count it, tarpit, 535 (and 421 when the source is now locked)."""
        session = proto.session
        source_locked, user_locked = await self._throttle("record_failure", session.peer_ip, user, identity)
        log.warn("session {session_id}: AUTH {mechanism} failed for {user!r} from {peer_ip}: {reason}",
                 reason=why, **fields)
        if source_locked or user_locked:
            log.warn("AUTH lockout: {what} locked for {duration}s after failed logins (last from {peer_ip}, "
                     "user {user!r})", what="source" if source_locked else "user",
                     duration=self.lockout.duration, **fields)
        if self.lockout.tarpit > 0:
            await deferLater(self.clock, self.lockout.tarpit)
        if proto._closing:
            return
        if source_locked:
            proto._reply(REPLIES["failed"])
            proto._close(REPLIES["source_locked"])
            return
        proto._error(REPLIES["failed"])

    # ------------------------------------------------------------ send-as

    def _grants(self, proto: Any) -> Any:
        if self.accept_any_sender or proto.session is None or proto.session.auth_identity is None:
            return None
        avatar = getattr(proto, "auth_avatar", None)
        return avatar.grants if avatar is not None else None

    def check_mail(self, proto: Any, sender: Address, params: MailParams) -> tuple[Reply | None, MailParams]:
        """Send-as at MAIL; also keeps an ``AUTH=`` mailbox only when the user may send as it (RFC 4954 5)."""
        session = proto.session
        if session is None or session.auth_identity is None:
            return None, params
        grants = self._grants(proto)
        if grants is not None and not grants.allows(str(sender)):
            log.warn("session {session_id}: {identity} may not send as <{sender}> (MAIL FROM); refused",
                     session_id=session.session_id, identity=_loggable(session.auth_identity),
                     sender=_loggable(str(sender)), peer_ip=session.peer_ip)
            return SEND_AS_DENIED, params
        if params.auth not in (None, "<>") and grants is not None and not grants.allows(params.auth.strip("<>")):
            from dataclasses import replace

            params = replace(params, auth="<>")
        return None, params

    def check_message(self, proto: Any, view: Any) -> Reply | None:
        """Send-as at end of data: a From: is needed, and every From: address must be granted."""
        grants = self._grants(proto)
        if grants is None:
            return None
        values = view.headers.get_all("From") or []
        # no From: at all would bypass the check (and the receiver may add one): refused (issue 11 item 12)
        addresses = from_addresses(values) if values else None
        denied = None if addresses is not None else "(unparsable From:)" if values else "(no From:)"
        for a in addresses or ():
            if not grants.allows(a):
                denied = a
                break
        if denied is None:
            return None
        session = proto.session
        log.warn("session {session_id}: {identity} may not send as {address} (From:); refused",
                 session_id=session.session_id, identity=_loggable(session.auth_identity),
                 address=_loggable(denied), peer_ip=session.peer_ip)
        return SEND_AS_DENIED


# ------------------------------------------------------------ building from the configuration


def blocking_runner(reactor: Any, pool: Any = None) -> Callable[..., Deferred]:
    """``run(f, *args)`` on ``pool`` (default: the reactor's bounded pool)."""
    from twisted.internet.threads import deferToThreadPool

    def run(f: Callable[..., Any], *args: Any) -> Deferred:
        return deferToThreadPool(reactor, pool if pool is not None else reactor.getThreadPool(), f, *args)

    return run


def build_portal(backend: Any, run_blocking: Callable[..., Deferred]) -> Portal:
    """The Portal of an ``[auth.NAME]`` back end config (or a users file path)."""
    if isinstance(backend, str):
        from exmta.auth.users import UsersChecker, UsersRealm

        checker = UsersChecker(backend, run_blocking)
        return Portal(UsersRealm(checker), [checker])
    if backend.kind == "users":
        from exmta.auth.users import UsersChecker, UsersRealm

        checker = UsersChecker(backend.path, run_blocking)
        return Portal(UsersRealm(checker), [checker])
    from exmta.auth.ldap import LDAPChecker, LDAPSettings

    ldap_checker = LDAPChecker(LDAPSettings(
        uri=backend.uri, base_dn=backend.base_dn, tls=backend.tls, ca_file=backend.ca_file,
        bind_dn=backend.bind_dn, bind_password=backend.bind_password,
        login_attributes=backend.login_attributes, user_filter=backend.user_filter,
        identity_attributes=backend.identity_attributes, timeout=backend.timeout,
    ), run_blocking)
    return Portal(ldap_checker, [ldap_checker])


def build_authenticator(config: Any, rc: Any, reactor: Any, pool: Any = None,
                        lockouts: Any = None) -> Authenticator | None:
    """The Authenticator for receive connector ``rc``, or None when it offers no AUTH.

    ``lockouts``: the node's exmta.auth.lockstore.LockoutStore (shared by connectors and processes);
    None counts in memory for this connector only.
    """
    if not rc.auth or not rc.auth_backend:
        return None
    backend: Any = config.auth_backend(rc.auth_backend)
    if backend is None:
        backend = rc.auth_backend if os.path.isabs(rc.auth_backend) else os.path.abspath(rc.auth_backend)
    run = blocking_runner(reactor, pool)
    portal = build_portal(backend, run)
    settings = LockoutSettings(
        tarpit=rc.auth_tarpit, ip_threshold=rc.auth_lockout_source_failures,
        user_threshold=rc.auth_lockout_user_failures, window=rc.auth_lockout_window,
        duration=rc.auth_lockout_duration,
    )
    return Authenticator(
        portal, reactor, rc.auth,
        lockout=settings,
        before_tls_networks=rc.auth_before_tls_networks,
        accept_any_sender=rc.accept_any_sender,
        throttle=lockouts.view(settings) if lockouts is not None else None,
        run_blocking=run,
    )
