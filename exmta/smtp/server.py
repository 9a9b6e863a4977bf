"""The ESMTP server protocol: a thin Twisted adapter over :mod:`exmta.smtp.wire`.

One command at a time. While a command waits for a Deferred (policy,
filters, the store) the transport is paused and further input stays in the
parser's buffer, so replies come out strictly in command order and the
state a command sees is the state every earlier command left (RFC 2920;
compare twisted#8126). Replies to a pipelined group are buffered and
flushed when the parser needs more input.

Content is streamed into ``store.open_writer()`` as it arrives and the
``250 ... queued as`` reply is written only after ``store.commit()`` fired.
Internal errors answer ``451 4.3.0``, never 5xx. On STARTTLS every buffered
plaintext byte is discarded and the session is reset (RFC 3207 4.2,
CVE-2011-0411).

The session is also a push producer for its own transport: when the client
does not read its replies, command processing stops until they drain.
At end of data, before the filters: a mail-loop check (Received count) and
Exchange's header firewall for sessions without relay rights.
"""
from __future__ import annotations

import dataclasses
import email.utils
import functools
import ipaddress
import random
import re
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from exmta.config.schema import ReceiveConnectorConfig
from exmta.filters.base import FilterChain, MessageView, call_hook
from exmta.interfaces import IMessageTracker, IQueueStore, IReceivePolicy
from exmta.model import (
    Action, Address, Body, Envelope, Recipient, Reply, Session, TLSInfo, TrackingEvent,
    TrackingEventId, Transaction, Verdict,
)
from exmta.queue.errors import StoreUnavailable
from exmta.queue.nospace import out_of_space
from exmta.smtp import replies
from exmta.smtp.backscatter import anonymous, forged_sender, narrow_mail, narrow_rcpt
from exmta.smtp.limits import HEADER_TOO_BIG, RefusedRecipients, header_refusal, too_many_refused
from exmta.smtp.params import ParamError, parse_mail, parse_rcpt
from exmta.smtp.sendnow import plain_tcp, write_now
from exmta.smtp.wire import (
    INVALID_BARE_NEWLINE, INVALID_TOO_LONG, ChunkEnd, Command, DataChunk, DataEnd,
    InvalidLine, Mode, ServerParser,
)

__all__ = ["ESMTPServer", "ESMTPServerFactory"]

_BDAT_ARG = re.compile(r"([0-9]{1,20})(?: +(LAST))?\Z", re.IGNORECASE)
#: verbs that betray an HTTP or other non-SMTP client talking to us: close at once
_UNSET = object()
_MAX_AHEAD = 64 * 1024  # octets read ahead of a pending command before the socket is paused
_IDS_LOGGED = 10  # queue ids named in a session's end line
_NON_SMTP = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS"})
_KNOWN_VERBS = frozenset({
    "EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "HELP", "STARTTLS", "AUTH",
})
_NOT_IMPLEMENTED = frozenset({"EXPN", "ETRN", "TURN", "ATRN", "SEND", "SOML", "SAML", "AUTH"})


#: Exchange's header firewall: organisation, forest and hybrid attribution headers are only
#: believed from trusted peers (EXCHANGE.md section 5)
FIREWALLED_HEADER_PREFIXES = ("X-MS-Exchange-Organization-", "X-MS-Exchange-Forest-", "X-MS-Exchange-CrossPremises-")


def _clean_header_value(value: Any) -> str | None:
    """A header value as valid text: raw 8-bit octets (surrogate escapes) become UTF-8 or U+FFFD."""
    if value is None:
        return None
    text = re.sub(r"\r?\n(?=[ \t])", "", str(value)).strip()  # RFC 5322 unfolding
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _no_local_domains(domain: str) -> bool:
    return False


def _untrusted(session: Session) -> bool:
    return False


def _default_reply(verdict: Verdict) -> Reply:
    if verdict.reply is not None:
        return verdict.reply
    if verdict.action is Action.REJECT:
        return Reply.make(550, "5.7.1", "Rejected")
    if verdict.action is Action.DISCONNECT:
        return Reply.make(421, "4.7.0", "Closing connection")
    return Reply.make(451, "4.7.1", "Try again later")


def _printable(text: str, utf8: bool = False) -> str:
    """Text safe for a header field: printable, no CR/LF; ASCII unless the message is SMTPUTF8."""
    if text.isprintable() and (utf8 or text.isascii()):
        return text  # the usual case, without a Python loop over the characters
    return "".join(c if c.isprintable() and (utf8 or c.isascii()) else "?" for c in text)


@functools.lru_cache(maxsize=4)  # a new string once a second, not once per message
def _header_date(second: int) -> str:
    """The RFC 5322 date of the Received header, local time (seconds resolution)."""
    return email.utils.formatdate(second, localtime=True)


@functools.lru_cache(maxsize=4096)  # once per message, with the same few peers
def _address_literal(peer_ip: str) -> str:
    """The peer as an address literal for the Received header: ``[192.0.2.1]``, ``[IPv6:2001:db8::1]``."""
    try:
        ip = ipaddress.ip_address(peer_ip)
    except ValueError:
        return f"[{_printable(peer_ip) or 'unknown'}]"
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


