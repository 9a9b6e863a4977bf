"""A client for rspamd's native HTTP protocol: ``POST /checkv2`` to its normal worker.

:func:`request_headers` builds the protocol's headers from the SMTP session
(``IP``, ``Helo``, ``From``, one ``Rcpt`` per recipient, ``Queue-Id``,
``User`` for an authenticated sender, ``Hostname`` when the client's name is
known, ``MTA-Name``, TLS details); :func:`parse_verdict` turns rspamd's JSON
answer into a :class:`RspamdVerdict` (sans-IO, both); :class:`RspamdClient`
sends the message with ``twisted.web.client.Agent`` over loopback TCP or a
Unix socket, with a bound on scans in flight, a timeout on the whole scan
(connect, upload and answer) on the injected clock, and a bound on the
answer's size. Every way the scan can fail (refused, reset, slow, an HTTP
status other than 200, an answer that is not rspamd's JSON) is one error,
:class:`RspamdUnavailable`: the filter decides what a failure becomes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping

from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

__all__ = ["ACTIONS", "MAX_ANSWER", "RspamdClient", "RspamdUnavailable", "RspamdVerdict", "SymbolResult",
           "parse_verdict", "request_headers"]

log = Logger()

#: rspamd's actions, in its own words
ACTIONS = ("reject", "soft reject", "rewrite subject", "add header", "greylist", "no action")
MAX_ANSWER = 1024 * 1024  #: a longer answer is not rspamd's (its JSON for a message is a few KiB)
CHUNK = 64 * 1024


class RspamdUnavailable(Exception):
    """The scan did not happen: rspamd refused, closed early, was too slow or answered garbage."""


@dataclass(frozen=True)
class SymbolResult:
    """One rspamd symbol that fired: its name, its score in this message, and its options."""

    name: str
    score: float
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class RspamdVerdict:
    """rspamd's answer for one message (see :func:`parse_verdict`)."""

    action: str
    score: float
    required_score: float
    symbols: tuple[SymbolResult, ...] = ()
    #: (name, value, order) headers rspamd asks to add; order < 0 appends, >= 0 inserts near the top
    add_headers: tuple[tuple[str, str, int], ...] = ()
    #: (name, index) headers rspamd asks to remove: index 0 every occurrence, n the n-th, -n from the end
    remove_headers: tuple[tuple[str, int], ...] = ()
    subject: str | None = None       #: the rewritten subject ("rewrite subject")
    message: str | None = None       #: rspamd's SMTP text for the action (``messages.smtp_message``)
    dkim_signatures: tuple[str, ...] = ()
    skipped: bool = False            #: rspamd did not scan (its settings said so)
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def symbol_names(self) -> list[str]:
        return [s.name for s in self.symbols]


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RspamdUnavailable(f"rspamd answered a {what} that is not a number: {value!r}"[:300])
    return float(value)


def _text(value: Any, limit: int = 4000) -> str:
    return str(value)[:limit]


def _header_adds(block: Any) -> list[tuple[str, str, int]]:
    """``milter.add_headers``: {name: "value" | {"value", "order"} | [those]}."""
    out: list[tuple[str, str, int]] = []
    if not isinstance(block, dict):
        return out
    for name, spec in block.items():
        for item in spec if isinstance(spec, list) else [spec]:
            if isinstance(item, str):
                out.append((str(name), item, -1))
            elif isinstance(item, dict) and isinstance(item.get("value"), str):
                order = item.get("order", -1)
                out.append((str(name), item["value"], order if isinstance(order, int) else -1))
    return out


def _header_removes(block: Any) -> list[tuple[str, int]]:
    """``milter.remove_headers``: {name: index}."""
    if not isinstance(block, dict):
        return []
    return [(str(name), index if isinstance(index, int) and not isinstance(index, bool) else 0)
            for name, index in block.items()]


