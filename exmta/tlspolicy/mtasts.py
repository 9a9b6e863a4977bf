"""MTA-STS (RFC 8461): discover, fetch, cache and match a domain's policy.

* :func:`parse_txt` reads the ``_mta-sts.<domain>`` TXT record (its ``id``);
* :func:`parse_policy` reads ``https://mta-sts.<domain>/.well-known/mta-sts.txt``;
* :class:`PolicyFetcher` fetches it over HTTPS with certificate validation
  (the name ``mta-sts.<domain>``, the system roots or a configured CA),
  no redirects, ``text/plain`` only, a size limit and a time limit;
* :class:`PolicyCache` keeps each policy as a JSON file per domain so that
  it survives restarts, until its ``max_age`` runs out;
* :class:`MTASTS` puts them together as section 5 of the RFC says: a valid
  cached policy is used at once, and fetched again in the background when
  the TXT ``id`` changes; without one, the policy is fetched before
  delivery; a domain whose policy cannot be fetched is treated as having
  none (and the failure is reported through TLS-RPT).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from exmta.filemodes import replace_file

__all__ = [
    "MTASTS", "PolicyCache", "PolicyError", "PolicyFetcher", "STSPolicy", "mx_matches", "parse_policy",
    "parse_txt",
]

log = Logger()

MAX_AGE_LIMIT = 31557600            # RFC 8461 3.2: at most one year
DEFAULT_MAX_SIZE = 64 * 1024        # RFC 8461 3.3 suggests 64 KiB
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_MODES = ("enforce", "testing", "none")


class PolicyError(Exception):
    """A TXT record or policy that cannot be used; ``kind`` is the TLS-RPT result type."""

    def __init__(self, text: str, kind: str = "sts-policy-invalid") -> None:
        super().__init__(text)
        self.kind = kind


@dataclass(frozen=True)
class STSPolicy:
    """One fetched policy and when it was fetched (``expires_at`` = fetched_at + max_age)."""

    domain: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    policy_id: str
    fetched_at: float
    text: str = ""

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.max_age

    def valid_at(self, now: float) -> bool:
        return now < self.expires_at

    def matches(self, host: str) -> bool:
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "mode": self.mode, "mx": list(self.mx), "max_age": self.max_age,
                "policy_id": self.policy_id, "fetched_at": self.fetched_at, "text": self.text}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> STSPolicy:
        return cls(str(data["domain"]), str(data["mode"]), tuple(str(m) for m in data["mx"]),
                   int(data["max_age"]), str(data["policy_id"]), float(data["fetched_at"]),
                   str(data.get("text", "")))


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: exact (case-insensitive), or ``*.example.com`` for exactly one more label."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, _, rest = host.partition(".")
        return bool(label) and rest == pattern[2:]
    return pattern == host


def parse_txt(strings: list[str]) -> str | None:
    """The ``id`` of the one ``v=STSv1`` TXT record, None when there is none.

    Several ``v=STSv1`` records, or one without a valid id, raise
    :class:`PolicyError` (the RFC says: treat as no policy).
    """
    found = [s for s in strings if s.startswith("v=STSv1")]
    if not found:
        return None
    if len(found) > 1:
        raise PolicyError("more than one v=STSv1 TXT record")
    fields = {}
    for part in found[0].split(";"):
        key, _, value = part.strip().partition("=")
        if key:
            fields[key.strip()] = value.strip()
    policy_id = fields.get("id", "")
    if not _ID.match(policy_id):
        raise PolicyError(f"TXT record has no valid id: {found[0]!r}")
    return policy_id


def parse_policy(text: str, domain: str, policy_id: str, fetched_at: float) -> STSPolicy:
    """RFC 8461 3.2: ``key: value`` lines; version, mode and max_age required, mx unless mode none."""
    version = mode = None
    max_age: int | None = None
    mx: list[str] = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"policy line without ':': {raw[:80]!r}")
        key, value = key.strip(), value.strip()
        if key == "version":
            version = value
        elif key == "mode":
            mode = value
        elif key == "max_age":
            if not value.isdigit() or len(value) > 10:
                raise PolicyError(f"max_age is not a number: {value[:40]!r}")
            max_age = min(int(value), MAX_AGE_LIMIT)
        elif key == "mx":
            if not re.fullmatch(r"(\*\.)?[A-Za-z0-9_.-]+", value):
                raise PolicyError(f"mx is not a host name pattern: {value[:80]!r}")
            mx.append(value.lower().rstrip("."))
        # other keys are ignored (RFC 8461 3.2: extensions)
    if version != "STSv1":
        raise PolicyError(f"version is {version!r}, not STSv1")
    if mode not in _MODES:
        raise PolicyError(f"mode is {mode!r}, not enforce, testing or none")
    if max_age is None:
        raise PolicyError("max_age is missing")
    if mode != "none" and not mx:
        raise PolicyError("no mx patterns")
    return STSPolicy(domain, mode, tuple(mx), max_age, policy_id, fetched_at, text)


# ---------------------------------------------------------------- on-disk cache


class PolicyCache:
    """One JSON file per policy domain under ``directory`` (blocking: call on a pool thread)."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory  # None: nothing on disk (policies live in memory only)

    def _path(self, domain: str) -> str:
        safe = re.sub(r"[^a-z0-9.-]", "_", domain.lower())
        return os.path.join(self.directory, f"{safe}.json")

    def load(self, domain: str) -> STSPolicy | None:
        if self.directory is None:
            return None
        try:
            with open(self._path(domain), encoding="utf-8") as f:
                return STSPolicy.from_json(json.load(f))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warn("MTA-STS cache file for {domain} unreadable, ignored: {error}", domain=domain, error=str(exc))
            return None

    def store(self, policy: STSPolicy) -> None:
        if self.directory is None:
            return
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        replace_file(self._path(policy.domain), json.dumps(policy.to_json()).encode("utf-8"), 0o640)