@implementer(IPushProducer)
class ESMTPServer(Protocol):
    """One SMTP session. Built by :class:`ESMTPServerFactory`; all collaborators come from it."""

    log = Logger()
    #: how long a receive policy call may take before the command gets 451 4.3.0
    policy_timeout = 60.0
    #: NOOP/RSET/VRFY/HELP commands allowed before each one counts as an error
    JUNK_COMMAND_LIMIT = 100
    #: extra octets MAIL/RCPT lines may have for SIZE, DSN and AUTH parameters (RFC 3461 5, RFC 4954 5)
    PARAMETER_ALLOWANCE = 1024

    def __init__(self, factory: ESMTPServerFactory) -> None:
        self.factory = factory
        self.config = factory.config
        self.clock = factory.clock
        cfg = self.config
        self.parser = ServerParser(
            max_command_line=cfg.max_command_line,
            max_text_line=cfg.max_text_line,
            bare_newline=cfg.bare_lf,
            max_message_size=cfg.max_message_size,
            parameter_allowance=self.PARAMETER_ALLOWANCE,
        )
        self.session: Session | None = None
        self.txn: Transaction | None = None
        self.tls_active = getattr(factory, "implicit_tls", False)  # implicit TLS (465)
        self.errors = 0
        self.messages = 0
        self._junk_commands = 0
        #: 5xx RCPT replies: tarpit, then 421 past the limit (exmta.smtp.limits)
        self._refused_rcpts = RefusedRecipients(cfg.max_refused_recipients, cfg.refused_recipients_tarpit_after,
                                                cfg.refused_recipients_tarpit)
        self._verbs: dict[str, int] = {}  # per-verb counts for the end-of-session log line
        self._queued_ids: list[str] = []  # the first _IDS_LOGGED queue ids, for the same line
        self._writer: Any = None
        self._txn_uses_bdat = False
        self._txn_discard = False
        self._write_failed: bool | Reply = False  # or the reply for a full spool
        self._bdat_last = False
        self._bdat_refusal: Reply | None = None  # the reply for a BDAT chunk being swallowed
        self._out: list[bytes] = []
        self._busy = False
        self._processing = False
        self._paused = False
        self._write_blocked = False
        self._producer_registered = False
        self._closing = False
        self._disconnected = False
        self._timer: IDelayedCall | None = None
        self._tcp: Any = _UNSET  # the plain TCP connection for write_now (exmta.smtp.sendnow), found once
        self._deadline = 0.0  # when the client's current timeout runs out (exmta.smtp.server._arm_timer)
        self._line_started: float | None = None  # first octet of the command line still incomplete
        self._data_deadline: float | None = None  # DATA/BDAT must be in by then (grows with min_data_rate)
        self._sasl: Any = None  # the SASL mechanism of an AUTH exchange in progress (exmta.auth.smtp)
        self.auth_avatar: Any = None  # the ISubmitter of a successful AUTH (identity, send-as grants)
        self._plog: Any = None  # protocol log transcript (exmta.observe.protocol), None when off

    # ------------------------------------------------------------ connection

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        host = self.transport.getHost()
        now = self.clock.seconds()
        self.session = Session(
            peer_ip=getattr(peer, "host", "") or "",
            peer_port=getattr(peer, "port", 0) or 0,
            local_ip=getattr(host, "host", "") or "",
            local_port=getattr(host, "port", 0) or 0,
            connector=self.config.name,
            session_id=f"{random.getrandbits(48):012x}",  # a log key, not a secret: no getrandom() call
            started=now,
        )
        self.factory.sessions.add(self)
        self._observe("session_opened")
        if self.factory.protocol_log is not None:
            self._plog = self.factory.protocol_log.for_server(self.session)
        register = getattr(self.transport, "registerProducer", None)
        if register is not None:
            try:
                register(self, True)
                self._producer_registered = True
            except RuntimeError:
                pass  # somebody else produces into this transport: no write back-pressure then
        # no "session start" line: the end line names the peer (one log line per session)
        if self.factory.shutting_down:
            self._close(replies.shutting_down(self.config.hostname))
            return
        self._run(self._on_connect)

    async def _on_connect(self) -> None:
        assert self.session is not None
        try:
            verdict = await self._policy("check_connect", self.session)
            if verdict.action in (Action.CONTINUE, Action.ACCEPT, Action.DISCARD):
                verdict = await self.factory.filters.on_connect(self.session)
                self._track_agent("connect", verdict)
        except Exception:
            self.log.failure("session {session_id}: connect check failed", session_id=self._sid)
            self._close(Reply.make(421, "4.3.0", f"{self.config.hostname} Error: internal error, try again later"))
            return
        if verdict.action in (Action.REJECT, Action.TEMPFAIL, Action.DISCONNECT):
            reply = _default_reply(verdict)
            # a refused connection gets 554 or 421 (RFC 5321 3.1), then we close
            code = 554 if reply.is_permanent else 421
            self._close(Reply(code, reply.status, reply.lines))
            return
        if verdict.action is Action.DISCARD:
            self.log.warn("DISCARD at connect ignored, session {session_id}", session_id=self._sid)
        self._reply(replies.greeting(self.config.hostname, self.config.banner))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._disconnected = True
        self._closing = True
        self._cancel_timer()
        if self.tls_active and self.factory.tls_gate is not None:
            self.factory.tls_gate.connection_lost(self, reason)  # logs a failed handshake
        if self._writer is not None:
            self.log.info(
                "session {session_id}: client left during a transaction, message {queue_id} discarded",
                session_id=self._sid, queue_id=getattr(self._writer, "queue_id", None),
            )
        self._abort_writer()
        self.txn = None
        self.parser.discard_buffer()
        if self.session is not None:
            queued = " ".join(self._queued_ids)
            if self.messages > len(self._queued_ids):
                queued += f" +{self.messages - len(self._queued_ids)} more"
            fields = dict(
                session_id=self._sid, duration=self.clock.seconds() - self.session.started,
                messages=self.messages, queued=f" queued ({queued})" if queued else "", errors=self.errors,
                peer_ip=self.session.peer_ip, peer_port=self.session.peer_port, connector=self.config.name,
                commands=" ".join(f"{verb.lower()}={n}" for verb, n in self._verbs.items()) or "no commands",
            )
            # rendered here (an f-string) rather than by the log observer's str.Formatter, which cost
            # more than the rest of the session's teardown; the fields stay in the event
            text = (f"session {fields['session_id']} end after {fields['duration']:.3f}s: "
                    f"{fields['peer_ip']}:{fields['peer_port']} on {fields['connector']}, "
                    f"{fields['messages']} message(s){fields['queued']}, {fields['errors']} error(s), "
                    f"{fields['commands']}")
            if self._refused_rcpts.count:  # one summary instead of a line per refusal (issue 11 item 7)
                fields["refused_recipients"] = self._refused_rcpts.count
                text += f", {self._refused_rcpts.count} refused recipient(s)"
            self.log.info(text.replace("{", "{{").replace("}", "}}"), session_end=True, **fields)
        if self._plog is not None:
            self._plog.end()
        self.factory._session_closed(self)

    @property
    def _sid(self) -> str:
        return self.session.session_id if self.session else ""

    # ------------------------------------------------------------ input loop

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._data_deadline is not None and self.config.min_data_rate:  # each octet buys 1/rate s
            self._data_deadline += len(data) / self.config.min_data_rate
        self.parser.feed(data)
        if not self._busy:
            self._process()  # (which re-arms the timer when it is done)
        elif self.parser.buffered() > _MAX_AHEAD:
            self._update_reading()

    def _process(self) -> None:
        """Turn buffered input into events until a command must wait or input runs out."""
        if self._processing:
            return
        self._processing = True
        try:
            while not self._busy and not self._write_blocked and not self._closing:
                event = self.parser.next_event()
                if event is None:
                    break
                self._dispatch(event)
        finally:
            self._processing = False
        if not self._busy and not self._closing:
            self._flush()
            self._arm_timer()

    def _dispatch(self, event: Any) -> None:
        if self._plog is not None and not isinstance(event, DataChunk):
            self._log_event(event)
        if isinstance(event, DataChunk):
            self._write_content(event.data)
            return
        self._line_started = None  # a line is complete: the next one has its own deadline
        if isinstance(event, Command):
            self._run(self._command, event)
        elif isinstance(event, DataEnd):
            self._run(self._data_end, event)
        elif isinstance(event, ChunkEnd):
            self._run(self._chunk_end, event)
        elif isinstance(event, InvalidLine):
            self._invalid_line(event)

    def _run(self, handler: Callable[..., Any], *args: Any) -> None:
        """Run a (possibly async) handler; while it is pending, input waits and the transport is paused."""
        self._busy = True
        d = call_hook(handler, *args)
        if not d.called:
            self._cancel_timer()  # no command timeout while it is pending (re-armed when it is done)
        d.addErrback(self._handler_failed)
        d.addBoth(self._handler_done)
        self._update_reading()

    def _handler_failed(self, failure: Failure) -> None:
        self.log.failure("session {session_id}: internal error", failure, session_id=self._sid)
        if self._writer is not None:
            self._reset_transaction()  # a message half received cannot be trusted any more
        self._reply(replies.INTERNAL_ERROR)

    def _handler_done(self, _: Any) -> None:
        self._busy = False
        self._update_reading()
        if not self._processing:
            self._process()

    def _update_reading(self) -> None:
        """Stop reading while the client does not read our replies, or when a command is pending and
        more than _MAX_AHEAD octets wait behind it. (A pending command alone does not stop the
        socket: input waits in the parser, and the common wait, a commit at end of data, costs no
        pair of epoll_ctl calls.)"""
        want_pause = ((self._busy and self.parser.buffered() > _MAX_AHEAD) or self._write_blocked) \
            and not self._closing
        if want_pause and not self._paused:
            pause = getattr(self.transport, "pauseProducing", None)
            if pause is not None:
                self._paused = True
                pause()
        elif not want_pause and self._paused:
            self._paused = False
            if not self._closing:  # after loseConnection there is nothing to read any more
                self.transport.resumeProducing()

    # IPushProducer, registered with our own transport: it pauses us when replies pile up unread
    # (a client pipelining without reading), so input stops being processed until they drain.

    def pauseProducing(self) -> None:
        self._write_blocked = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._write_blocked = False
        self._update_reading()
        if not self._processing and not self._busy:
            self._process()

    def stopProducing(self) -> None:
        self._write_blocked = False

    def _log_event(self, event: Any) -> None:
        if isinstance(event, Command):
            self._plog.command(event.raw)
        elif isinstance(event, (DataEnd, ChunkEnd)):
            self._plog.data(event.size, "DATA" if isinstance(event, DataEnd) else "BDAT")
        elif isinstance(event, InvalidLine):
            self._plog.command(event.raw, invalid=event.reason)

    # ------------------------------------------------------------ output

    def _reply(self, reply: Reply) -> None:
        if self._closing:
            return
        if self._plog is not None:
            self._plog.reply(reply)
        if reply.code == 535:  # RFC 4954: authentication credentials invalid
            self._observe("auth_failed")
        self._out.append(reply.to_bytes())

    def _flush(self) -> None:
        if self._out and not self._disconnected:
            data = b"".join(self._out)
            self._out.clear()
            if self._tcp is _UNSET:
                self._tcp = plain_tcp(self.transport)
            write_now(self.transport, self._tcp, data)

    def _close(self, reply: Reply | None) -> None:
        """Send ``reply`` (after any buffered ones) and close. Input left over is dropped."""
        if self._closing:
            return
        if reply is not None:
            if self._plog is not None:
                self._plog.reply(reply)
            self._out.append(reply.to_bytes())
        self._flush()
        self._closing = True
        self._cancel_timer()
        self._abort_writer()
        self.txn = None
        self.parser.discard_buffer()
        if not self._disconnected:
            if self._producer_registered:
                self._producer_registered = False
                self.transport.unregisterProducer()  # so the transport closes once our replies are out
            self.transport.loseConnection()

    def _error(self, reply: Reply) -> None:
        """A protocol error: reply, count, and close after too many."""
        self.errors += 1
        self._reply(reply)
        if self.errors >= self.config.max_errors:
            self.log.info(
                "session {session_id}: too many errors ({errors}), closing",
                session_id=self._sid, errors=self.errors,
            )
            self._close(replies.too_many_errors(self.config.hostname))

    # ------------------------------------------------------------ timers

    def _arm_timer(self) -> None:
        """The client has until ``self._deadline``. The timer is not moved on each command
        (that was a reactor reschedule per line): it fires at its old time, sees the later
        deadline and sleeps again for the rest, unless the deadline came nearer.

        A command line must be complete ``command_timeout`` after its first octet, however
        slowly it drips in (Postfix's smtpd_per_request_deadline); DATA (or one BDAT chunk)
        must be complete ``data_timeout`` + octets / ``min_data_rate`` after it began."""
        if self._closing or self._busy:
            return
        now = self.clock.seconds()
        if self.parser.mode is Mode.COMMAND:
            self._data_deadline = None
            if self.parser.buffered():
                if self._line_started is None:
                    self._line_started = now
                self._deadline = self._line_started + self.config.command_timeout
            else:
                self._line_started = None
                self._deadline = now + self.config.command_timeout
        else:
            if self._data_deadline is None:
                self._data_deadline = now + self.config.data_timeout
            self._deadline = now + self.config.data_timeout
            if self.config.min_data_rate:
                self._deadline = min(self._deadline, self._data_deadline)
        delay = max(0.0, self._deadline - now)
        timer = self._timer
        if timer is None or not timer.active():
            self._timer = self.clock.callLater(delay, self._timer_fired)
        elif timer.getTime() > self._deadline:
            timer.reset(delay)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timer_fired(self) -> None:
        left = self._deadline - self.clock.seconds()
        if left > 0:
            self._timer = self.clock.callLater(left, self._timer_fired)
            return
        self._timed_out()

    def _observe(self, event: str, *args: Any) -> None:
        """Tell the factory's session observer (metrics) ``event``(connector, *args); never raises."""
        observer = self.factory.session_observer
        if observer is not None:
            try:
                getattr(observer, event)(self.config.name, *args)
            except Exception:
                self.log.failure("session observer failed on {event}", event=event)

    def _timed_out(self) -> None:
        self._timer = None
        self._observe("session_timed_out")
        self.log.info("session {session_id}: timeout in {mode} mode", session_id=self._sid,
                      mode=self.parser.mode.value)
        self._close(replies.timeout(self.config.hostname))

    # ------------------------------------------------------------ shutdown

    def shutdown_requested(self) -> None:
        """The server is stopping: close now when idle, else at the end of the transaction."""
        if not self._busy and self.txn is None and self.parser.mode is Mode.COMMAND and not self.parser.buffered():
            self._close(replies.shutting_down(self.config.hostname))

    def force_close(self) -> None:
        """The grace period is over: 421 and close whatever is going on."""
        self._close(replies.shutting_down(self.config.hostname))

    # ------------------------------------------------------------ helpers

    def _policy(self, method: str, *args: Any) -> Deferred[Verdict]:
        d = call_hook(getattr(self.factory.policy, method), *args)
        if not d.called:  # a synchronous answer needs no timer
            d.addTimeout(self.policy_timeout, self.clock)
        return d

    def _refused(self, verdict: Verdict) -> bool:
        """Send the reply for a refusing verdict; True when the command is refused."""
        if verdict.action in (Action.CONTINUE, Action.ACCEPT, Action.DISCARD):
            return False
        reply = _default_reply(verdict)
        if verdict.action is Action.DISCONNECT:
            self._close(reply)
        else:
            self._reply(reply)
        return True

    def _abort_writer(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.abort()
            except Exception:
                self.log.failure("session {session_id}: writer.abort failed", session_id=self._sid)

    def _reset_transaction(self) -> None:
        self._abort_writer()
        self.txn = None
        self._txn_uses_bdat = False
        self._txn_discard = False
        self._write_failed = False
        self._bdat_last = False

    def _write_content(self, data: bytes) -> None:
        if self._writer is None or self._write_failed:
            return
        try:
            self._writer.write(data)
        except Exception as e:
            self._write_failed = self._storage_error(e, "writing the message failed")  # the reply at the end

    def _storage_error(self, error: BaseException, what: str) -> Reply:
        """A full spool (ENOSPC, EDQUOT) is 452 4.3.1 and a warning; the queue's database away is 451 and a
        warning; anything else 451 and a traceback."""
        if isinstance(error, StoreUnavailable):
            self.log.warn("session {session_id}: {what}: {error}", session_id=self._sid, what=what, error=error)
            return replies.QUEUE_UNAVAILABLE
        if out_of_space(error):
            self.log.warn("session {session_id}: {what}: the spool is out of space ({error})",
                          session_id=self._sid, what=what, error=error)
            return replies.INSUFFICIENT_STORAGE
        self.log.failure("session {session_id}: {what}", failure=Failure(error), session_id=self._sid, what=what)
        return replies.INTERNAL_ERROR

    def _invalid_line(self, event: InvalidLine) -> None:
        if self._sasl is not None or event.raw[:5].upper() == b"AUTH ":
            # a bad line ends an AUTH exchange; its content may be a secret, so it is not logged
            event = dataclasses.replace(event, raw=b"<AUTH data>" if self._sasl is not None else event.raw[:4])
            self._sasl = None
        self.log.debug("session {session_id}: invalid line ({reason}): {raw!r}",
                       session_id=self._sid, reason=event.reason, raw=event.raw)
        if event.reason == INVALID_TOO_LONG:
            self._error(replies.LINE_TOO_LONG)
        elif event.reason == INVALID_BARE_NEWLINE:
            self._error(replies.BARE_NEWLINE_COMMAND)
        else:
            self._error(replies.BAD_CHARACTERS)

    # ------------------------------------------------------------ commands

    def _fill_tls_info(self) -> None:
        """Record the negotiated TLS version and cipher once the handshake is done (first command over TLS)."""
        assert self.session is not None
        get_handle = getattr(self.transport, "getHandle", None)
        try:
            conn = get_handle() if get_handle is not None else None
            version = conn.get_protocol_version_name() if conn is not None else None
            cipher = conn.get_cipher_name() if conn is not None else None
        except Exception:
            version = cipher = None
        if not version or not cipher:
            return
        subject = None
        try:
            cert = conn.get_peer_certificate()
            if cert is not None:
                subject = cert.to_cryptography().subject.rfc4514_string()  # X509.get_subject is deprecated
        except Exception:
            subject = None
        self.session.tls = TLSInfo(version, cipher, subject)
        self._observe("tls_started", version)
        if self._plog is not None:
            self._plog.tls(version, cipher, subject)
        self.log.info("session {session_id}: TLS {tls_version} {tls_cipher}", session_id=self._sid,
                      tls_version=version, tls_cipher=cipher)

    async def _command(self, cmd: Command) -> None:
        if self._sasl is not None:  # a response line of an AUTH exchange, not a command
            await self.factory.authenticator.response(self, cmd.raw)
            return
        verb = cmd.verb
        key = verb if verb in _KNOWN_VERBS else "unknown"
        self._verbs[key] = self._verbs.get(key, 0) + 1
        if self.tls_active and self.session is not None and self.session.tls is None:
            self._fill_tls_info()
            if self.session.tls is not None and self.factory.tls_gate is not None:
                self.factory.tls_gate.handshake_done(self)  # client certificate check (exmta.tls.verify)
        if self.factory.shutting_down and self.txn is None and verb != "QUIT":
            self._close(replies.shutting_down(self.config.hostname))
            return
        handler = getattr(self, f"smtp_{verb}", None) if verb.isalpha() else None
        if handler is not None:
            await handler(cmd.argument)
        elif verb in _NON_SMTP:
            self.log.info("session {session_id}: non-SMTP command {verb}", session_id=self._sid, verb=verb)
            self._close(replies.non_smtp_command())
        elif verb in _NOT_IMPLEMENTED:
            self._error(replies.NOT_IMPLEMENTED)
        else:
            self._error(replies.UNKNOWN_COMMAND)

    def _extensions(self) -> list[str]:
        limit = self.config.max_message_size
        exts = ["PIPELINING", f"SIZE {limit}" if limit else "SIZE"]
        if self.factory.tls_context_factory is not None and not self.tls_active:
            exts.append("STARTTLS")
        exts += ["ENHANCEDSTATUSCODES", "8BITMIME", "BINARYMIME", "CHUNKING", "DSN", "SMTPUTF8"]
        if self.factory.authenticator is not None:  # AUTH only over TLS unless the connector allows it
            exts += self.factory.authenticator.ehlo_keywords(self)
        disabled = self.factory.disabled_extensions
        return [e for e in exts if e.split(" ", 1)[0] not in disabled]

    async def _helo(self, argument: str, esmtp: bool) -> None:
        assert self.session is not None
        name = argument.strip()
        if not name:
            self._error(replies.EHLO_SYNTAX if esmtp else replies.HELO_SYNTAX)
            return
        self._reset_transaction()  # RFC 5321 4.1.4: EHLO/HELO imply RSET
        self.session.helo_name = name
        self.session.esmtp = esmtp
        verdict = await self.factory.filters.on_helo(self.session)
        self._track_agent("helo", verdict)
        if self._refused(verdict):
            self.session.helo_name = None
            self.session.esmtp = False
            return
        if esmtp:
            self._reply(replies.ehlo_ok(self.config.hostname, self._extensions()))
        else:
            self._reply(replies.helo_ok(self.config.hostname))

    async def smtp_EHLO(self, argument: str) -> None:
        await self._helo(argument, True)

    async def smtp_HELO(self, argument: str) -> None:
        await self._helo(argument, False)

    async def smtp_MAIL(self, argument: str) -> None:
        assert self.session is not None
        if self.session.helo_name is None:
            self._error(replies.NEED_HELO)
            return
        if self.txn is not None:
            self._error(replies.NESTED_MAIL)
            return
        if self.factory.tls_gate is not None:  # require_tls, partner certificates (exmta.tls.verify)
            refusal = self.factory.tls_gate.check_mail(self)
            if refusal is not None:
                self._reply(refusal)
                return
        try:
            sender, params = parse_mail(
                argument, esmtp=self.session.esmtp,
                binarymime="BINARYMIME" not in self.factory.disabled_extensions,
            )
        except ParamError as e:
            self._error(e.reply)
            return
        if params.auth is not None and self.session.auth_identity is None:
            # RFC 4954 5: an AUTH= from a client we did not authenticate is not passed on
            params = dataclasses.replace(params, auth="<>")
        if self.factory.authenticator is not None:  # send-as: 550 5.7.60 (exmta.auth.smtp)
            refusal, params = self.factory.authenticator.check_mail(self, sender, params)
            if refusal is not None:
                # send-as at MAIL: a REJECT event, as at end of data
                self._track_refusal(TrackingEventId.REJECT, Transaction(sender, params), None, refusal,
                                    "send-as: sender not granted")
                self._reply(refusal)
                return
        limit = self.config.max_message_size
        if limit and params.size is not None and params.size > limit:
            self._reply(replies.size_declared_too_big(limit))
            return
        verdict = await self._policy("check_mail", self.session, sender, params)
        if self._refused(verdict):
            return
        discard = verdict.action is Action.DISCARD
        verdict = await self.factory.filters.on_mail(self.session, sender, params)
        self._track_agent("mail", verdict, sender=str(sender))
        if self._refused(verdict):
            return
        self._reset_transaction()
        if anonymous(self.session, self.factory):
            params = narrow_mail(params)  # RET=HDRS for unverified senders (exmta.smtp.backscatter)
        self.txn = Transaction(sender, params)
        self._txn_discard = discard or verdict.action is Action.DISCARD
        self._reply(replies.SENDER_OK)

    def _is_postmaster(self, rcpt: Address) -> bool:
        if rcpt.local.lower() != self.factory.postmaster.lower():
            return False
        return not rcpt.domain or self.factory.local_domain(rcpt.domain_key)

    async def smtp_RCPT(self, argument: str) -> None:
        assert self.session is not None
        txn = self.txn
        if txn is None:
            self._error(replies.NEED_MAIL)
            return
        if self._txn_uses_bdat:
            self._error(replies.BAD_SEQUENCE)
            return
        try:
            rcpt, params = parse_rcpt(argument, smtputf8=txn.params.smtputf8, esmtp=self.session.esmtp)
        except ParamError as e:
            self._error(e.reply)
            return
        if len(txn.recipients) >= self.config.max_recipients:
            self._reply(replies.TOO_MANY_RECIPIENTS)
            return
        if not self._is_postmaster(rcpt):
            verdict = await self._policy("authorize_rcpt", self.session, txn.view(), rcpt, params)
            if verdict.action is Action.CONTINUE:
                verdict = Verdict(Action.REJECT, replies.RELAY_DENIED)  # default deny
            if self._refused(verdict):  # relay denied, unknown user, ...
                await self._rcpt_refused(verdict, txn, rcpt, "policy")
                return
            discard = verdict.action is Action.DISCARD
            verdict = await self.factory.filters.on_rcpt(self.session, txn.view(), rcpt, params)
            self._track_agent("rcpt", verdict, sender=str(txn.sender), rcpt=rcpt)
            if self._refused(verdict):
                await self._rcpt_refused(verdict, txn, rcpt, "filter", verdict.filter_name)
                return
            if discard or verdict.action is Action.DISCARD:
                self._txn_discard = True
        if self.txn is not txn:  # the session was reset while we waited (cannot happen today)
            self._reply(replies.INTERNAL_ERROR)
            return
        if anonymous(self.session, self.factory):
            params = narrow_rcpt(params)  # no NOTIFY=SUCCESS for unverified senders
        key = (rcpt.local, rcpt.domain_key)
        if all((a.local, a.domain_key) != key for a, _ in txn.recipients):
            txn.recipients.append((rcpt, params))  # a repeated recipient is accepted once
        self._reply(replies.RCPT_OK)

    async def _rcpt_refused(self, verdict: Verdict, txn: Transaction, rcpt: Address, why: str,
                            filter_name: str | None = None) -> None:
        """After a refused RCPT: track it (the first few), count a 5xx, tarpit or close past the limits."""
        reply = _default_reply(verdict)
        counter = self._refused_rcpts
        if not reply.is_permanent:
            self._track_refusal(TrackingEventId.REJECT, txn, None, reply, why, rcpt=rcpt, filter_name=filter_name)
            return
        delay, close = counter.refused()
        if counter.tracked:
            self._track_refusal(TrackingEventId.REJECT, txn, None, reply, why, rcpt=rcpt, filter_name=filter_name)
        if close:
            self.log.info("session {session_id}: {count} refused recipients, closing",
                          session_id=self._sid, count=counter.count)
            self._close(too_many_refused(self.config.hostname))
        elif delay > 0:
            from twisted.internet.task import deferLater

            await deferLater(self.clock, delay)

    def _data_precheck(self) -> Reply | None:
        if self.txn is None:
            return replies.NEED_MAIL
        if not self.txn.recipients:
            return replies.NO_VALID_RECIPIENTS
        return None

    def _open_message(self) -> None:
        """Open the store writer and write the Received header (first DATA/BDAT of a transaction)."""
        self._writer = self.factory.store.open_writer()
        self._write_failed = False
        self.parser.begin_message()
        if self.config.add_received:
            self._writer.write(self._received_header(self._writer.queue_id))

    async def smtp_DATA(self, argument: str) -> None:
        if argument.strip():
            self._error(replies.NO_ARGUMENTS)
            return
        refusal = self._data_precheck()
        if refusal is not None:
            self._error(refusal)
            return
        assert self.txn is not None
        if self._txn_uses_bdat:
            self._error(replies.DATA_AFTER_BDAT)
            return
        if self.txn.params.body is Body.BINARY:
            self._error(replies.BINARYMIME_NEEDS_BDAT)
            return
        try:
            self._open_message()
        except Exception as e:
            refusal = self._storage_error(e, "cannot open a message writer")
            self._abort_writer()
            self._reply(refusal)
            return
        self.parser.start_data()
        self._reply(replies.START_DATA)

    async def smtp_BDAT(self, argument: str) -> None:
        m = _BDAT_ARG.match(argument.strip())
        if m is None:
            # the chunk size is unknown, so the stream cannot be followed: refuse and close
            self.errors += 1
            self._reply(replies.BDAT_SYNTAX)
            self._close(None)
            return
        size = int(m.group(1))
        last = m.group(2) is not None
        self._bdat_refusal = None
        refusal = self._data_precheck()
        if refusal is not None:
            self.errors += 1
        elif self._writer is None:
            try:
                self._open_message()
                self._txn_uses_bdat = True
            except Exception as e:
                refusal = self._storage_error(e, "cannot open a message writer")
                self._abort_writer()
        self._bdat_refusal = refusal  # answered once the chunk has been swallowed
        self._bdat_last = last
        self.parser.start_bdat(size)

    async def _chunk_end(self, event: ChunkEnd) -> None:
        refusal, self._bdat_refusal = self._bdat_refusal, None
        if refusal is not None:
            self._reply(refusal)
            if self.errors >= self.config.max_errors:
                self._close(replies.too_many_errors(self.config.hostname))
            return
        if event.oversize:
            self._oversize()
            return
        if self._bdat_last:
            await self._finish_message(event.size, bare_newline=False, line_too_long=False)
        else:
            self._reply(Reply.make(250, "2.0.0", f"Ok: {event.size} octets received"))

    async def _data_end(self, event: DataEnd) -> None:
        if event.oversize:
            self._oversize()
            return
        await self._finish_message(event.size, event.bare_newline, event.line_too_long)

    async def _finish_message(self, size: int, bare_newline: bool, line_too_long: bool) -> None:
        """End of data: check, run on_data filters, apply header edits, commit, then answer."""
        assert self.session is not None
        writer, txn = self._writer, self.txn
        discard, write_failed = self._txn_discard, self._write_failed
        self._writer = None
        self._reset_transaction()
        if writer is None or txn is None:
            self._reply(replies.INTERNAL_ERROR)
            return
        try:
            if bare_newline:
                self._refuse_message(writer, txn, replies.BARE_NEWLINE_DATA, "bare newline")
                return
            if line_too_long:
                self._refuse_message(writer, txn, replies.TEXT_LINE_TOO_LONG, "line too long")
                return
            if write_failed:
                self._refuse_message(writer, txn, write_failed if isinstance(write_failed, Reply) else
                                     replies.INTERNAL_ERROR, "write failed")
                return
            view = MessageView(writer.open_read, size=writer.size, head=getattr(writer, "head", None))
            too_big = header_refusal(view, self.config.max_header_size, self.config.max_header_field)
            if too_big is not None:  # before anything parses the block (issue 11 items 1 and 12)
                self._refuse_message(writer, txn, HEADER_TOO_BIG, too_big)
                return
            hops = len(view.field_values("Received"))
            if self.factory.max_hops and hops > self.factory.max_hops:
                self._refuse_message(writer, txn, replies.TOO_MANY_HOPS, f"{hops} Received headers (mail loop)")
                return
            if not self.factory.trusted(self.session):
                for prefix in self.factory.firewalled_header_prefixes:
                    view.edits.remove_headers_with_prefix(prefix)
            if self.factory.authenticator is not None:  # send-as on From: (exmta.auth.smtp)
                refusal = self.factory.authenticator.check_message(self, view)
                if refusal is not None:
                    self._refuse_message(writer, txn, refusal, "send-as: From: not granted")
                    return
            verdict = await self.factory.filters.on_data(self.session, txn.view(), view)
            self._track_agent("data", verdict, sender=str(txn.sender), txn=txn, writer=writer, view=view)
            if self._closing:  # the client left, or we closed (timeout, shutdown): it cannot get a 250
                writer.abort()
                return
            if verdict.action in (Action.REJECT, Action.TEMPFAIL, Action.DISCONNECT):
                writer.abort()
                self._track_refusal(TrackingEventId.REJECT, txn, writer, _default_reply(verdict), "filter",
                                    filter_name=verdict.filter_name)
                self._refused(verdict)
                return
            new_body = getattr(view, "new_body", None)
            if new_body is not None:  # a filter's body edit (exmta.malware: strip)
                writer.replace_headers(writer.size, view.raw_headers + b"\r\n" + new_body)
            if discard or verdict.action is Action.DISCARD:
                writer.abort()
                self.log.info("session {session_id}: message {queue_id} discarded",
                              session_id=self._sid, queue_id=writer.queue_id)
                by_filter = verdict.filter_name if verdict.action is Action.DISCARD else None
                self._track_refusal(TrackingEventId.DROP, txn, writer, None,
                                    "filter" if by_filter else "discarded by policy", filter_name=by_filter)
                self._reply(replies.queued(writer.queue_id))
                return
            rules = None
            if self.factory.transport_rules is not None:  # exmta.rules.hook: one call, a decision plus its edits
                rules = await self.factory.transport_rules.at_end_of_data(self.session, txn.view(), view, writer)
                if self._closing or rules.reply is not None or rules.discard:
                    writer.abort()
                    if not self._closing:
                        self._track_refusal(TrackingEventId.REJECT if rules.reply else TrackingEventId.DROP, txn,
                                            writer, rules.reply, "transport rule")
                        self._reply(rules.reply or replies.queued(writer.queue_id))
                    return
            view.apply_edits(writer)
            message_id = next(iter(view.field_values("Message-ID")), None)
            forged = forged_sender(self.session, txn) if txn.sender and \
                anonymous(self.session, self.factory) else None
            if forged:  # no DSN to a sender known to be forged
                self.log.info("session {session_id}: {why}: no DSN for this message", session_id=self._sid, why=forged)
            envelope = Envelope(
                sender=str(txn.sender),
                recipients=[Recipient(self._qualified(a), ("NEVER",) if forged else p.notify, p.orcpt)
                            for a, p in txn.recipients],
                params=txn.params,
                queue_id=writer.queue_id,
                received_at=self.clock.seconds(),
                connector=self.config.name,
                client_ip=self.session.peer_ip,
                client_helo=self.session.helo_name,
                auth_identity=self.session.auth_identity,
                message_id=_clean_header_value(message_id),
                size=writer.size,
                held_reason=getattr(view, "quarantine_reason", None),
            )
            envelope = view.edit_envelope(envelope)  # filters' recipient edits (exmta.milter)
            if rules is not None:
                envelope = rules.envelope(envelope)
            queue_id = await self.factory.store.commit(writer, envelope)
        except Exception as e:
            refusal = self._storage_error(e, "end of data failed")
            writer.abort()
            self._reply(refusal)
            return
        self.messages += 1
        if len(self._queued_ids) < _IDS_LOGGED:
            self._queued_ids.append(queue_id)  # named in the session's end line; the tracking log has every one
        self._track(queue_id, envelope, view.agent_notes, getattr(view, "agent_details", None))
        if rules is not None:
            rules.committed(queue_id, envelope)  # rule hits tracked, NDR for refused recipients (never raises)
        self._reply(replies.queued(queue_id))

    def _qualified(self, rcpt: Address) -> str:
        """The envelope form of a recipient; a bare ``<postmaster>`` gets the postmaster domain."""
        if rcpt.domain:
            return str(rcpt)
        return f"{rcpt.local}@{self.factory.postmaster_domain or self.config.hostname}"

    def _refuse_message(self, writer: Any, txn: Transaction, reply: Reply, why: str) -> None:
        writer.abort()
        self.log.info("session {session_id}: message refused at end of data: {why}",
                      session_id=self._sid, why=why)
        self._track_refusal(TrackingEventId.REJECT, txn, writer, reply, why)
        self._reply(reply)

    def _oversize(self) -> None:
        """The message passed max_message_size: refuse it and end the transaction."""
        if self.txn is not None and self._writer is not None:
            self._track_refusal(TrackingEventId.REJECT, self.txn, self._writer, replies.SIZE_EXCEEDED,
                                "message too big")
        self._reset_transaction()
        self._reply(replies.SIZE_EXCEEDED)

    def _track_refusal(self, event_id: TrackingEventId, txn: Transaction, writer: Any, reply: Reply | None,
                       why: str, rcpt: Address | None = None, filter_name: str | None = None) -> None:
        """A REJECT (or DROP, for DISCARD) tracking event for a message, or one recipient ``rcpt``, not queued."""
        tracker = self.factory.tracker
        if tracker is None:
            return
        details = {"session_id": self._sid, "reason": why}
        if self.session is not None and self.session.auth_identity:
            details["auth_user"] = self.session.auth_identity
        if filter_name:
            details["filter"] = filter_name
        try:
            tracker.track(TrackingEvent(
                event_id, getattr(writer, "queue_id", ""), self.clock.seconds(),
                sender=str(txn.sender),
                recipients=(self._qualified(rcpt),) if rcpt is not None else
                tuple(self._qualified(a) for a, _ in txn.recipients),
                size=getattr(writer, "size", None), connector=self.config.name, source="SMTP",
                remote_host=self.session.peer_ip if self.session else None,
                reply=str(reply) if reply is not None else None,
                details=details,
            ))
        except Exception:
            self.log.failure("tracker failed for a refused message")

    def _track_agent(self, phase: str, verdict: Verdict, sender: str = "", rcpt: Address | None = None,
                     txn: Transaction | None = None, writer: Any = None, view: Any = None) -> None:
        """An AGENTINFO event for a filter's verdict other than CONTINUE: which filter, phase, verdict, reply."""
        tracker = self.factory.tracker
        if tracker is None or not verdict.filter_name or verdict.action in (Action.CONTINUE, Action.ACCEPT):
            return
        try:
            if rcpt is not None:
                recipients: tuple[str, ...] = (self._qualified(rcpt),)
            else:
                recipients = tuple(self._qualified(a) for a, _ in txn.recipients) if txn is not None else ()
            tracker.track(TrackingEvent(
                TrackingEventId.AGENTINFO, getattr(writer, "queue_id", ""), self.clock.seconds(),
                sender=sender, recipients=recipients,
                message_id=_clean_header_value(next(iter(view.field_values("Message-ID")), None)) if view else None,
                size=getattr(writer, "size", None), connector=self.config.name, source="AGENT",
                remote_host=self.session.peer_ip if self.session else None,
                reply=None if verdict.action is Action.DISCARD else str(_default_reply(verdict)),
                details={"session_id": self._sid, "filter": verdict.filter_name, "phase": phase,
                         "verdict": verdict.action.value},
            ))
        except Exception:
            self.log.failure("tracker failed for a filter verdict")

    def _track(self, queue_id: str, envelope: Envelope,
               agents: list[tuple[str, int, str | None]] | None = None,
               agent_details: dict[str, dict[str, str]] | None = None) -> None:
        """RECEIVE, then an AGENTINFO per filter that edited headers or quarantined (``view.agent_notes``)."""
        tracker = self.factory.tracker
        if tracker is None:
            return
        try:
            tracker.track(TrackingEvent(
                TrackingEventId.RECEIVE, queue_id, envelope.received_at,
                sender=envelope.sender,
                recipients=tuple(r.address for r in envelope.recipients),
                message_id=envelope.message_id, size=envelope.size,
                connector=self.config.name, source="SMTP",
                remote_host=envelope.client_ip,
                tls=(f"{self.session.tls.version} {self.session.tls.cipher}"
                     if self.session and self.session.tls else None),
                details={"session_id": self._sid, "client_helo": envelope.client_helo or "",
                         **({"auth_user": envelope.auth_identity} if envelope.auth_identity else {})},
            ))
            notes = list(agents or ())
            if envelope.held_reason and not any(reason for _, _, reason in notes):
                notes.append(("", 0, envelope.held_reason))  # quarantined outside the chain
            for name, edits, reason in notes:  # Exchange's AGENTINFO: the filter acted but let the message in
                details: dict[str, Any] = {"session_id": self._sid, "phase": "data",
                                           "verdict": "quarantine" if reason else "continue"}
                if name:
                    details["filter"] = name
                if edits:
                    details["header_edits"] = edits
                if reason:
                    details["reason"] = reason
                details.update((agent_details or {}).get(name, {}))  # e.g. the check that decided
                tracker.track(TrackingEvent(
                    TrackingEventId.AGENTINFO, queue_id, envelope.received_at, sender=envelope.sender,
                    recipients=tuple(r.address for r in envelope.recipients), message_id=envelope.message_id,
                    size=envelope.size, connector=self.config.name, source="AGENT", details=details,
                ))
        except Exception:
            self.log.failure("tracker failed for {queue_id}", queue_id=queue_id)

    def _received_header(self, queue_id: str) -> bytes:
        assert self.session is not None and self.txn is not None
        s = self.session
        literal = _address_literal(s.peer_ip)
        if not s.esmtp:
            proto = "SMTP"
        else:
            proto = "ESMTP"
            if self.txn.params.smtputf8:
                proto = "UTF8SMTP"
            suffix = ("S" if self.tls_active else "") + ("A" if s.auth_identity else "")
            proto += suffix
        utf8 = self.txn.params.smtputf8
        lines = [f"Received: from {_printable(s.helo_name or 'unknown', utf8)} ({literal})"]
        if s.tls is not None:
            lines.append(f"\t(using {_printable(s.tls.version)} with cipher {_printable(s.tls.cipher)})")
        lines.append(f"\tby {self.config.hostname} (exmta) with {proto} id {queue_id}")
        date = _header_date(int(self.clock.seconds()))
        if len(self.txn.recipients) == 1:
            rcpt = self.txn.recipients[0][0]
            lines.append(f"\tfor <{_printable(str(rcpt), utf8)}>; {date}")
        else:
            lines[-1] += ";"
            lines.append(f"\t{date}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    def _junk(self) -> None:
        """NOOP, RSET, VRFY and HELP past the junk limit count as errors (Postfix smtpd_junk_command_limit)."""
        self._junk_commands += 1
        if self._junk_commands > self.JUNK_COMMAND_LIMIT:
            self.errors += 1

    def _reply_junk(self, reply: Reply) -> None:
        self._junk()
        self._reply(reply)
        if self.errors >= self.config.max_errors:
            self._close(replies.too_many_errors(self.config.hostname))

    async def smtp_RSET(self, argument: str) -> None:
        if argument.strip():
            self._error(replies.NO_ARGUMENTS)
            return
        self._reset_transaction()
        self._reply_junk(replies.OK)

    async def smtp_NOOP(self, argument: str) -> None:
        self._reply_junk(replies.OK)

    async def smtp_QUIT(self, argument: str) -> None:
        self._close(replies.closing(self.config.hostname))

    async def smtp_VRFY(self, argument: str) -> None:
        if not argument.strip():
            self._error(replies.SYNTAX_ERROR)
            return
        self._reply_junk(replies.VRFY_CANNOT)

    async def smtp_HELP(self, argument: str) -> None:
        self._reply_junk(replies.HELP)

    async def smtp_AUTH(self, argument: str) -> None:
        if self.factory.authenticator is None:
            self._error(replies.NOT_IMPLEMENTED)
            return
        await self.factory.authenticator.command(self, argument)

    async def smtp_STARTTLS(self, argument: str) -> None:
        ctx = self.factory.tls_context_factory
        if ctx is None:
            self._error(replies.NOT_IMPLEMENTED)
            return
        if argument.strip():
            self._error(replies.NO_ARGUMENTS)
            return
        if self.tls_active:
            self._error(replies.TLS_ACTIVE)
            return
        if self.session is None or self.session.helo_name is None:
            self._error(replies.NEED_HELO)
            return
        self._reply(replies.STARTTLS_GO)
        self._flush()
        # no plaintext received after STARTTLS may be used (CVE-2011-0411)
        dropped = self.parser.discard_buffer()
        if dropped:
            self.log.warn("session {session_id}: {octets} plaintext octets after STARTTLS dropped",
                          session_id=self._sid, octets=dropped)
        self._reset_transaction()
        self.session.reset_for_tls()
        self.auth_avatar = None
        self.tls_active = True
        self.transport.startTLS(ctx)


class ESMTPServerFactory(Factory):
    """Builds :class:`ESMTPServer` sessions for one receive connector and tracks them for shutdown."""

    log = Logger()
    noisy = False

    def __init__(
        self,
        config: ReceiveConnectorConfig,
        policy: IReceivePolicy,
        filters: FilterChain,
        store: IQueueStore,
        clock: IReactorTime,
        tracker: IMessageTracker | None = None,
        postmaster: str = "postmaster",
        local_domain: Callable[[str], bool] = _no_local_domains,
        tls_context_factory: Any = None,
        postmaster_domain: str | None = None,
    ) -> None:
        """``postmaster_domain`` qualifies a bare ``RCPT TO:<postmaster>`` (default: the hostname)."""
        self.config = config
        self.policy = policy
        self.filters = filters if filters is not None else FilterChain((), clock)
        self.store = store
        self.clock = clock
        self.tracker = tracker
        self.postmaster = postmaster
        self.local_domain = local_domain
        self.tls_context_factory = tls_context_factory
        #: TLS from the first byte (the listener is wrapped by exmta.tls.context.listening_factory)
        self.implicit_tls = False
        #: exmta.tls.verify.TLSGate: require_tls and client certificate checks, or None
        self.tls_gate: Any = None
        #: exmta.auth.smtp.Authenticator: SMTP AUTH and send-as for this connector, or None (no AUTH)
        self.authenticator: Any = None
        self.postmaster_domain = postmaster_domain
        #: header firewall (Exchange): these header families are removed from messages of sessions
        #: that ``trusted`` does not accept; by default a session is trusted when the policy lets it relay
        self.firewalled_header_prefixes: tuple[str, ...] = FIREWALLED_HEADER_PREFIXES
        #: (asks the current policy, so a policy swapped by a reload counts: its ``trusted``, from its
        #: permission groups, else its relay right)
        self.trusted: Callable[[Session], bool] = self._policy_trusts
        #: a message with more Received fields than this (ours included) is a mail loop: 554 5.4.6
        #: (Exchange MaxHopCount 30; 0 = no check)
        self.max_hops = 30
        #: EHLO keywords not to advertise, e.g. {"CHUNKING", "BINARYMIME"} (Exchange's ChunkingEnabled
        #: = false); BDAT itself stays accepted from clients that use it anyway
        self.disabled_extensions: set[str] = set()
        #: exmta.rules.hook.TransportRules run at end of data, or None (no rules file)
        self.transport_rules: Any = None
        #: protocol log of this connector (exmta.observe.protocol.ProtocolLog), None when off
        self.protocol_log: Any = None
        self.sessions: set[ESMTPServer] = set()
        self.shutting_down = False
        self._shutdown_waiters: list[Deferred[None]] = []
        self._grace_call: IDelayedCall | None = None
        #: metrics (exmta.observe.metrics.Metrics): session_opened / session_timed_out / tls_started /
        #: auth_failed (connector, ...) are called on it when set
        self.session_observer: Any = None

    def _policy_trusts(self, session: Session) -> bool:
        judge = getattr(self.policy, "trusted", None) or getattr(self.policy, "may_relay", None) or _untrusted
        return bool(judge(session))

    def buildProtocol(self, addr: Any) -> ESMTPServer:
        return ESMTPServer(self)

    def shutdown(self, grace: float) -> Deferred[None]:
        """Stop taking commands; after ``grace`` seconds send 421 4.3.2 to whoever is left.

        Idle sessions are closed at once; a session in a transaction may
        finish it. Fires when every session is closed.
        """
        self.shutting_down = True
        if not self.sessions:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._shutdown_waiters.append(d)
        for session in list(self.sessions):
            session.shutdown_requested()
        if self.sessions and self._grace_call is None:
            self._grace_call = self.clock.callLater(grace, self._grace_over)
        return d

    def _grace_over(self) -> None:
        self._grace_call = None
        self.log.info("shutdown grace over: closing {count} session(s)", count=len(self.sessions))
        for session in list(self.sessions):
            session.force_close()

    def _session_closed(self, session: ESMTPServer) -> None:
        self.sessions.discard(session)
        if self.shutting_down and not self.sessions:
            if self._grace_call is not None and self._grace_call.active():
                self._grace_call.cancel()
            self._grace_call = None
            waiters, self._shutdown_waiters = self._shutdown_waiters, []
            for d in waiters:
                d.callback(None)
