"""OAuth2 client credentials for the XOAUTH2 relay: tokens from a token endpoint, in memory only.

Exchange Online turns Basic SMTP AUTH off (MC786329); an app registration
with ``SMTP.SendAsApp`` logs in with ``AUTH XOAUTH2`` and a bearer token
instead.  :class:`TokenSource` gets that token with the OAuth2 client
credentials grant (RFC 6749 4.4) from a configurable token endpoint (Entra
ID: ``https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token``),
authenticating the client with a secret (``client_secret_post``) or a
certificate-signed assertion (``private_key_jwt``, RFC 7523: RS256 with the
``x5t`` and ``x5t#S256`` headers Entra uses to find the certificate).

Why not MSAL for Python: it insists on an ``https`` authority with OpenID
discovery (one more request, and a TLS test server with a trusted CA just to
reach a loopback token endpoint), it is blocking (requests), and it brings
requests and PyJWT; the grant itself is one form POST.  The request goes out
on Twisted's web client, so the reactor never waits on it.

The cache: one :class:`TokenSource` per (tenant, client, scope), shared by
every connector that names the same app (:func:`attach_token_sources`).  A
token is used until ``refresh_before`` seconds before it expires, then
renewed in the background while the old one still serves; one request is in
flight at a time, whatever the number of waiting sessions.  A failure is
remembered for :data:`FAILURE_HOLD` seconds so that a queue run against a
dead endpoint costs one request, not one per message.  Tokens and secrets are
never logged and never written to disk.  A rotated secret or certificate file
is read again before the next request.

No token means no session: :class:`XOAuth2Relay` answers DEFERRED with the
reason (``451 4.7.0 ... token endpoint ... refused client ...``) so the
tracking log says why and the message waits for the next retry; it expires
with a DSN only at the end of the queue lifetime.
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import uuid
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Callable, Iterable
from urllib.parse import urlencode, urlsplit

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from exmta.config.schema import OAuth2Config
from exmta.model import DeliveryRequest, Reply
from exmta.send.token_error import TokenError
from exmta.smtp.xoauth2 import XOAuth2Login

__all__ = [
    "ClientAssertion", "ClientSecret", "FAILURE_HOLD", "TokenError", "TokenSource", "XOAuth2Relay",
    "attach_token_sources", "entra_token_endpoint", "load_credential", "register_metrics",
]

log = Logger()

FAILURE_HOLD = 10.0        # seconds a failed token request answers for the next callers
EXPIRY_SKEW = 30.0         # a token this close to its expiry is not sent any more (at most 1/4 of its life)
ASSERTION_LIFETIME = 600   # seconds a client assertion is valid
MAX_RESPONSE = 64 * 1024   # a token response larger than this is hostile
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def entra_token_endpoint(tenant: str) -> str:
    """The Entra ID v2.0 token endpoint of a tenant (GUID or domain)."""
    return f"https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"


# ---------------------------------------------------------------- client authentication


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class ClientSecret:
    """``client_secret_post``: the secret goes in the form."""

    secret: str

    def form(self, client_id: str, endpoint: str, now: float) -> dict[str, str]:
        return {"client_secret": self.secret}


class ClientAssertion:
    """``private_key_jwt``: a JWT signed with the certificate's key (RFC 7523 2.2, as Entra wants it)."""

    def __init__(self, certificate_der: bytes, private_key: Any) -> None:
        self.private_key = private_key
        self.x5t = _b64url(hashlib.sha1(certificate_der).digest())  # noqa: S324 - Entra's certificate id
        self.x5t_s256 = _b64url(hashlib.sha256(certificate_der).digest())

    def assertion(self, client_id: str, endpoint: str, now: float) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = {"alg": "RS256", "typ": "JWT", "x5t": self.x5t, "x5t#S256": self.x5t_s256}
        issued = int(now)
        claims = {"aud": endpoint, "iss": client_id, "sub": client_id, "jti": uuid.uuid4().hex,
                  "iat": issued, "nbf": issued, "exp": issued + ASSERTION_LIFETIME}
        signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + _b64url(json.dumps(claims, separators=(",", ":")).encode()))
        signature = self.private_key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def form(self, client_id: str, endpoint: str, now: float) -> dict[str, str]:
        return {"client_assertion_type": ASSERTION_TYPE, "client_assertion": self.assertion(client_id, endpoint, now)}