# ---------------------------------------------------------------- HTTPS fetch


class _LimitedBody(Protocol):
    """Collects a response body, failing once it passes ``limit`` octets."""

    def __init__(self, limit: int, done: defer.Deferred[bytes]) -> None:
        self.limit = limit
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(PolicyError(f"policy larger than {self.limit} octets", "sts-policy-invalid"))
            self.transport.stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(PolicyError(f"policy body lost: {reason.getErrorMessage()}", "sts-policy-fetch-error"))


class _FixedEndpoints:
    """Agent endpoint factory: connect to an address we resolved, TLS for the URI's host name."""

    def __init__(self, reactor: Any, address: str, port: int, creator: Any, timeout: float) -> None:
        self.reactor = reactor
        self.address = address
        self.port = port
        self.creator = creator
        self.timeout = timeout

    def endpointForURI(self, uri: Any) -> Any:
        from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS

        cls = TCP6ClientEndpoint if ":" in self.address else TCP4ClientEndpoint
        return wrapClientTLS(self.creator, cls(self.reactor, self.address, self.port, timeout=self.timeout))


class PolicyFetcher:
    """Fetches ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (see the module docstring).

    ``resolve(host) -> Deferred[list[str]]`` gives the policy host's
    addresses (the send connectors' resolver), so tests aim it at their own
    DNS; ``port`` is 443 except in tests; ``ca_file`` None trusts the system
    roots.
    """

    def __init__(self, reactor: Any, resolve: Callable[[str], defer.Deferred[list[str]]], *,
                 port: int = 443, ca_file: str | None = None, timeout: float = 30.0,
                 max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.reactor = reactor
        self.resolve = resolve
        self.port = port
        self.timeout = timeout
        self.max_size = max_size
        self._trust = _trust_root(ca_file)

    def fetch(self, domain: str) -> defer.Deferred[str]:
        """The policy text; errbacks with :class:`PolicyError` (``kind`` for TLS-RPT)."""
        d = defer.Deferred.fromCoroutine(self._fetch(domain))
        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=lambda result, timeout: Failure(PolicyError(
            f"policy fetch for {domain} timed out after {timeout:g}s", "sts-policy-fetch-error")))
        return d

    async def _fetch(self, domain: str) -> str:
        from twisted.internet.ssl import optionsForClientTLS
        from twisted.web.client import Agent
        from twisted.web.http_headers import Headers

        host = f"mta-sts.{domain}"
        try:
            addresses = await self.resolve(host)
        except Exception as exc:
            raise PolicyError(f"policy host {host} does not resolve: {exc}", "sts-policy-fetch-error") from None
        if not addresses:
            raise PolicyError(f"policy host {host} has no address", "sts-policy-fetch-error")
        creator = optionsForClientTLS(host, trustRoot=self._trust)
        agent = Agent.usingEndpointFactory(
            self.reactor, _FixedEndpoints(self.reactor, addresses[0], self.port, creator, self.timeout))
        url = f"https://{host}/.well-known/mta-sts.txt".encode("idna")
        try:
            response = await agent.request(b"GET", url, Headers({b"User-Agent": [b"exmta MTA-STS"]}))
        except defer.CancelledError:
            raise
        except Exception as exc:
            kind = "sts-webpki-invalid" if _is_tls_error(exc) else "sts-policy-fetch-error"
            raise PolicyError(f"policy fetch from {host} failed: {_describe(exc)}", kind) from None
        if response.code != 200:  # RFC 8461 3.3: no redirects, 200 only
            _discard(response)
            raise PolicyError(f"policy host {host} answered HTTP {response.code}", "sts-policy-fetch-error")
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode("latin-1").lower()
        if not ctype.startswith("text/plain"):
            _discard(response)
            raise PolicyError(f"policy from {host} is {ctype or 'untyped'}, not text/plain")
        if response.length is not None and isinstance(response.length, int) and response.length > self.max_size:
            _discard(response)
            raise PolicyError(f"policy from {host} is {response.length} octets, over {self.max_size}")
        reader: list[_LimitedBody] = []

        def stop_reading(_: object) -> None:  # the time limit ran out while the body trickled in
            if reader and reader[0].transport is not None:
                reader[0].transport.stopProducing()

        body: defer.Deferred[bytes] = defer.Deferred(stop_reading)
        reader.append(_LimitedBody(self.max_size, body))
        response.deliverBody(reader[0])
        data = await body
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError(f"policy from {host} is not UTF-8") from None


