"""LDAP / Active Directory simple-bind checker for SMTP AUTH (ldap3 on a bounded thread pool).

A login is two connections, each protected by TLS (StartTLS on ``ldap://``
or implicit on ``ldaps://``; the directory's certificate is verified, host
name included, against ``ca_file`` or the system store):

1. bind as the service account (or anonymously) and find exactly one entry
   whose ``sAMAccountName``, ``userPrincipalName`` or ``mail`` (the
   ``login_attributes``) equals the login name, ANDed with ``user_filter``;
2. bind as that entry's DN with the client's password.

The avatar's send-as grants are the entry's ``mail`` and the ``smtp:`` /
``SMTP:`` values of ``proxyAddresses``. An empty password is refused before
the directory is asked (an LDAP bind with a DN and no password is an
"unauthenticated bind" that succeeds). A directory that cannot be reached
is a temporary failure (454 4.7.0), not a failed login.
"""
from __future__ import annotations

import math
import secrets
import ssl
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

with warnings.catch_warnings():
    # ldap3 2.9 imports names pyasn1 0.6 deprecated (tagMap, typeMap): harmless, and not ours to fix
    warnings.simplefilter("ignore", DeprecationWarning)
    import ldap3
    from ldap3.core.exceptions import LDAPException
    from ldap3.utils.conv import escape_filter_chars

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from exmta.auth.avatar import BadPassword, ISubmitter, Submitter, TemporaryAuthFailure
from exmta.auth.sendas import SendAsGrants, check_grant_pattern, proxy_addresses

__all__ = ["LDAPChecker", "LDAPSettings"]

log = Logger()


@dataclass(frozen=True)
class LDAPSettings:
    uri: str                                   # ldap://host:389 or ldaps://host:636
    base_dn: str
    tls: str = "starttls"                      # "starttls" | "ldaps" | "none" (loopback directories only)
    ca_file: str | None = None
    bind_dn: str | None = None                 # the lookup account; None = anonymous lookup
    bind_password: str | None = None
    login_attributes: tuple[str, ...] = ("sAMAccountName", "userPrincipalName", "mail")
    user_filter: str = ""                      # e.g. "(&(objectCategory=person)(objectClass=user))"
    identity_attributes: tuple[str, ...] = ("userPrincipalName", "mail")
    timeout: float = 10.0

    @classmethod
    def from_backend(cls, backend: Any) -> LDAPSettings:
        """The settings of an ``[auth.NAME]`` back end of kind ldap (exmta.config.schema.AuthBackendConfig)."""
        return cls(uri=backend.uri, base_dn=backend.base_dn, tls=backend.tls, ca_file=backend.ca_file,
                   bind_dn=backend.bind_dn, bind_password=backend.bind_password,
                   login_attributes=backend.login_attributes, user_filter=backend.user_filter,
                   identity_attributes=backend.identity_attributes, timeout=backend.timeout)


class _VerifyingTls(ldap3.Tls):
    """ldap3's Tls with a standard-library context that checks the host name itself.

    ldap3 2.9 matches names with ``ssl.match_hostname`` (deprecated, gone in
    Python 3.12); OpenSSL's own check during the handshake replaces it.
    """

    def __init__(self, context: ssl.SSLContext, hostname: str) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED)
        self.context = context
        self.hostname = hostname

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self.context.wrap_socket(
            connection.socket, server_side=False, do_handshake_on_connect=do_handshake,
            server_hostname=self.hostname,
        )


def _first(entry: dict[str, list[Any]], names: tuple[str, ...]) -> str | None:
    lowered = {k.lower(): v for k, v in entry.items()}
    for name in names:
        values = lowered.get(name.lower()) or []
        for v in values:
            if v:
                return str(v)
    return None


