"""Our own ESMTP/LMTP client: one Protocol, one delivery at a time, reusable.

Why not ``twisted.mail.smtp``: see ``TWISTED-MAIL.md`` (no PIPELINING,
CHUNKING, SIZE, DSN or SMTPUTF8, and a dot-stuffing bug at 16 KiB chunk
boundaries that can end DATA early).  This client:

* speaks EHLO (HELO fallback on 5xx) or LHLO (LMTP);
* uses PIPELINING, CHUNKING/BDAT, SIZE, 8BITMIME, BINARYMIME, SMTPUTF8 and
  DSN parameters when the server offers them, and refuses clearly (never a
  silent downgrade) when the message needs an extension the server lacks;
* does opportunistic or mandatory STARTTLS and AUTH PLAIN/LOGIN after TLS;
* reports one :class:`~exmta.model.RecipientResult` per recipient;
* times every wait on the injected clock (RFC 5321 4.5.3.2 defaults);
* dot-stuffs with :class:`exmta.smtp.wire.DotStuffer`, a streaming transform
  that is correct whatever the chunking.

The protocol is driven by coroutines: :meth:`SMTPClientProtocol.establish`
once, then :meth:`SMTPClientProtocol.deliver` once per message, then
:meth:`SMTPClientProtocol.quit`.
"""
from __future__ import annotations

import base64
from collections import deque
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITLSTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from exmta.coroutines import run_coroutine
from exmta.model import (
    Body,
    DeliveryRequest,
    Outcome,
    Recipient,
    RecipientResult,
    Reply,
)
from exmta.smtp.client_replies import (
    ClientError,
    ConnectionLostError,
    ProtocolError,
    ReplyParser,
    ReplyTimeout,
    SessionFailure,
    StaleConnection,
)
from exmta.smtp.client_replies import local_reply as _local_reply
from exmta.smtp.sendnow import plain_tcp, write_now
from exmta.smtp.wire import DotStuffer
from exmta.tls.failures import describe_tls_failure

__all__ = [
    "ClientTimeouts", "ConnectionLostError", "DotStuffer", "ProtocolError", "ReplyParser",
    "ReplyTimeout", "SMTPClientProtocol", "SessionFailure", "StaleConnection",
    "needs_smtputf8", "xtext_encode",
]

CRLF = b"\r\n"
READ_CHUNK = 64 * 1024          # content read size for DATA
BDAT_CHUNK = 128 * 1024         # octets per BDAT command


# ---------------------------------------------------------------- timeouts


@dataclass(frozen=True)
class ClientTimeouts:
    """Seconds to wait for each reply; defaults from RFC 5321 section 4.5.3.2."""

    greeting: float = 300.0
    ehlo: float = 300.0
    starttls: float = 120.0
    auth: float = 120.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    rset: float = 120.0
    quit: float = 30.0

    @classmethod
    def uniform(cls, seconds: float) -> ClientTimeouts:
        """Every phase the same (tests, or a connector that wants one short value)."""
        return cls(*([seconds] * 11))


def _tls_failure(reason: Failure | None, transport: Any) -> str | None:
    """Why a TLS handshake failed (e.g. "certificate has expired"), or None for other losses."""
    if reason is None or transport is None:
        return None
    try:
        handle = transport.getHandle()
    except Exception:
        handle = None
    return describe_tls_failure(reason, handle)


def _endpoints(transport: Any) -> tuple[str, str]:
    """(local, peer) IP addresses of a TCP transport, "" for what is not IP (unix sockets, tests)."""
    out = []
    for get in ("getHost", "getPeer"):
        try:
            out.append(str(getattr(getattr(transport, get)(), "host", "") or ""))
        except Exception:
            out.append("")
    return out[0], out[1]


# ---------------------------------------------------------------- parameters


def xtext_encode(value: str) -> str:
    """RFC 3461 4 xtext: "+" and "=" and bytes outside 33..126 as ``+HH``."""
    out = []
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def needs_smtputf8(request: DeliveryRequest, recipients: Iterable[Recipient] | None = None) -> bool:
    """True when the envelope needs SMTPUTF8 (flagged by the sender or non-ASCII addresses)."""
    env = request.envelope
    if env.params.smtputf8:
        return True
    if not env.sender.isascii():
        return True
    return any(not r.address.isascii() for r in (request.recipients if recipients is None else recipients))