def parse_verdict(data: bytes) -> RspamdVerdict:
    """rspamd's JSON answer -> RspamdVerdict; RspamdUnavailable when it is not one."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise RspamdUnavailable(f"rspamd answered something that is not JSON: {data[:80]!r}") from e
    if not isinstance(doc, dict):
        raise RspamdUnavailable("rspamd answered JSON that is not an object")
    if doc.get("error"):
        raise RspamdUnavailable(f"rspamd reported an error: {_text(doc['error'], 200)}")
    action = doc.get("action")
    if action not in ACTIONS:
        if doc.get("is_skipped") is True:
            action = "no action"
        else:
            raise RspamdUnavailable(f"rspamd answered an unknown action {action!r}"[:300])
    score = _number(doc.get("score", 0.0), "score")
    required = _number(doc.get("required_score", 0.0), "required score")
    symbols = []
    raw_symbols = doc.get("symbols") or {}
    if not isinstance(raw_symbols, dict):
        raise RspamdUnavailable("rspamd answered symbols that are not an object")
    for key, sym in raw_symbols.items():
        if not isinstance(sym, dict):
            continue
        options = sym.get("options") or []
        symbols.append(SymbolResult(
            _text(sym.get("name", key), 200), _number(sym.get("score", 0.0), f"score for {key}"),
            tuple(_text(o, 200) for o in options) if isinstance(options, list) else ()))
    symbols.sort(key=lambda s: (-abs(s.score), s.name))
    milter = doc.get("milter") or {}
    if not isinstance(milter, dict):
        milter = {}
    messages = doc.get("messages") or {}
    message = messages.get("smtp_message") if isinstance(messages, dict) else None
    subject = doc.get("subject")
    dkim = doc.get("dkim-signature")
    dkim_list = [dkim] if isinstance(dkim, str) else [d for d in dkim if isinstance(d, str)] \
        if isinstance(dkim, list) else []
    return RspamdVerdict(
        action=action, score=score, required_score=required, symbols=tuple(symbols),
        add_headers=tuple(_header_adds(milter.get("add_headers"))),
        remove_headers=tuple(_header_removes(milter.get("remove_headers"))),
        subject=subject if isinstance(subject, str) else None,
        message=_text(message, 400) if isinstance(message, str) else None,
        dkim_signatures=tuple(dkim_list), skipped=doc.get("is_skipped") is True,
        extra={k: v for k, v in doc.items() if k in ("message-id", "time_real")},
    )


def _header_safe(value: Any) -> str:
    """A request header value: one line, printable (an SMTP argument never holds CR or LF, but be sure)."""
    return "".join(c if " " <= c <= "~" else "?" for c in str(value))[:1000]


def request_headers(session: Any, txn: Any, queue_id: str | None, hostname: str,
                    settings_id: str | None = None) -> dict[str, list[str]]:
    """The /checkv2 request headers for one message (rspamd's protocol, as Postfix's milter gives it)."""
    headers: dict[str, list[str]] = {}

    def put(name: str, value: Any) -> None:
        if value is not None and value != "":
            headers.setdefault(name, []).append(_header_safe(value))

    put("IP", getattr(session, "peer_ip", None))
    put("Helo", getattr(session, "helo_name", None))
    put("Hostname", getattr(session, "client_hostname", None))  # only a name this server verified
    sender = getattr(txn, "sender", None)
    put("From", str(sender) if sender is not None and str(sender) else "<>")
    for rcpt, _params in getattr(txn, "recipients", ()):
        put("Rcpt", str(rcpt))
    put("Queue-Id", queue_id)
    put("User", getattr(session, "auth_identity", None))
    put("MTA-Name", hostname)
    tls = getattr(session, "tls", None)
    if tls is not None:
        put("TLS-Version", getattr(tls, "version", None))
        put("TLS-Cipher", getattr(tls, "cipher", None))
    put("Settings-ID", settings_id)
    return headers


@implementer(IBodyProducer)
class _StreamProducer:
    """The message body for the request: chunks from an async iterator, honouring pause/resume."""

    def __init__(self, chunks: AsyncIterator[bytes], length: int) -> None:
        self.chunks = chunks
        self.length = length if length >= 0 else UNKNOWN_LENGTH
        self._paused: Deferred[None] | None = None
        self._stopped = False

    def startProducing(self, consumer: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(self._produce(consumer))

    async def _produce(self, consumer: Any) -> None:
        try:
            async for chunk in self.chunks:
                if self._stopped:
                    raise RspamdUnavailable("the upload was stopped")
                consumer.write(chunk)
                if self._paused is not None:
                    await self._paused
        finally:
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = Deferred()

    def resumeProducing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self._stopped = True
        self.resumeProducing()


class _BoundedBody(Protocol):
    """Collects a response body up to ``limit`` octets; more aborts the connection (not rspamd)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(self._cancel)
        self.transport: Any = None

    def _cancel(self, d: Deferred[bytes]) -> None:
        """Our timeout: drop the connection rather than leave it to rspamd to close."""
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(RspamdUnavailable(f"rspamd's answer passed {self.limit} octets"))
            if self.transport is not None:
                self.transport.stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(RspamdUnavailable(f"rspamd's answer was cut short: {reason.getErrorMessage()}"))