@implementer(ICredentialsChecker, IRealm)
class LDAPChecker:
    """Both the checker and the realm of an LDAP back end: the lookup that verifies also finds the grants."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, settings: LDAPSettings, run_blocking: Callable[..., Deferred]) -> None:
        self.settings = settings
        self.run_blocking = run_blocking
        parts = urlsplit(settings.uri)
        self.host = parts.hostname or "localhost"
        self.use_ssl = parts.scheme == "ldaps"
        self.port = parts.port or (636 if self.use_ssl else 389)
        self._context = ssl.create_default_context(cafile=settings.ca_file)
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._found: dict[str, Submitter] = {}
        self._lock = threading.Lock()
        #: bound for unknown names (see _check); random, so that it never names a real entry
        self._absent_dn = ",".join(filter(None, (f"cn=exmta-absent-{secrets.token_hex(8)}", settings.base_dn)))

    # -- blocking part, on the pool

    def _server(self) -> Any:
        tls = None if self.settings.tls == "none" else _VerifyingTls(self._context, self.host)
        return ldap3.Server(self.host, port=self.port, use_ssl=self.use_ssl, tls=tls,
                            connect_timeout=self.settings.timeout, get_info=ldap3.NONE)

    def _open(self, user: str | None, password: str | None) -> Any:
        """A bound connection (TLS first, then the bind); False when the credentials are refused.

        Every other outcome is a :class:`TemporaryAuthFailure`, and the socket is closed on every path.
        """
        conn = ldap3.Connection(
            self._server(), user=user, password=password, auto_bind=ldap3.AUTO_BIND_NONE,
            receive_timeout=max(1, math.ceil(self.settings.timeout)),  # ldap3 packs it as an integer
            raise_exceptions=False, read_only=True, auto_referrals=False,  # AD's referrals lead off-site
            authentication=ldap3.SIMPLE if user else ldap3.ANONYMOUS,
        )
        bound = False
        try:
            conn.open()
            if self.settings.tls == "starttls" and not conn.start_tls():
                raise TemporaryAuthFailure(f"{self.settings.uri}: StartTLS refused: {conn.result}")
            if not conn.bind():
                code = (conn.result or {}).get("description", "")
                if code == "invalidCredentials":
                    return False
                raise TemporaryAuthFailure(f"{self.settings.uri}: bind failed: {code or conn.result}")
            bound = True
            return conn
        except LDAPException as e:
            raise TemporaryAuthFailure(f"{self.settings.uri}: {type(e).__name__}: {e}") from None
        except (OSError, ssl.SSLError) as e:
            raise TemporaryAuthFailure(f"{self.settings.uri}: {e}") from None
        finally:
            if not bound:
                _close(conn)

    def _lookup(self, login: str) -> tuple[str, dict[str, list[Any]]] | None:
        s = self.settings
        conn = self._open(s.bind_dn, s.bind_password)
        if conn is False:
            raise TemporaryAuthFailure(f"{s.uri}: the lookup account {s.bind_dn!r} was refused (invalidCredentials)")
        try:
            value = escape_filter_chars(login)
            alternatives = "".join(f"({a}={value})" for a in s.login_attributes)
            flt = f"(&(|{alternatives}){s.user_filter})"
            attributes = sorted({"mail", "proxyAddresses", *s.identity_attributes})
            if not conn.search(s.base_dn, flt, attributes=attributes, size_limit=2):
                outcome = (conn.result or {}).get("description")
                if outcome in ("success", "noSuchObject"):
                    return None
                if outcome != "sizeLimitExceeded":  # more than two entries: ambiguous, handled below
                    raise TemporaryAuthFailure(f"{s.uri}: search failed: {conn.result}")
            entries = [e for e in conn.response or () if e.get("type") == "searchResEntry"]
        finally:
            _close(conn)
        if len(entries) != 1:
            if entries:  # two or more: refuse rather than guess
                log.warn("ldap {uri}: login name {user!r} matches {count} entries; refused",
                         uri=s.uri, user=login, count=len(entries))
            return None
        return entries[0]["dn"], dict(entries[0].get("attributes") or {})

    def _check(self, login: str, password: str) -> str:
        found = self._lookup(login)
        if found is None:
            # the same second connection and bind as for a real user, to a DN that does not exist (the
            # directory answers invalidCredentials): timing does not tell which names exist (issue 11 item 10)
            conn = self._open(self._absent_dn, password)
            if conn is not False:
                _close(conn)
                log.error("ldap {uri}: a bind as the absent DN {dn!r} succeeded; check the directory's ACLs",
                          uri=self.settings.uri, dn=self._absent_dn)
            raise UnauthorizedLogin("unknown user")
        dn, attributes = found
        conn = self._open(dn, password)
        if conn is False:
            raise BadPassword("wrong password", _first(attributes, self.settings.identity_attributes) or login)
        _close(conn)
        mail = [str(v) for v in attributes.get("mail") or ()]
        grants = SendAsGrants.from_patterns(
            a for a in mail + proxy_addresses(attributes.get("proxyAddresses") or ()) if _plain_address(a))
        identity = _first(attributes, self.settings.identity_attributes) or login
        with self._lock:
            self._found[identity] = Submitter(identity, grants)
        return identity

    def has_address(self, address: str) -> bool:
        """Whether an entry has ``address`` as ``mail`` or an ``smtp:`` proxyAddresses value (blocking).

        Recipient validation (exmta.receive.directory): the lookup account searches; no user bind.
        """
        s = self.settings
        conn = self._open(s.bind_dn, s.bind_password)
        if conn is False:
            raise TemporaryAuthFailure(f"{s.uri}: the lookup account {s.bind_dn!r} was refused (invalidCredentials)")
        try:
            value = escape_filter_chars(address)
            flt = f"(|(mail={value})(proxyAddresses=smtp:{value}))"
            if not conn.search(s.base_dn, flt, attributes=["1.1"], size_limit=1):
                outcome = (conn.result or {}).get("description")
                if outcome == "sizeLimitExceeded":
                    return True  # more than one entry has it: it exists
                if outcome in ("success", "noSuchObject"):
                    return False
                raise TemporaryAuthFailure(f"{s.uri}: search failed: {conn.result}")
            return any(e.get("type") == "searchResEntry" for e in conn.response or ())
        finally:
            _close(conn)

    # -- reactor side

    def requestAvatarId(self, credentials: Any) -> Deferred:
        username, password = credentials.username, credentials.password
        if isinstance(username, bytes):
            username = username.decode("utf-8")
        if isinstance(password, bytes):
            password = password.decode("utf-8")
        if not username or not password:
            return fail(UnauthorizedLogin("empty user name or password"))
        return self.run_blocking(self._check, username, password)

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Callable[[], None]]:
        if ISubmitter not in interfaces:
            raise NotImplementedError("only ISubmitter avatars")  # twisted.cred IRealm: unsupported interface
        with self._lock:
            submitter = self._found.pop(avatarId, None)
        if submitter is None:
            raise UnauthorizedLogin("lookup result missing")
        return ISubmitter, submitter, lambda: None


def _close(conn: Any) -> None:
    """Unbind, and close the socket even when the unbind cannot be sent (a failed TLS handshake)."""
    try:
        conn.unbind()
    except Exception:
        pass
    sock = getattr(conn, "socket", None)
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def _plain_address(address: str) -> bool:
    try:
        return "*" not in address and check_grant_pattern(address) != ""
    except ValueError:
        return False