def _discard(response: Any) -> None:
    """Read and drop a body we refuse (so the connection is released)."""
    done: defer.Deferred[bytes] = defer.Deferred()
    done.addErrback(lambda _: None)
    response.deliverBody(_LimitedBody(0, done))


def _trust_root(ca_file: str | None) -> Any:
    from twisted.internet.ssl import Certificate, platformTrust, trustRootFromCertificates

    if not ca_file:
        return platformTrust()
    with open(ca_file, "rb") as f:
        pems = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", f.read(), re.S)
    return trustRootFromCertificates([Certificate.loadPEM(p) for p in pems])


def _is_tls_error(exc: BaseException) -> bool:
    from OpenSSL import SSL

    reasons = getattr(exc, "reasons", None) or [exc]
    for r in reasons:
        value = getattr(r, "value", r)
        if isinstance(value, SSL.Error) or "certificate" in str(value).lower():
            return True
    return False


def _describe(exc: BaseException) -> str:
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return "; ".join(str(getattr(r, "value", r)) for r in reasons)
    return str(exc) or exc.__class__.__name__


# ---------------------------------------------------------------- the policy source


class MTASTS:
    """Policy per domain as RFC 8461 section 5 says; see the module docstring.

    ``txt_lookup(name) -> Deferred[list[str] | None]`` gives TXT strings
    (None: no record).  ``txt_recheck`` seconds: how long a cached policy is
    used without looking at the TXT id again.  ``report(domain, kind, text)``
    is called for fetch failures (TLS-RPT).
    """

    log = Logger()

    def __init__(self, clock: Any, threadpool: Any, reactor: Any, cache: PolicyCache, fetcher: PolicyFetcher,
                 txt_lookup: Callable[[str], defer.Deferred[list[str] | None]], *, txt_recheck: float = 300.0,
                 report: Callable[[str, str, str], None] | None = None) -> None:
        self.clock = clock
        self.threadpool = threadpool
        self.reactor = reactor
        self.cache = cache
        self.fetcher = fetcher
        self.txt_lookup = txt_lookup
        self.txt_recheck = txt_recheck
        self.report = report
        self._memory: dict[str, STSPolicy | None] = {}
        self._checked: dict[str, float] = {}
        self._fetching: dict[str, defer.Deferred[STSPolicy | None]] = {}
        #: background refreshes in progress (tests and shutdown wait on them)
        self.refreshing: dict[str, defer.Deferred[STSPolicy | None]] = {}

    def _blocking(self, fn: Callable[[], Any]) -> defer.Deferred[Any]:
        if self.threadpool is None:
            return defer.maybeDeferred(fn)
        return deferToThreadPool(self.reactor, self.threadpool, fn)

    async def policy_for(self, domain: str) -> STSPolicy | None:
        """The policy in force for ``domain`` (mode none included), or None."""
        domain = domain.lower().rstrip(".")
        now = self.clock.seconds()
        if domain not in self._memory:
            self._memory[domain] = await self._blocking(lambda: self.cache.load(domain))
        stored = self._memory[domain]
        cached = stored if stored is not None and stored.valid_at(now) else None
        recent = now - self._checked.get(domain, -1e18) < self.txt_recheck
        if recent and (cached is not None or stored is None) and domain not in self._fetching:
            return cached  # also None: no TXT record was found a moment ago (negative caching)
        try:
            policy_id = await self._txt_id(domain)
        except PolicyError as exc:
            self._report(domain, exc.kind, str(exc))
            policy_id = None
        self._checked[domain] = now
        if cached is not None:
            changed = policy_id is not None and policy_id != cached.policy_id
            # RFC 8461 10.2: refresh before expiry too (the last quarter of max_age), so a policy in
            # use does not lapse and a domain that has published it is never delivered to unprotected
            ageing = policy_id is not None and cached.expires_at - now < cached.max_age / 4
            if (changed or ageing) and domain not in self.refreshing:
                self.log.info("MTA-STS policy of {domain}: {why}; refreshing in the background", domain=domain,
                              why=f"id {cached.policy_id} -> {policy_id}" if changed else "close to expiry")
                d = self._fetch_and_store(domain, policy_id)
                self.refreshing[domain] = d
                d.addBoth(lambda r: (self.refreshing.pop(domain, None), r)[1])
            return cached
        if policy_id is None:
            return None
        running = self._fetching.get(domain)
        if running is None:
            running = self._fetch_and_store(domain, policy_id)
            self._fetching[domain] = running
            running.addBoth(lambda r: (self._fetching.pop(domain, None), r)[1])
        # each waiter gets its own Deferred: a shared one passes its result to one chain only
        mine: defer.Deferred[STSPolicy | None] = defer.Deferred()
        running.addBoth(lambda r: (mine.callback(r), r)[1])
        return await mine

    def _fetch_and_store(self, domain: str, policy_id: str) -> defer.Deferred[STSPolicy | None]:
        return defer.Deferred.fromCoroutine(self._fetch_and_store_async(domain, policy_id))

    async def _fetch_and_store_async(self, domain: str, policy_id: str) -> STSPolicy | None:
        """Fetch, parse and cache; None (and a report) on failure: the old policy, if any, stays."""
        try:
            text = await self.fetcher.fetch(domain)
            policy = parse_policy(text, domain, policy_id, self.clock.seconds())
        except PolicyError as exc:
            self.log.warn("MTA-STS policy of {domain} not usable: {error}", domain=domain, error=str(exc))
            self._report(domain, exc.kind, str(exc))
            return None
        except Exception as exc:  # never let a fetch problem break delivery
            self.log.failure("MTA-STS fetch for {domain} failed", domain=domain)
            self._report(domain, "sts-policy-fetch-error", str(exc))
            return None
        try:
            await self._blocking(lambda: self.cache.store(policy))
        except OSError as exc:
            self.log.warn("MTA-STS cache for {domain} not written: {error}", domain=domain, error=str(exc))
        self._memory[domain] = policy
        self.log.info("MTA-STS policy of {domain}: mode {mode}, mx {mx}, max_age {max_age}, id {policy_id}",
                      domain=domain, mode=policy.mode, mx=", ".join(policy.mx), max_age=policy.max_age,
                      policy_id=policy_id)
        return policy

    async def _txt_id(self, domain: str) -> str | None:
        strings = await self.txt_lookup(f"_mta-sts.{domain}")
        return parse_txt(strings or [])

    def _report(self, domain: str, kind: str, text: str) -> None:
        if self.report is not None:
            try:
                self.report(domain, kind, text)
            except Exception:
                self.log.failure("TLS-RPT recording failed for {domain}", domain=domain)