class _EndpointFactory:
    """Agent's endpoint factory: every request goes to rspamd's one endpoint, whatever the URI."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint

    def endpointForURI(self, uri: Any) -> Any:
        return self.endpoint


async def _chunks_of(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), CHUNK):
        yield data[i:i + CHUNK]


class RspamdClient:
    """Scans through rspamd's normal worker with at most ``max_concurrent`` scans in flight.

    ``endpoint`` is a Twisted client endpoint or its string form
    (``tcp:127.0.0.1:11333``, ``unix:/run/rspamd/normal.sock``). Each scan
    must finish within ``timeout`` seconds on ``clock``: connecting, sending
    the message and reading the answer. The wait for a slot is not counted
    (the filter chain's own timeout bounds it).
    """

    def __init__(self, reactor: Any, endpoint: Any, timeout: float = 15.0, max_concurrent: int = 8,
                 clock: Any = None, max_answer: int = MAX_ANSWER, path: str = "/checkv2",
                 agent_factory: Callable[..., Any] | None = None) -> None:
        if isinstance(endpoint, str):
            endpoint = endpoints.clientFromString(reactor, endpoint)
        self.reactor = reactor
        self.endpoint = endpoint
        self.timeout = timeout
        self.clock = clock or reactor
        self.max_answer = max_answer
        self.path = path
        self.semaphore = DeferredSemaphore(max_concurrent)
        # one connection per scan (rspamd answers and closes): no idle connections to expire
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = (agent_factory or Agent.usingEndpointFactory)(reactor, _EndpointFactory(endpoint), pool=pool)

    async def check(self, data: bytes, headers: Mapping[str, list[str]]) -> RspamdVerdict:
        """Scan ``data`` (a whole message)."""
        return await self.check_stream(_chunks_of(data), len(data), headers)

    async def check_stream(self, chunks: AsyncIterator[bytes], length: int,
                           headers: Mapping[str, list[str]]) -> RspamdVerdict:
        """Scan what ``chunks`` yields (``length`` octets in all); RspamdUnavailable when the scan fails."""
        await self.semaphore.acquire()
        try:
            d = Deferred.fromCoroutine(self._check(chunks, length, headers))
            d.addTimeout(self.timeout, self.clock)
            try:
                return await d
            except (TimeoutError, CancelledError) as e:
                raise RspamdUnavailable(f"rspamd did not answer within {self.timeout:g} s") from e
        finally:
            self.semaphore.release()

    async def _check(self, chunks: AsyncIterator[bytes], length: int,
                     headers: Mapping[str, list[str]]) -> RspamdVerdict:
        raw = Headers({k.encode("ascii"): [v.encode("ascii", "replace") for v in vs] for k, vs in headers.items()})
        raw.setRawHeaders(b"Content-Type", [b"message/rfc822"])
        producer = _StreamProducer(chunks, length)
        try:
            response = await self.agent.request(b"POST", b"http://rspamd" + self.path.encode("ascii"), raw,
                                                producer)
        except (CancelledError, RspamdUnavailable):
            raise
        except Exception as e:
            if any(isinstance(r, Failure) and r.check(CancelledError) for r in getattr(e, "reasons", ())):
                raise CancelledError() from e  # our own timeout cancelled it (ResponseNeverReceived wraps that)
            raise RspamdUnavailable(f"rspamd request failed: {_describe(e)}") from e
        body = _BoundedBody(self.max_answer)
        response.deliverBody(body)
        data = await body.done
        if response.code != 200:
            raise RspamdUnavailable(f"rspamd answered HTTP {response.code}: {data[:120]!r}")
        return parse_verdict(data)


def _describe(e: Exception) -> str:
    """A short reason, including the wrapped failures of twisted.web's ResponseFailed and friends."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons if isinstance(r, Failure))[:300] or repr(e)
    return (str(e) or repr(e))[:300]

