"""A thin Twisted milter client: one conversation with one milter over TCP or a Unix socket.

:class:`MilterSettings` holds one milter's configuration (as Postfix's
``milter_connect_timeout``, ``milter_command_timeout``,
``milter_content_timeout`` and ``milter_default_action``);
:func:`converse` connects, negotiates, replays the SMTP conversation of one
message (:class:`MessageFacts`) and returns an :class:`Outcome`: the milter's
decision and the modifications it asked for at end of message. Anything
that goes wrong with the milter itself (refused, closed, timed out,
garbage, a reply not allowed where it came) raises :class:`MilterFailed`;
the caller applies the milter's ``default_action``.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Sequence

from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from exmta.milter import protocol as p
from exmta.milter.protocol import MilterProtocolError, Negotiated, Reply, ReplyParser

__all__ = ["DEFAULT_ACTIONS", "DEFAULT_MACROS", "MessageFacts", "MilterFailed", "MilterSettings", "Outcome",
           "converse", "parse_socket"]

log = Logger()

DEFAULT_ACTIONS = ("tempfail", "accept", "reject", "quarantine")
#: the macros sent per stage unless configured otherwise (Postfix's milter_*_macros, plus the client address)
DEFAULT_MACROS: dict[str, tuple[str, ...]] = {
    "connect": ("j", "{daemon_name}", "{daemon_addr}", "v", "_", "{client_addr}", "{client_port}",
                "{client_name}", "{if_addr}"),
    "helo": ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"),
    "mail": ("i", "{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}", "{mail_host}", "{mail_mailer}"),
    "rcpt": ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    "data": ("i",),
    "eoh": ("i",),
    "eom": ("i",),
}
_MACRO_NAME = re.compile(r"[A-Za-z_]\Z|\{[A-Za-z0-9_]+\}\Z")


class MilterFailed(Exception):
    """The milter is unavailable or misbehaved: its default action applies."""


def parse_socket(spec: str) -> tuple[str, Any]:
    """``inet:host:port``, ``inet:port@host`` (sendmail's form), ``inet6:[::1]:port`` or ``unix:/path``.

    Returns ("tcp", (host, port)) or ("unix", path); ValueError for anything else.
    """
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest.startswith("/"):
        return "unix", rest
    if kind in ("inet", "inet6", "tcp") and rest:
        if "@" in rest:
            port_text, _, host = rest.partition("@")
        else:
            host, _, port_text = rest.rpartition(":")
        host = host.strip("[]")
        if host and port_text.isdigit() and 0 < int(port_text) < 65536:
            return "tcp", (host, int(port_text))
    raise ValueError(f'socket {spec!r}: use "inet:HOST:PORT" (or "inet:PORT@HOST") or "unix:/absolute/path"')


@dataclass(frozen=True)
class MilterSettings:
    """One milter's configuration (durations in seconds)."""

    name: str
    socket: str
    connect_timeout: float = 30.0
    command_timeout: float = 30.0
    content_timeout: float = 300.0
    default_action: str = "tempfail"
    macros: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_MACROS))
    max_packet: int = p.MAX_PACKET

    def endpoint(self, reactor: Any) -> Any:
        kind, where = parse_socket(self.socket)
        if kind == "unix":
            return endpoints.UNIXClientEndpoint(reactor, where, timeout=max(1, int(self.connect_timeout + 1)))
        host, port = where
        if ":" in host:
            return endpoints.TCP6ClientEndpoint(reactor, host, port, timeout=max(1, int(self.connect_timeout + 1)))
        return endpoints.HostnameEndpoint(reactor, host.encode("idna"), port,
                                          timeout=max(1, int(self.connect_timeout + 1)))


@dataclass
class MessageFacts:
    """Everything the milter is told about one message, gathered by the filter."""

    client_ip: str
    client_port: int = 0
    client_name: str = ""           #: "" when unknown: the connect command then names "[ip]"
    family: str = "4"               #: "4", "6", "L" or "U"
    helo: str | None = None
    sender: str = ""
    mail_args: Sequence[str] = ()
    recipients: Sequence[tuple[str, Sequence[str]]] = ()
    headers: Sequence[tuple[bytes, bytes]] = ()   #: (name, value without the leading space, LF line ends)
    body: Any = None                #: an async iterator of body chunks (each at most BODY_CHUNK octets)
    macros: Mapping[str, str] = field(default_factory=dict)           #: every known macro value
    rcpt_macros: Sequence[Mapping[str, str]] = ()                     #: per recipient ({rcpt_addr}, ...)


@dataclass
class Outcome:
    """How one milter ended.

    ``action``: "continue" (no objection), "accept" (no objection, no more
    callbacks), "reject", "tempfail", "discard"; ``reply`` the milter's own
    SMTP reply text for SMFIR_REPLYCODE ("550 5.7.1 ..."); ``stage`` where
    it decided; ``modifications`` the end-of-message replies, in order.
    """

    action: str
    reply: str = ""
    stage: str = ""
    modifications: list[Reply] = field(default_factory=list)