def _angle(address: str) -> str:
    return f"<{address}>"


# ---------------------------------------------------------------- the protocol


_IDLE, _BUSY, _CLOSED = "idle", "busy", "closed"


@implementer(IPushProducer)
class SMTPClientProtocol(Protocol):
    """An ESMTP (or LMTP with ``lmtp=True``) client connection.

    ``establish()`` reads the greeting, says EHLO/LHLO, does STARTTLS and
    AUTH; it errbacks with :class:`SessionFailure` (or a subclass of
    :class:`ClientError`) when the session cannot be used.  ``deliver()``
    sends one message and fires with a result per recipient; it never
    errbacks for remote failures, except :class:`StaleConnection` when a
    reused connection fails its RSET before anything was decided.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        helo_name: str,
        *,
        lmtp: bool = False,
        tls_mode: str = "opportunistic",
        tls_context: Any = None,
        username: str | None = None,
        password: str | None = None,
        timeouts: ClientTimeouts | None = None,
        remote_host: str | None = None,
        protocol_log: Any = None,
        sasl: Any = None,
        tls_verifier: Any = None,
    ) -> None:
        if tls_mode not in ("none", "opportunistic", "mandatory"):
            raise ValueError(f"unknown tls mode {tls_mode!r}")
        self.clock = clock
        self.helo_name = helo_name
        self.lmtp = lmtp
        self.tls_mode = tls_mode
        self.tls_context = tls_context
        self.username = username
        self.password = password
        #: another login instead of PLAIN/LOGIN: ``await sasl.authenticate(self)`` (exmta.smtp.xoauth2)
        self.sasl = sasl
        self.timeouts = timeouts or ClientTimeouts()
        self.remote_host = remote_host
        self.capabilities: dict[str, str] = {}
        self.esmtp = False
        self.tls: str | None = None
        self.authenticated = False
        self.messages_sent = 0
        self.state = _IDLE
        self._parser = ReplyParser()
        self._replies: deque[Reply] = deque()
        self._waiters: deque[tuple[defer.Deferred[Reply], IDelayedCall | None]] = deque()
        self._error: ClientError | None = None
        self._connected = False
        self._paused = False
        self._resume: defer.Deferred[None] | None = None
        self._established = False
        self._needs_rset = False
        self._mail_answered = False
        self.closed: defer.Deferred[None] = defer.Deferred()
        #: the send connector's protocol log (exmta.observe.protocol.ProtocolLog), None when off
        self.protocol_log = protocol_log
        self._plog: Any = None
        self._tcp: list[Any] | None = None  # [the plain TCP connection or None] (exmta.smtp.sendnow)
        #: ``(OpenSSL connection) -> problem or None``, run once TLS is up (MTA-STS/DANE, exmta.tlspolicy)
        self.tls_verifier = tls_verifier
        #: (our address, the peer's address) of the connection; "" when unknown (TLS-RPT reports them)
        self.addresses: tuple[str, str] = ("", "")

    # ------------------------------------------------------------ transport events

    def connectionMade(self) -> None:
        self._connected = True
        self.addresses = _endpoints(self.transport)
        if self.protocol_log is not None:
            self._plog = self.protocol_log.for_transport(self.transport, self.remote_host)

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        try:
            replies = self._parser.feed(data)
        except ProtocolError as exc:
            self.log.warn("Protocol error from {remote}: {reply}", remote=self.remote_host, reply=str(exc.reply))
            self._fail(exc)
            self._abort()
            return
        if self._plog is not None:
            for reply in replies:
                self._plog.reply(reply)
        # queue them all before waking anyone: a waiter resumed by the first
        # reply must see what followed it in the same read (STARTTLS injection)
        self._replies.extend(replies)
        while self._waiters and self._replies:
            self._dispatch(self._replies.popleft())

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._connected = False
        self.state = _CLOSED
        if self._plog is not None:
            self._plog.end()
        if self._error is None:
            truncated = " in the middle of a reply" if self._parser.partial else ""
            why = _tls_failure(reason, self.transport) if self.tls_mode != "none" else None
            self._fail(ConnectionLostError(_local_reply(
                451, "4.4.2", f"{why or 'Connection lost' + truncated} ({self.remote_host or 'remote'})")))
        if self._resume is not None:
            d, self._resume = self._resume, None
            d.callback(None)
        if not self.closed.called:
            self.closed.callback(None)

    # IPushProducer: the transport tells us when its buffer is full
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._resume is not None:
            d, self._resume = self._resume, None
            d.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    # ------------------------------------------------------------ reply plumbing

    def _dispatch(self, reply: Reply) -> None:
        if self._waiters:
            d, timer = self._waiters.popleft()
            if timer is not None and timer.active():
                timer.cancel()
            d.callback(reply)
        else:
            self._replies.append(reply)

    def _fail(self, error: ClientError) -> None:
        if self._error is None:
            self._error = error
        waiters, self._waiters = self._waiters, deque()
        for d, timer in waiters:
            if timer is not None and timer.active():
                timer.cancel()
            d.errback(error)

    def _abort(self) -> None:
        if self.transport is not None and self._connected:
            self.transport.abortConnection()

    def _next_reply(self, timeout: float, phase: str) -> defer.Deferred[Reply]:
        """The next reply in order; errbacks with a ClientError after ``timeout``."""
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self._error is not None:
            return defer.fail(self._error)
        d: defer.Deferred[Reply] = defer.Deferred()

        def expired() -> None:
            self.log.warn("Timeout waiting for {phase} reply from {remote}", phase=phase, remote=self.remote_host)
            self._fail(ReplyTimeout(_local_reply(
                451, "4.4.2", f"Timeout after {timeout:g}s waiting for the {phase} reply"
                f" ({self.remote_host or 'remote'})")))
            self._abort()

        timer = self.clock.callLater(timeout, expired)
        self._waiters.append((d, timer))
        return d

    def _send(self, *lines: str) -> None:
        if self._plog is not None:
            for line in lines:
                self._plog.command(line)
        self._write(b"".join(line.encode("utf-8") + CRLF for line in lines))

    def _write(self, data: bytes) -> None:
        if self._tcp is None:
            self._tcp = [plain_tcp(self.transport)]
        write_now(self.transport, self._tcp[0], data)

    async def _command(self, line: str, timeout: float, phase: str) -> Reply:
        self._send(line)
        return await self._next_reply(timeout, phase)

    # ------------------------------------------------------------ session set-up

    def establish(self) -> defer.Deferred[None]:
        """Greeting, EHLO/LHLO, STARTTLS and AUTH; fires when ready for MAIL."""
        return run_coroutine(self._establish())

    async def _establish(self) -> None:
        try:
            greeting = await self._next_reply(self.timeouts.greeting, "greeting")
            if greeting.code != 220:
                raise SessionFailure(greeting, "greeting", permanent=greeting.is_permanent)
            await self._hello()
            if self.tls_mode != "none":
                await self._starttls()
            if self.sasl is not None:
                await self.sasl.authenticate(self)
                self.authenticated = True
            elif self.username is not None and self.password is not None:
                await self._auth()
        except SessionFailure:
            await self._quietly_quit()
            raise
        self._established = True

    async def _hello(self) -> None:
        verb = "LHLO" if self.lmtp else "EHLO"
        reply = await self._command(f"{verb} {self.helo_name}", self.timeouts.ehlo, verb)
        if reply.code == 250:
            self.esmtp = True
            self.capabilities = self._parse_capabilities(reply)
            return
        if self.lmtp or not reply.is_permanent:
            raise SessionFailure(reply, verb, permanent=False)
        reply = await self._command(f"HELO {self.helo_name}", self.timeouts.ehlo, "HELO")
        if reply.code != 250:
            raise SessionFailure(reply, "HELO", permanent=False)
        self.esmtp = False
        self.capabilities = {}

    @staticmethod
    def _parse_capabilities(reply: Reply) -> dict[str, str]:
        caps: dict[str, str] = {}
        for line in reply.lines[1:]:
            keyword, _, params = line.strip().partition(" ")
            if keyword:
                caps[keyword.upper()] = params.strip()
        return caps

    async def _starttls(self) -> None:
        offered = "STARTTLS" in self.capabilities
        can = ITLSTransport.providedBy(self.transport) and self.tls_context is not None
        if not offered or not can:
            if self.tls_mode == "mandatory":
                why = "does not offer STARTTLS" if not offered else "cannot start TLS here"
                raise SessionFailure(_local_reply(
                    451, "4.7.5", f"TLS is mandatory but the remote server {why}"), "STARTTLS")
            return
        reply = await self._command("STARTTLS", self.timeouts.starttls, "STARTTLS")
        if reply.code != 220:
            if self.tls_mode == "mandatory":
                raise SessionFailure(_local_reply(
                    451, "4.7.5", f"TLS is mandatory but STARTTLS was refused: {reply}"), "STARTTLS")
            self.log.info("STARTTLS refused by {remote}: {reply}; continuing without TLS",
                          remote=self.remote_host, reply=str(reply))
            return
        if self._replies or self._parser.partial:
            # RFC 3207 5: nothing may follow the 220 in plaintext (injection)
            raise SessionFailure(_local_reply(
                451, "4.7.5", "Remote server sent data after STARTTLS 220 (possible injection)"), "STARTTLS")
        self.transport.startTLS(self.tls_context)
        self.capabilities = {}
        try:
            await self._hello()
        except ClientError as exc:
            raise SessionFailure(_local_reply(
                451, "4.7.5", f"TLS negotiation or EHLO after STARTTLS failed: {exc.reply}"), "STARTTLS") from exc
        self.tls = self._describe_tls()
        if self._plog is not None:
            version, _, cipher = self.tls.partition(" ")
            self._plog.tls(version, cipher or None)
        if self.tls_verifier is not None:  # the certificate check of a TLS policy: before any MAIL
            problem = self.tls_verifier(self.transport.getHandle())
            if problem:
                raise SessionFailure(_local_reply(451, "4.7.5", problem), "STARTTLS")

    def _describe_tls(self) -> str:
        try:
            handle = self.transport.getHandle()
            version = handle.get_protocol_version_name()
            cipher = handle.get_cipher_name()
            return f"{version} {cipher}"
        except Exception:  # StringTransport in tests, or an exotic transport
            return "TLS"

    async def _auth(self) -> None:
        mechanisms = set(self.capabilities.get("AUTH", "").upper().split())
        if self.tls is None or not mechanisms:
            # never send credentials in plaintext; the server decides whether it relays anyway
            self.log.info("Not authenticating to {remote} (tls={tls}, mechanisms={mechs})",
                          remote=self.remote_host, tls=self.tls, mechs=sorted(mechanisms))
            return
        assert self.username is not None and self.password is not None
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + self.username.encode() + b"\0" + self.password.encode()).decode()
            reply = await self._command(f"AUTH PLAIN {token}", self.timeouts.auth, "AUTH")
        elif "LOGIN" in mechanisms:
            reply = await self._command("AUTH LOGIN", self.timeouts.auth, "AUTH")
            if reply.code == 334:
                reply = await self._command(base64.b64encode(self.username.encode()).decode(),
                                            self.timeouts.auth, "AUTH")
            if reply.code == 334:
                reply = await self._command(base64.b64encode(self.password.encode()).decode(),
                                            self.timeouts.auth, "AUTH")
        else:
            self.log.info("No usable AUTH mechanism at {remote}: {mechs}",
                          remote=self.remote_host, mechs=sorted(mechanisms))
            return
        if reply.code == 334:  # still challenging us: cancel the exchange (RFC 4954 4)
            reply = await self._command("*", self.timeouts.auth, "AUTH")
        if reply.code != 235:
            # a wrong password is a configuration problem: defer, so fixing it fixes the queue
            raise SessionFailure(_local_reply(
                reply.code if reply.is_transient else 451, "4.7.0",
                f"Authentication failed: {reply}"), "AUTH")
        self.authenticated = True

    async def _quietly_quit(self) -> None:
        if self._connected and self._error is None:
            try:
                await self._command("QUIT", self.timeouts.quit, "QUIT")
            except ClientError:
                pass
        if self._connected and self.transport is not None:
            self.transport.loseConnection()

    # ------------------------------------------------------------ reuse and close

    @property
    def usable(self) -> bool:
        """True when another message may be sent on this connection."""
        return (self._established and self._connected and self._error is None and self.state == _IDLE
                and not self._replies and not self._parser.partial)

    def quit(self) -> defer.Deferred[None]:
        """Say QUIT and close; fires once the connection is closed (bounded by the quit timeout)."""
        return run_coroutine(self._quit_and_wait())

    async def _quit_and_wait(self) -> None:
        await self._quietly_quit()
        if self.closed.called:
            return
        done: defer.Deferred[None] = defer.Deferred()

        def finished(result: object) -> object:
            if not done.called:
                done.callback(None)
            return result

        def expired() -> None:
            self._abort()  # the peer did not finish closing: drop it
            if not done.called:
                done.callback(None)

        self.closed.addBoth(finished)
        timer = self.clock.callLater(self.timeouts.quit, expired)
        await done
        if timer.active():
            timer.cancel()

    # ------------------------------------------------------------ one message

    def deliver(self, request: DeliveryRequest,
                recipients: Sequence[Recipient] | None = None) -> defer.Deferred[list[RecipientResult]]:
        """Send one message to ``recipients`` (default: all of the request's)."""
        return run_coroutine(self._deliver(request, tuple(recipients or request.recipients)))

    def _result(self, rcpt: Recipient | str, outcome: Outcome, reply: Reply) -> RecipientResult:
        address = rcpt if isinstance(rcpt, str) else rcpt.address
        return RecipientResult(address, outcome, reply, remote_host=self.remote_host, tls=self.tls,
                               peer_dsn="DSN" in self.capabilities)

    def _all(self, rcpts: Iterable[Recipient], outcome: Outcome, reply: Reply) -> list[RecipientResult]:
        return [self._result(r, outcome, reply) for r in rcpts]

    @staticmethod
    def _outcome(reply: Reply) -> Outcome:
        if reply.is_positive:
            return Outcome.DELIVERED
        return Outcome.FAILED if reply.is_permanent else Outcome.DEFERRED

    async def _deliver(self, request: DeliveryRequest, rcpts: tuple[Recipient, ...]) -> list[RecipientResult]:
        if not self.usable:
            raise StaleConnection("connection is not ready for a new message")
        self.state = _BUSY
        results: dict[str, RecipientResult] = {}
        reused = self._needs_rset
        self._mail_answered = False
        try:
            if self._needs_rset:
                try:
                    reply = await self._command("RSET", self.timeouts.rset, "RSET")
                except ClientError as exc:
                    raise StaleConnection(str(exc.reply)) from exc
                if reply.code != 250:
                    self._abort()
                    raise StaleConnection(str(reply))
            self._needs_rset = True
            refusal = self._precheck(request, rcpts)
            if refusal is not None:
                return self._all(rcpts, Outcome.FAILED, refusal)
            await self._transaction(request, rcpts, results)
        except ClientError as exc:
            if reused and not self._mail_answered and not results:
                # a cached connection died before the server said anything about this
                # message (an idle timeout racing our MAIL): a fresh connection may work
                raise StaleConnection(str(exc.reply)) from exc
            for r in rcpts:
                results.setdefault(r.address, self._result(r, Outcome.DEFERRED, exc.reply))
        except StaleConnection:
            raise
        except Exception:
            # a bug or an unreadable spool file: the session is in an unknown state, drop it
            self.log.failure("Delivery on {remote} failed unexpectedly", remote=self.remote_host)
            self.state = _CLOSED
            self._abort()
            raise
        finally:
            if self.state == _BUSY:
                self.state = _IDLE if self._connected and self._error is None else _CLOSED
        self.messages_sent += 1
        return [results[r.address] for r in rcpts]

    def _message_size(self, request: DeliveryRequest) -> int | None:
        env = request.envelope
        return env.size or env.params.size or None

    def _precheck(self, request: DeliveryRequest, rcpts: tuple[Recipient, ...]) -> Reply | None:
        """A permanent refusal before MAIL when the server cannot take this message."""
        caps = self.capabilities
        size = self._message_size(request)
        if "SIZE" in caps and size is not None:
            limit = caps["SIZE"].split()[0] if caps["SIZE"] else "0"
            if limit.isdigit() and int(limit) > 0 and size > int(limit):
                return _local_reply(552, "5.3.4",
                                    f"Message size {size} exceeds the limit of {int(limit)} "
                                    f"octets of {self.remote_host or 'the remote server'}")
        if needs_smtputf8(request, rcpts) and "SMTPUTF8" not in caps:
            return _local_reply(553, "5.6.7",
                                f"Message needs SMTPUTF8 (internationalized addresses) but "
                                f"{self.remote_host or 'the remote server'} does not support it")
        body = request.envelope.params.body
        if body is Body.EIGHT_BIT and "8BITMIME" not in caps:
            return _local_reply(554, "5.6.3",
                                f"Message has an 8-bit body but {self.remote_host or 'the remote server'}"
                                " does not support 8BITMIME; not downgraded")
        if body is Body.BINARY and not ("BINARYMIME" in caps and "CHUNKING" in caps):
            return _local_reply(554, "5.6.3",
                                f"Message has a binary body but {self.remote_host or 'the remote server'}"
                                " does not support BINARYMIME with CHUNKING")
        return None

    def _mail_command(self, request: DeliveryRequest, rcpts: tuple[Recipient, ...]) -> str:
        env = request.envelope
        caps = self.capabilities
        parts = [f"MAIL FROM:{_angle(env.sender)}"]
        size = self._message_size(request)
        if "SIZE" in caps and size is not None:
            parts.append(f"SIZE={size}")
        if env.params.body is Body.EIGHT_BIT:
            parts.append("BODY=8BITMIME")
        elif env.params.body is Body.BINARY:
            parts.append("BODY=BINARYMIME")
        if needs_smtputf8(request, rcpts):
            parts.append("SMTPUTF8")
        if "DSN" in caps:
            if env.params.ret:
                parts.append(f"RET={env.params.ret}")
            if env.params.envid:
                parts.append(f"ENVID={xtext_encode(env.params.envid)}")
        return " ".join(parts)

    def _rcpt_command(self, rcpt: Recipient) -> str:
        parts = [f"RCPT TO:{_angle(rcpt.address)}"]
        if "DSN" in self.capabilities:
            if rcpt.notify:
                parts.append("NOTIFY=" + ",".join(rcpt.notify))
            if rcpt.orcpt:
                kind, sep, addr = rcpt.orcpt.partition(";")
                if not sep:
                    kind, addr = "rfc822", rcpt.orcpt
                parts.append(f"ORCPT={kind};{xtext_encode(addr)}")
        return " ".join(parts)

    async def _transaction(self, request: DeliveryRequest, rcpts: tuple[Recipient, ...],
                           results: dict[str, RecipientResult]) -> None:
        pipelining = "PIPELINING" in self.capabilities
        chunking = "CHUNKING" in self.capabilities and self.esmtp
        binary = request.envelope.params.body is Body.BINARY
        mail = self._mail_command(request, rcpts)
        rcpt_lines = [self._rcpt_command(r) for r in rcpts]

        accepted: list[Recipient] = []
        if pipelining:
            lines = [mail, *rcpt_lines] + ([] if chunking else ["DATA"])
            self._send(*lines)
            mail_reply = await self._next_reply(self.timeouts.mail, "MAIL")
            self._mail_answered = True
            for r in rcpts:
                reply = await self._next_reply(self.timeouts.rcpt, "RCPT")
                if not mail_reply.is_positive:
                    results[r.address] = self._result(r, self._outcome(mail_reply), mail_reply)
                elif reply.is_positive:
                    accepted.append(r)
                else:
                    results[r.address] = self._result(r, self._outcome(reply), reply)
            data_reply = None if chunking else await self._next_reply(self.timeouts.data_init, "DATA")
            if data_reply is not None and data_reply.code == 354 and not accepted:
                # RFC 2920 3.1: the server wants data although nobody can take it; end it at once
                self._send(".")
                await self._next_reply(self.timeouts.data_end, "end of data")
            if not accepted:
                await self._rset_after_failure()
                return
            if data_reply is not None and data_reply.code != 354:
                results.update((r.address, self._result(r, self._outcome(data_reply), data_reply))
                               for r in accepted)
                await self._rset_after_failure()
                return
        else:
            mail_reply = await self._command(mail, self.timeouts.mail, "MAIL")
            self._mail_answered = True
            if not mail_reply.is_positive:
                results.update((r.address, self._result(r, self._outcome(mail_reply), mail_reply)) for r in rcpts)
                await self._rset_after_failure()
                return
            for r, line in zip(rcpts, rcpt_lines):
                reply = await self._command(line, self.timeouts.rcpt, "RCPT")
                if reply.is_positive:
                    accepted.append(r)
                else:
                    results[r.address] = self._result(r, self._outcome(reply), reply)
            if not accepted:
                await self._rset_after_failure()
                return
            if not chunking:
                data_reply = await self._command("DATA", self.timeouts.data_init, "DATA")
                if data_reply.code != 354:
                    results.update((r.address, self._result(r, self._outcome(data_reply), data_reply))
                                   for r in accepted)
                    await self._rset_after_failure()
                    return

        content = request.open_content()
        try:
            if chunking:
                final, per_recipient = await self._send_bdat(content, pipelining)
            else:
                if binary:  # unreachable: _precheck refuses binary without CHUNKING
                    raise AssertionError("binary body without CHUNKING")
                await self._send_data(content)
                final = await self._next_reply(self.timeouts.data_end, "end of data")
                per_recipient = True
        finally:
            content.close()

        if self.lmtp and per_recipient:
            # LMTP (RFC 2033 4.2): one reply per accepted recipient, in RCPT order
            results[accepted[0].address] = self._result(accepted[0], self._outcome(final), final)
            for r in accepted[1:]:
                reply = await self._next_reply(self.timeouts.data_end, "end of data")
                results[r.address] = self._result(r, self._outcome(reply), reply)
        else:
            results.update((r.address, self._result(r, self._outcome(final), final)) for r in accepted)

    async def _rset_after_failure(self) -> None:
        try:
            reply = await self._command("RSET", self.timeouts.rset, "RSET")
        except ClientError:
            return
        if reply.is_positive:
            self._needs_rset = False

    async def _wait_writable(self) -> None:
        """Back-pressure: wait (bounded by the data block timeout) while the transport is full."""
        if self._error is not None:
            raise self._error
        if not self._paused:
            return
        d: defer.Deferred[None] = defer.Deferred()
        self._resume = d

        def expired() -> None:
            self._fail(ReplyTimeout(_local_reply(
                451, "4.4.2", f"Timeout after {self.timeouts.data_block:g}s sending data"
                f" ({self.remote_host or 'remote'})")))
            self._abort()
            self.resumeProducing()  # wake the writer, which then sees the error

        timer = self.clock.callLater(self.timeouts.data_block, expired)
        try:
            await d
        finally:
            if timer.active():
                timer.cancel()
        if self._error is not None:
            raise self._error

    async def _send_data(self, content: BinaryIO) -> None:
        stuffer = DotStuffer()
        self.transport.registerProducer(self, True)
        size = 0
        pending = b""  # held back one read: the last piece goes out with the final dot, in one segment
        try:
            while True:
                await self._wait_writable()
                chunk = content.read(READ_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if pending:
                    self._write(pending)
                pending = stuffer.feed(chunk)
            # one send: a separate small ".\r\n" would wait for the peer's delayed ACK (Nagle)
            self._write(pending + stuffer.finish())
            if self._plog is not None:
                self._plog.data(size)
        finally:
            if self._connected:
                self.transport.unregisterProducer()

    async def _send_bdat(self, content: BinaryIO, pipelining: bool) -> tuple[Reply, bool]:
        """BDAT chunks, no dot-stuffing.

        Returns the first reply to LAST and True, or the failure of an
        earlier chunk and False (then no per-recipient LMTP replies follow).
        """
        self.transport.registerProducer(self, True)
        outstanding = 0
        failure: Reply | None = None
        try:
            chunk = content.read(BDAT_CHUNK)
            while True:
                await self._wait_writable()
                following = content.read(BDAT_CHUNK) if chunk else b""
                last = not following
                if self._plog is not None:
                    self._plog.command(f"BDAT {len(chunk)}{' LAST' if last else ''}")
                    self._plog.data(len(chunk), "BDAT")
                self.transport.write(f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode() + chunk)
                if last:
                    break
                outstanding += 1
                if not pipelining:
                    reply = await self._next_reply(self.timeouts.data_block, "BDAT")
                    outstanding -= 1
                    if not reply.is_positive:
                        failure = reply
                        break
                chunk = following
        finally:
            if self._connected:
                self.transport.unregisterProducer()
        while outstanding:
            reply = await self._next_reply(self.timeouts.data_block, "BDAT")
            outstanding -= 1
            if failure is None and not reply.is_positive:
                failure = reply
        if failure is not None and not pipelining:
            # we stopped early without LAST: the transaction is aborted, tidy up
            await self._rset_after_failure()
            return failure, False
        final = await self._next_reply(self.timeouts.data_end, "BDAT LAST")
        if failure is not None:
            return failure, False  # after a failed chunk even LMTP gives one reply to LAST
        return final, True