def load_credential(config: OAuth2Config) -> ClientSecret | ClientAssertion:
    """The client's credential from the config; ValueError says which file or key is wrong."""
    if config.client_secret is not None:
        return ClientSecret(config.client_secret)
    if config.client_secret_file is not None:
        try:
            with open(config.client_secret_file, encoding="utf-8") as f:
                secret = f.read().strip()
        except OSError as e:
            raise ValueError(f"{config.client_secret_file}: cannot read the client secret: {e.strerror}") from None
        if not secret:
            raise ValueError(f"{config.client_secret_file}: the client secret file is empty")
        return ClientSecret(secret)
    if config.certificate is None:
        raise ValueError("needs client_secret, client_secret_file or certificate")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        with open(config.certificate, "rb") as f:
            cert_pem = f.read()
        key_pem = cert_pem
        if config.private_key is not None:
            with open(config.private_key, "rb") as f:
                key_pem = f.read()
    except OSError as e:
        raise ValueError(f"{e.filename}: cannot read: {e.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ValueError(f"{config.certificate}: no PEM certificate in the file") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{config.private_key or config.certificate}: no unencrypted PEM private key "
                         "in the file") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{config.private_key or config.certificate}: the key must be RSA (Entra signs RS256)")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ValueError(f"{config.certificate}: the private key does not belong to the certificate")
    return ClientAssertion(cert.public_bytes(serialization.Encoding.DER), key)