class MilterProtocol(Protocol):
    """Bytes to Replies, one waiter at a time; any protocol error or loss fails the waiter."""

    def __init__(self, max_packet: int) -> None:
        self.parser = ReplyParser(max_packet)
        self.replies: deque[Reply] = deque()
        self.error: Exception | None = None
        self.waiter: Deferred[Reply] | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            self.replies.extend(self.parser.feed(data))
        except MilterProtocolError as e:
            self._fail(e)
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._wake()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.error is None:
            self._fail(MilterFailed(f"connection closed ({reason.getErrorMessage() if reason else 'no reason'})"))

    def _fail(self, error: Exception) -> None:
        self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is None:
            return
        if self.replies:
            self.waiter = None
            waiter.callback(self.replies.popleft())
        elif self.error is not None:
            self.waiter = None
            waiter.errback(self.error)

    def send(self, data: bytes) -> None:
        if self.error is not None:
            raise MilterFailed(str(self.error))
        self.transport.write(data)  # type: ignore[union-attr]

    def next_reply(self) -> Deferred[Reply]:
        d: Deferred[Reply] = Deferred(lambda _: setattr(self, "waiter", None))
        self.waiter = d
        self._wake()
        return d


class _Conversation:
    """The replay of one message to one milter (see the module docstring)."""

    def __init__(self, settings: MilterSettings, clock: Any, proto: MilterProtocol) -> None:
        self.settings = settings
        self.clock = clock
        self.proto = proto
        self.neg: Negotiated | None = None
        self.macro_lists: dict[str, tuple[str, ...]] = dict(settings.macros)

    async def reply(self, timeout: float, what: str) -> Reply:
        """The next reply; SMFIR_PROGRESS restarts the timeout."""
        while True:
            d = self.proto.next_reply()
            d.addTimeout(timeout, self.clock)
            try:
                reply = await d
            except TimeoutError:  # our own timeout; a CancelledError (the filter chain gave up) goes up
                raise MilterFailed(f"no reply to {what} within {timeout:g} s") from None
            except MilterProtocolError as e:
                raise MilterFailed(f"garbage after {what}: {e}") from None
            except MilterFailed as e:
                raise MilterFailed(f"{e} after {what}") from None
            if reply.kind != "progress":
                return reply

    async def negotiate(self) -> None:
        self.proto.send(p.optneg())
        reply = await self.reply(self.settings.command_timeout, "option negotiation")
        try:
            self.neg = Negotiated.from_reply(reply)
        except MilterProtocolError as e:
            raise MilterFailed(str(e)) from None
        for stage, names in self.neg.macros.items():
            self.macro_lists[stage] = names  # the milter's own list wins, as with Postfix

    def send_macros(self, stage: str, values: Mapping[str, str]) -> None:
        wanted = {name: values[name] for name in self.macro_lists.get(stage, ()) if name in values}
        if wanted:
            self.proto.send(p.macros(stage, wanted))

    async def step(self, step: str, packet: bytes, timeout: float, allow_skip: bool = False) -> Reply | None:
        """Send one command; its reply when the milter answers it (None when negotiated away)."""
        assert self.neg is not None
        self.proto.send(packet)
        if not self.neg.answers(step):
            return None
        reply = await self.reply(timeout, step)
        allowed = {"continue", "accept", "reject", "tempfail", "discard", "replycode"}
        if allow_skip and self.neg.skip:
            allowed.add("skip")
        if reply.kind not in allowed:
            raise MilterFailed(f"reply {reply.kind!r} is not allowed after {step}")
        return reply

    async def run(self, facts: MessageFacts) -> Outcome:
        s = self.settings
        await self.negotiate()
        neg = self.neg
        assert neg is not None
        m = facts.macros

        def decided(reply: Reply | None, stage: str) -> Outcome | None:
            if reply is None or reply.kind in ("continue", "skip"):
                return None
            if reply.kind == "replycode":
                return Outcome("tempfail" if reply.code < 500 else "reject", reply.text, stage)
            return Outcome(reply.kind, "", stage)

        if neg.sends("connect"):
            self.send_macros("connect", m)
            name = facts.client_name or f"[{facts.client_ip}]"
            packet = p.connect(name, facts.family, facts.client_port, facts.client_ip)
            if (out := decided(await self.step("connect", packet, s.command_timeout), "connect")):
                return out
        if facts.helo is not None and neg.sends("helo"):
            self.send_macros("helo", m)
            if (out := decided(await self.step("helo", p.helo(facts.helo), s.command_timeout), "helo")):
                return out
        if neg.sends("mail"):
            self.send_macros("mail", m)
            packet = p.mail(f"<{facts.sender}>", facts.mail_args)
            if (out := decided(await self.step("mail", packet, s.command_timeout), "mail")):
                return out
        if neg.sends("rcpt"):
            for i, (address, args) in enumerate(facts.recipients):
                values = dict(m)
                if i < len(facts.rcpt_macros):
                    values.update(facts.rcpt_macros[i])
                self.send_macros("rcpt", values)
                out = decided(await self.step("rcpt", p.rcpt(f"<{address}>", args), s.command_timeout), "rcpt")
                if out is not None:  # one recipient refused: the whole message (as Postfix's cleanup milters)
                    return out
        if neg.version >= 4 and neg.sends("data"):
            self.send_macros("data", m)
            if (out := decided(await self.step("data", p.data(), s.command_timeout), "data")):
                return out
        if neg.sends("header"):
            for name_raw, value_raw in facts.headers:
                packet = p.header(name_raw, value_raw)
                if (out := decided(await self.step("header", packet, s.content_timeout), "header")):
                    return out
        if neg.sends("eoh"):
            self.send_macros("eoh", m)
            if (out := decided(await self.step("eoh", p.eoh(), s.content_timeout), "eoh")):
                return out
        skipped = False
        if facts.body is not None:
            async for chunk in facts.body:
                if skipped or not neg.sends("body"):
                    continue  # drain the reader; nothing more is sent
                for start in range(0, len(chunk), p.BODY_CHUNK):
                    reply = await self.step("body", p.body(chunk[start:start + p.BODY_CHUNK]), s.content_timeout,
                                            allow_skip=True)
                    if reply is not None and reply.kind == "skip":
                        skipped = True
                        break
                    if (out := decided(reply, "body")):
                        return out
        self.send_macros("eom", m)
        self.proto.send(p.end_of_message())
        return await self.end_of_message()

    async def end_of_message(self) -> Outcome:
        """Modifications until the final reply (each checked against the negotiated actions)."""
        neg = self.neg
        assert neg is not None
        mods: list[Reply] = []
        while True:
            reply = await self.reply(self.settings.content_timeout, "end of message")
            if reply.is_modification:
                if not neg.may(reply.kind):
                    raise MilterFailed(f"modification {reply.kind!r} was not negotiated")
                mods.append(reply)
                continue
            if reply.kind in ("continue", "accept"):
                return Outcome(reply.kind, "", "eom", mods)
            if reply.kind in ("reject", "tempfail", "discard"):
                return Outcome(reply.kind, "", "eom")
            if reply.kind == "replycode":
                return Outcome("tempfail" if reply.code < 500 else "reject", reply.text, "eom")
            raise MilterFailed(f"reply {reply.kind!r} is not allowed at end of message")


async def converse(settings: MilterSettings, facts: MessageFacts, reactor: Any, clock: Any = None) -> Outcome:
    """One message through one milter; MilterFailed when the milter is unavailable or misbehaves."""
    clock = clock if clock is not None else reactor
    proto = MilterProtocol(settings.max_packet)
    try:
        endpoint = settings.endpoint(reactor)
    except ValueError as e:
        raise MilterFailed(str(e)) from None
    d = endpoint.connect(_OneShot(proto))
    # the endpoint's cancellation fails with ConnectingCancelledError, not CancelledError: say what happened
    d.addTimeout(settings.connect_timeout, clock, onTimeoutCancel=lambda result, timeout: Failure(
        MilterFailed(f"no connection within {timeout:g} s")))
    try:
        await d
    except (MilterFailed, CancelledError):
        raise
    except Exception as e:
        raise MilterFailed(f"cannot connect: {e}") from None
    conversation = _Conversation(settings, clock, proto)
    try:
        outcome = await conversation.run(facts)
    except (MilterFailed, CancelledError):
        _close(proto, abort=True)
        raise
    except Exception as e:  # a value the protocol cannot carry (e.g. a NUL in a header), or a bug
        _close(proto, abort=True)
        raise MilterFailed(f"conversation failed: {e!r}") from None
    _close(proto, abort=False, message_open=outcome.stage != "eom")
    return outcome


def _close(proto: MilterProtocol, abort: bool, message_open: bool = False) -> None:
    """Abort the connection (after a failure), or say goodbye: SMFIC_ABORT first when the milter
    decided before end of message, then SMFIC_QUIT."""
    transport = proto.transport
    if transport is None:
        return
    if abort or proto.error is not None:
        transport.abortConnection()  # type: ignore[attr-defined]
        return
    try:
        transport.write((p.abort() if message_open else b"") + p.quit())
    except Exception:
        pass
    transport.loseConnection()


class _OneShot(Factory):
    """A factory that hands out the one protocol instance made for this conversation."""

    def __init__(self, proto: MilterProtocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> MilterProtocol:  # type: ignore[override]
        return self.proto


async def aiter_chunks(chunks: Sequence[bytes]) -> AsyncIterator[bytes]:
    """An async iterator over ready chunks (tests, small bodies)."""
    for chunk in chunks:
        yield chunk


def check_macro_name(name: str) -> bool:
    """True for a single-letter macro or a ``{name}`` one."""
    return bool(_MACRO_NAME.match(name))