def endpoint_problem(url: str) -> str | None:
    """Why a token endpoint URL is unsafe or unusable, or None (plain http only to a loopback address)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return f"{url!r} is not an https:// URL"
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            return f"{url!r}: the client secret and the token would cross the network in clear; use https://"
    return None


# ---------------------------------------------------------------- the token source


@dataclass
class _Token:
    value: str
    obtained: float
    usable_until: float
    refresh_at: float
    replacement: bool = False  # fetched because the server refused the one before (535)


HTTPPost = Callable[[str, bytes, float], "defer.Deferred[tuple[int, bytes]]"]


class TokenSource:
    """Bearer tokens of one (tenant, client, scope), cached in memory and renewed before they expire.

    ``post`` is ``(url, form_body, timeout) -> Deferred[(status, body)]``;
    the default uses Twisted's web client on ``reactor``.
    """

    def __init__(self, config: OAuth2Config, clock: IReactorTime, reactor: Any = None,
                 post: HTTPPost | None = None, credential: ClientSecret | ClientAssertion | None = None) -> None:
        self.config = config
        self.clock = clock
        self.reactor = reactor
        self.credential = credential if credential is not None else load_credential(config)
        self._files = _stamp(config) if credential is None else None
        self._post = post or self._agent_post
        self._token: _Token | None = None
        self._fetching: defer.Deferred[_Token] | None = None
        self._waiters: list[defer.Deferred[str]] = []
        self._failure: TokenError | None = None
        self._failure_until = 0.0
        self._replacing = False
        #: requests made, by result ("ok" or a TokenError reason); tokens served from the cache
        self.requests: dict[str, int] = {}
        self.cache_hits = 0

    @property
    def key(self) -> tuple[str, str, str]:
        return token_key(self.config)

    @property
    def label(self) -> str:
        return f"{self.config.tenant or urlsplit(self.config.token_endpoint).hostname}/{self.config.client_id}"

    # ------------------------------------------------------------ public

    def token(self) -> defer.Deferred[str]:
        """A valid access token: cached, or after one (shared) request; errbacks with TokenError."""
        now = self.clock.seconds()
        tok = self._token
        if tok is not None and now < tok.usable_until:
            if now >= tok.refresh_at and self._fetching is None and now >= self._failure_until:
                self._start()  # renew in the background; this one is still good
            self.cache_hits += 1
            return defer.succeed(tok.value)
        if self._failure is not None and now < self._failure_until:
            return defer.fail(self._failure)
        d: defer.Deferred[str] = defer.Deferred()
        self._waiters.append(d)
        if self._fetching is None:
            self._start()
        return d

    def invalidate(self, value: str) -> bool:
        """The server refused this token (535): drop it, once; True when a new one is worth asking for.

        A token that replaced a refused one is not dropped again: when the new
        token is refused too, the fault is the app's rights, not the token, and
        every session asking for another would flood the endpoint.
        """
        tok = self._token
        if tok is None or tok.value != value:
            return tok is not None or self._fetching is not None  # already being replaced
        if tok.replacement:
            return False
        self._token, self._replacing = None, True
        log.info("XOAUTH2: token of {client} refused by the server; fetching a new one", client=self.label)
        return True

    # ------------------------------------------------------------ one request

    def _start(self) -> None:
        self._fetching = defer.Deferred.fromCoroutine(self._fetch())
        self._fetching.addBoth(self._finished)

    def _finished(self, result: _Token | Failure) -> None:
        self._fetching = None
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Failure):
            error = result.value if isinstance(result.value, TokenError) else TokenError(
                f"token request for {self.label} failed unexpectedly: {result.value.__class__.__name__}",
                "bad_response")
            if not isinstance(result.value, TokenError):
                log.failure("XOAUTH2: token request for {client} failed", result, client=self.label)
            self._failure, self._failure_until = error, self.clock.seconds() + FAILURE_HOLD
            self.requests[error.reason] = self.requests.get(error.reason, 0) + 1
            log.warn("XOAUTH2: no token for {client}: {reason}", client=self.label, reason=str(error))
            for d in waiters:
                d.errback(error)
            return
        result.replacement, self._replacing = self._replacing, False
        self._token, self._failure, self._failure_until = result, None, 0.0
        self.requests["ok"] = self.requests.get("ok", 0) + 1
        log.info("XOAUTH2: new token for {client}, valid {seconds:.0f}s",
                 client=self.label, seconds=result.usable_until - result.obtained)
        for d in waiters:
            d.callback(result.value)

    async def _fetch(self) -> _Token:
        cfg = self.config
        started = self.clock.seconds()
        form = {"grant_type": "client_credentials", "client_id": cfg.client_id, "scope": cfg.scope}
        self._reload_credential()
        form.update(self.credential.form(cfg.client_id, cfg.token_endpoint, started))
        where = cfg.token_endpoint
        try:
            status, body = await self._post(where, urlencode(form).encode("ascii"), cfg.timeout)
        except defer.TimeoutError:
            raise TokenError(f"token endpoint {where} did not answer within {cfg.timeout:g}s", "unreachable") from None
        except Exception as exc:  # connection refused, DNS, TLS verification, reset
            raise TokenError(f"token endpoint {where} unreachable: {_describe(exc)}", "unreachable") from None
        return self._parse(status, body, started)

    def _parse(self, status: int, body: bytes, started: float) -> _Token:
        where = self.config.token_endpoint
        try:
            doc = json.loads(body.decode("utf-8"))
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            doc = None
        if status != 200:
            if status in (400, 401, 403) and doc is not None and "error" in doc:
                text = _clean(f"{doc.get('error')}: {doc.get('error_description') or ''}".rstrip(": "))
                raise TokenError(f"token endpoint {where} refused client {self.config.client_id}: "
                                 f"HTTP {status} {text}", "refused")
            raise TokenError(f"token endpoint {where} answered HTTP {status}", "unavailable")
        if doc is None:
            raise TokenError(f"token endpoint {where} answered something that is not JSON", "bad_response")
        value, kind = doc.get("access_token"), str(doc.get("token_type", "Bearer"))
        try:
            lifetime = float(doc.get("expires_in", 3600))
        except (TypeError, ValueError):
            lifetime = -1.0
        if not isinstance(value, str) or not value or kind.lower() != "bearer" or lifetime <= 0 \
                or not value.isascii() or any(c in value for c in "\x00\x01\r\n "):
            raise TokenError(f"token endpoint {where} answered without a usable bearer token", "bad_response")
        expires = started + lifetime
        usable_until = expires - min(EXPIRY_SKEW, lifetime / 4)
        return _Token(value, started, usable_until, expires - min(self.config.refresh_before, lifetime / 2))

    def _reload_credential(self) -> None:
        """A rotated secret or certificate file is used from the next request on (no restart)."""
        if self._files is None:
            return
        stamp = _stamp(self.config)
        if stamp == self._files:
            return
        try:
            self.credential = load_credential(self.config)
        except ValueError as e:
            log.warn("XOAUTH2: {client}: keeping the old credential: {error}", client=self.label, error=str(e))
            return
        self._files = stamp
        log.info("XOAUTH2: {client}: credential files changed, reloaded", client=self.label)

    # ------------------------------------------------------------ HTTP

    def _agent_post(self, url: str, body: bytes, timeout: float) -> defer.Deferred[tuple[int, bytes]]:
        from twisted.web.client import Agent, FileBodyProducer, readBody
        from twisted.web.http_headers import Headers

        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        agent = Agent(reactor, connectTimeout=timeout)  # https: the system CAs and the host name
        headers = Headers({b"Content-Type": [b"application/x-www-form-urlencoded"],
                           b"Accept": [b"application/json"], b"User-Agent": [b"exmta"]})
        d = agent.request(b"POST", url.encode("ascii"), headers, FileBodyProducer(BytesIO(body)))

        def got(response: Any) -> defer.Deferred[tuple[int, bytes]]:
            if response.length is not None and response.length != -1 and response.length > MAX_RESPONSE:
                response.deliverBody(_Discard())
                return defer.succeed((response.code, b""))
            return readBody(response).addCallback(lambda data: (response.code, data[:MAX_RESPONSE]))

        d.addCallback(got)
        d.addTimeout(timeout, self.clock)
        return d


class _Discard:
    """A body consumer that drops everything (an oversized response)."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


def _stamp(config: OAuth2Config) -> tuple[tuple[str, float, int], ...]:
    """(path, mtime, size) of the credential files, to notice a rotation."""
    out = []
    for path in (config.client_secret_file, config.certificate, config.private_key):
        if path is not None:
            try:
                st = os.stat(path)
                out.append((path, st.st_mtime, st.st_size))
            except OSError:
                out.append((path, -1.0, -1))
    return tuple(out)


def _describe(exc: BaseException) -> str:
    """A short reason without the request (the form holds the secret)."""
    from twisted.web.client import ResponseNeverReceived

    if isinstance(exc, ResponseNeverReceived) and exc.reasons:
        exc = exc.reasons[0].value
    text = str(exc).strip().split("\n")[0][:160]
    return f"{exc.__class__.__name__}{': ' + text if text and exc.__class__.__name__ not in text else ''}"


def _clean(text: str) -> str:
    """The first line of an error description, printable and bounded (Entra adds trace ids)."""
    line = text.replace("\r", " ").split("\n")[0]
    return "".join(c if c.isprintable() else "?" for c in line)[:240]


def token_key(config: OAuth2Config) -> tuple[str, str, str]:
    """The cache key: (tenant, client, scope); the endpoint stands for a tenant that is not named."""
    return (config.tenant or config.token_endpoint, config.client_id, config.scope)


# ---------------------------------------------------------------- the connector's side


class XOAuth2Relay:
    """What a send connector with ``auth = "xoauth2"`` needs: a token before connecting, and a login.

    ``user_for(request)`` is the XOAUTH2 ``user=``: the fixed mailbox, or the
    envelope sender with ``send_as = "sender"`` (the null sender uses the mailbox).
    """

    def __init__(self, config: OAuth2Config, source: TokenSource) -> None:
        self.config = config
        self.source = source

    def user_for(self, request: DeliveryRequest) -> str:
        if self.config.send_as == "sender" and request.envelope.sender:
            return request.envelope.sender
        assert self.config.mailbox is not None, "check-config requires mailbox"
        return self.config.mailbox

    def ready(self) -> defer.Deferred[Reply | None]:
        """None when a token is at hand; else the deferral reply (nothing is connected without one)."""
        def refused(failure: Failure) -> Reply:
            failure.trap(TokenError)
            return failure.value.reply

        return self.source.token().addCallbacks(lambda _: None, refused)

    def login(self, request: DeliveryRequest) -> Any:
        return XOAuth2Login(self.user_for(request), self.source)


def attach_token_sources(send_configs: Iterable[Any], connectors: dict[str, Any], clock: IReactorTime,
                         reactor: Any = None) -> dict[tuple[str, str, str], TokenSource]:
    """Give each ``auth = "xoauth2"`` connector its relay; one TokenSource per (tenant, client, scope)."""
    sources: dict[tuple[str, str, str], TokenSource] = {}
    for sc in send_configs:
        if sc.auth != "xoauth2" or sc.oauth2 is None or sc.name not in connectors:
            continue
        key = token_key(sc.oauth2)
        if key not in sources:
            sources[key] = TokenSource(sc.oauth2, clock, reactor)
        connectors[sc.name].xoauth2 = XOAuth2Relay(sc.oauth2, sources[key])
    return sources


def register_metrics(metrics: Any, connectors: dict[str, Any]) -> None:
    """``exmta_oauth2_token_requests_total{client,result}`` and cache hits, read at scrape time."""
    sources = {id(c.xoauth2.source): c.xoauth2.source for c in connectors.values()
               if getattr(c, "xoauth2", None) is not None}
    if not sources or metrics is None:
        return
    from prometheus_client.core import CounterMetricFamily

    class _Collector:
        def collect(self) -> Iterable[Any]:
            requests = CounterMetricFamily("exmta_oauth2_token_requests", "OAuth2 token requests by result",
                                           labels=["client", "result"])
            hits = CounterMetricFamily("exmta_oauth2_token_cache_hits", "XOAUTH2 logins served from the cache",
                                       labels=["client"])
            for source in sources.values():
                for result, count in sorted(source.requests.items()):
                    requests.add_metric([source.label, result], count)
                hits.add_metric([source.label], source.cache_hits)
            return [requests, hits]

    metrics.registry.register(_Collector())
