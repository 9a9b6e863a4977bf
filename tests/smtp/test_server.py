"""ESMTPServer on StringTransport + Clock: exact bytes on the wire."""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from exmta.config.schema import ReceiveConnectorConfig
from exmta.filters.base import FilterBase, FilterChain
from exmta.interfaces import IMessageTracker, IReceivePolicy
from exmta.model import Body, TrackingEventId, Verdict
from exmta.smtp.server import ESMTPServer, ESMTPServerFactory
from support.smtp_stubs import RecordingStore, TLSStringTransport

EHLO_REPLY = (
    b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-ENHANCEDSTATUSCODES\r\n"
    b"250-8BITMIME\r\n250-BINARYMIME\r\n250-CHUNKING\r\n250-DSN\r\n250 SMTPUTF8\r\n"
)


# ------------------------------------------------------------ fakes


@implementer(IReceivePolicy)
class FakePolicy:
    """Accept everything except *@denied.test; local parts "slow*" answer when the test fires them."""

    def __init__(self) -> None:
        self.slow: list[Deferred] = []
        self.connect_verdict = Verdict.CONTINUE
        self.mail_verdict = Verdict.CONTINUE
        self.raise_on_mail = False

    def check_connect(self, session):
        return self.connect_verdict

    def check_mail(self, session, sender, params):
        if self.raise_on_mail:
            raise RuntimeError("policy bug")
        return self.mail_verdict

    def authorize_rcpt(self, session, txn, rcpt, params):
        if rcpt.domain_key == "denied.test":
            return Verdict.reject(554, "5.7.1", "Relay access denied")
        if rcpt.domain_key == "noopinion.test":
            return Verdict.CONTINUE
        if rcpt.local.startswith("slow"):
            d: Deferred = Deferred()
            self.slow.append(d)
            return d
        return Verdict.ACCEPT


@implementer(IMessageTracker)
class FakeTracker:
    def __init__(self) -> None:
        self.events: list = []

    def track(self, event) -> None:
        self.events.append(event)


class Client:
    """The test's view of one session."""

    def __init__(self, proto: ESMTPServer, transport: StringTransport, clock: Clock,
                 store: RecordingStore, policy: FakePolicy, factory: ESMTPServerFactory, tracker: FakeTracker):
        self.proto, self.transport, self.clock = proto, transport, clock
        self.store, self.policy, self.factory, self.tracker = store, policy, factory, tracker

    def read(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.read()

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def lose(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))

    def ehlo(self) -> None:
        assert self.send(b"EHLO client.test\r\n").startswith(b"250-mx.test")

    def envelope(self, rcpts=("b@local.test",), mail_params=b"") -> None:
        cmds = b"MAIL FROM:<a@sender.test>" + mail_params + b"\r\n"
        cmds += b"".join(b"RCPT TO:<" + r.encode() + b">\r\n" for r in rcpts)
        out = self.send(cmds)
        assert out == b"250 2.1.0 Ok\r\n" + b"250 2.1.5 Ok\r\n" * len(rcpts), out


def make(filters=(), tls=None, tracker=True, **cfg: Any) -> Client:
    clock = Clock()
    clock.advance(1_700_000_000)
    config = ReceiveConnectorConfig(name="inbound", hostname="mx.test", max_message_size=1_000_000)
    config = replace(config, **cfg)
    store, policy, trk = RecordingStore(), FakePolicy(), FakeTracker()
    factory = ESMTPServerFactory(
        config, policy, FilterChain(list(filters), clock, timeout=10.0), store, clock,
        tracker=trk if tracker else None, postmaster="postmaster",
        local_domain=lambda d: d == "local.test", tls_context_factory=tls,
    )
    addr = IPv4Address("TCP", "192.0.2.7", 40000)
    proto = factory.buildProtocol(addr)
    transport = TLSStringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
    proto.makeConnection(transport)
    return Client(proto, transport, clock, store, policy, factory, trk)


@pytest.fixture(autouse=True)
def no_unhandled_deferred_errors():
    """Fail a test that leaves an errback nobody handled (logged when the Deferred is collected)."""
    import gc

    from twisted.logger import globalLogPublisher

    seen: list[dict] = []

    def observer(event: dict) -> None:
        if "Unhandled error in Deferred" in (event.get("log_format") or ""):
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    try:
        yield
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not seen, [e.get("log_failure") for e in seen]


@pytest.fixture
def c() -> Client:
    client = make()
    assert client.read() == b"220 mx.test ESMTP exmta\r\n"
    return client


# ------------------------------------------------------------ greeting, EHLO, simple commands


def test_greeting_and_ehlo_capabilities(c):
    assert c.send(b"EHLO client.test\r\n") == EHLO_REPLY


def test_ehlo_advertises_starttls_only_with_a_context():
    client = make(tls=object())
    client.read()
    assert b"250-STARTTLS\r\n" in client.send(b"EHLO c\r\n")


def test_helo_and_missing_argument(c):
    assert c.send(b"HELO\r\n") == b"501 5.5.4 Syntax: HELO hostname\r\n"
    assert c.send(b"EHLO \r\n") == b"501 5.5.4 Syntax: EHLO hostname\r\n"
    assert c.send(b"HELO client.test\r\n") == b"250 mx.test\r\n"


def test_noop_rset_vrfy_help_quit(c):
    assert c.send(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"
    assert c.send(b"RSET\r\n") == b"250 2.0.0 Ok\r\n"
    assert c.send(b"VRFY bob\r\n").startswith(b"252 2.5.0 ")
    assert c.send(b"HELP\r\n").startswith(b"214 2.0.0 ")
    assert c.send(b"QUIT\r\n") == b"221 2.0.0 mx.test closing connection\r\n"
    assert c.closed


def test_unknown_and_unimplemented_commands(c):
    assert c.send(b"FOO\r\n") == b"500 5.5.2 Error: command not recognized\r\n"
    assert c.send(b"EXPN staff\r\n") == b"502 5.5.1 Error: command not implemented\r\n"
    assert c.send(b"AUTH PLAIN\r\n") == b"502 5.5.1 Error: command not implemented\r\n"
    assert c.send(b"STARTTLS\r\n") == b"502 5.5.1 Error: command not implemented\r\n"
    assert c.send(b"\r\n") == b"500 5.5.2 Error: command not recognized\r\n"


def test_http_request_closes_the_session(c):
    assert c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b"221 2.7.0 Error: non-SMTP command, goodbye\r\n"
    assert c.closed


def test_sequence_errors(c):
    assert c.send(b"MAIL FROM:<a@b.test>\r\n") == b"503 5.5.1 Error: send HELO/EHLO first\r\n"
    c.ehlo()
    assert c.send(b"RCPT TO:<b@local.test>\r\n") == b"503 5.5.1 Error: need MAIL command\r\n"
    assert c.send(b"DATA\r\n") == b"503 5.5.1 Error: need MAIL command\r\n"
    assert c.send(b"MAIL FROM:<a@b.test>\r\n") == b"250 2.1.0 Ok\r\n"
    assert c.send(b"MAIL FROM:<a@b.test>\r\n") == b"503 5.5.1 Error: nested MAIL command\r\n"
    assert c.send(b"DATA\r\n") == b"554 5.5.1 Error: no valid recipients\r\n"
    assert c.send(b"DATA x\r\n") == b"501 5.5.4 Syntax error: no arguments allowed\r\n"


def test_parameter_errors_reach_the_wire(c):
    c.ehlo()
    assert c.send(b"MAIL FROM:<a@b.test> NONSENSE=1\r\n") == b"555 5.5.4 Error: unsupported parameter\r\n"
    assert c.send(b"MAIL FROM:<a@b.test> SIZE=1 SIZE=1\r\n") == b"501 5.5.4 Error: duplicate parameter\r\n"
    assert c.send(b'MAIL FROM:<"a@b.test>\r\n') == b"501 5.1.7 Bad sender address syntax\r\n"
    assert c.send(b"MAIL FROM:<a@b.test>\r\n") == b"250 2.1.0 Ok\r\n"
    assert c.send(b"RCPT TO:<b@[1.2.3.4>\r\n") == b"501 5.1.3 Bad recipient address syntax\r\n"
    assert c.send("RCPT TO:<ü@local.test>\r\n".encode()) == (
        b"553 5.6.7 Error: SMTPUTF8 is required for non-ASCII addresses\r\n"
    )


def test_smtputf8_transaction(c):
    c.ehlo()
    out = c.send("MAIL FROM:<jöhn@exämple.test> SMTPUTF8\r\nRCPT TO:<ü@local.test>\r\nDATA\r\n".encode())
    assert out == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
    assert c.send("Subject: é\r\n\r\nbody\r\n.\r\n".encode()) == b"250 2.0.0 Ok: queued as Q1\r\n"
    content, env = c.store.committed[0]
    assert env.sender == "jöhn@exämple.test" and env.params.smtputf8
    assert b" with UTF8SMTP id Q1" in content


# ------------------------------------------------------------ a whole transaction


def test_message_is_received_queued_and_tracked(c):
    c.ehlo()
    c.envelope(rcpts=("b@local.test",), mail_params=b" SIZE=100 BODY=8BITMIME RET=HDRS ENVID=e+2B1")
    out = c.send(b"DATA\r\n")
    assert out == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert c.send(b"Message-ID: <m1@sender.test>\r\nSubject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n") == (
        b"250 2.0.0 Ok: queued as Q1\r\n"
    )
    content, env = c.store.committed[0]
    received, rest = content.split(b"Message-ID:", 1)
    assert re.fullmatch(
        rb"Received: from client\.test \(\[192\.0\.2\.7\]\)\r\n"
        rb"\tby mx\.test \(exmta\) with ESMTP id Q1\r\n"
        rb"\tfor <b@local\.test>; \w{3}, \d\d \w{3} 2023 \d\d:\d\d:\d\d [+-]\d{4}\r\n",
        received,
    ), received
    assert rest == b" <m1@sender.test>\r\nSubject: hi\r\n\r\n.dot\r\nbody\r\n"
    assert env.sender == "a@sender.test"
    assert [r.address for r in env.recipients] == ["b@local.test"]
    assert env.params.size == 100 and env.params.body is Body.EIGHT_BIT
    assert env.params.ret == "HDRS" and env.params.envid == "e+1"
    assert env.queue_id == "Q1" and env.connector == "inbound"
    assert env.client_ip == "192.0.2.7" and env.client_helo == "client.test"
    assert env.message_id == "<m1@sender.test>"
    assert env.size == len(content)
    assert env.received_at == 1_700_000_000
    [event] = c.tracker.events
    assert event.event_id is TrackingEventId.RECEIVE and event.queue_id == "Q1"
    assert event.recipients == ("b@local.test",) and event.message_id == "<m1@sender.test>"
    assert event.source == "SMTP" and event.connector == "inbound"


def test_two_messages_in_one_session_and_received_without_for(c):
    c.ehlo()
    c.envelope(rcpts=("b@local.test", "c@local.test"))
    c.send(b"DATA\r\n")
    assert c.send(b"a\r\n.\r\n") == b"250 2.0.0 Ok: queued as Q1\r\n"
    c.envelope(rcpts=("d@local.test",))
    c.send(b"DATA\r\n")
    assert c.send(b"b\r\n.\r\n") == b"250 2.0.0 Ok: queued as Q2\r\n"
    first = c.store.committed[0][0]
    assert b"\tby mx.test (exmta) with ESMTP id Q1;\r\n\t" in first
    assert b"for <" not in first
    assert [r.address for r in c.store.committed[0][1].recipients] == ["b@local.test", "c@local.test"]


def test_helo_session_is_smtp_in_received(c):
    assert c.send(b"HELO old.test\r\n") == b"250 mx.test\r\n"
    c.envelope()
    c.send(b"DATA\r\n")
    c.send(b"x\r\n.\r\n")
    assert b" with SMTP id Q1\r\n" in c.store.committed[0][0]


def test_duplicate_recipient_is_accepted_once(c):
    c.ehlo()
    c.envelope(rcpts=("b@local.test", "b@LOCAL.test"))
    c.send(b"DATA\r\n")
    c.send(b"x\r\n.\r\n")
    assert len(c.store.committed[0][1].recipients) == 1


def test_notify_and_orcpt_reach_the_envelope(c):
    c.ehlo()
    c.send(b"MAIL FROM:<a@sender.test>\r\n")
    assert c.send(b"RCPT TO:<b@local.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b+40x.test\r\n") == (
        b"250 2.1.5 Ok\r\n"
    )
    c.send(b"DATA\r\n")
    c.send(b"x\r\n.\r\n")
    [rcpt] = c.store.committed[0][1].recipients
    assert rcpt.notify == ("FAILURE", "DELAY") and rcpt.orcpt == "rfc822;b@x.test"


def test_rset_aborts_the_transaction(c):
    c.ehlo()
    c.envelope()
    assert c.send(b"RSET\r\n") == b"250 2.0.0 Ok\r\n"
    assert c.send(b"DATA\r\n") == b"503 5.5.1 Error: need MAIL command\r\n"


def test_ehlo_resets_the_transaction(c):
    c.ehlo()
    c.envelope()
    c.ehlo()
    assert c.send(b"DATA\r\n") == b"503 5.5.1 Error: need MAIL command\r\n"


# ------------------------------------------------------------ pipelining


def test_pipelined_replies_come_in_order_with_one_write(c):
    c.ehlo()
    writes: list[bytes] = []
    original = c.transport.write
    c.transport.write = lambda data: (writes.append(data), original(data))  # type: ignore[method-assign]
    out = c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@local.test>\r\nRCPT TO:<x@denied.test>\r\nDATA\r\n")
    assert out == (
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n554 5.7.1 Relay access denied\r\n"
        b"354 End data with <CR><LF>.<CR><LF>\r\n"
    )
    assert len(writes) == 1


def test_slow_policy_holds_later_commands_and_keeps_order(c):
    """twisted#8126 / probe 3: a slow RCPT must be answered before DATA, and be a recipient."""
    c.ehlo()
    out = c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<slow@local.test>\r\nRCPT TO:<fast@local.test>\r\nDATA\r\n")
    assert out == b""  # MAIL's reply waits with the group
    assert c.transport.producerState == "producing"  # a little input waits in the parser, unread by us
    assert len(c.policy.slow) == 1
    c.policy.slow[0].callback(Verdict.ACCEPT)
    assert c.transport.producerState == "producing"
    assert c.read() == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
    c.send(b"x\r\n.\r\n")
    env = c.store.committed[0][1]
    assert [r.address for r in env.recipients] == ["slow@local.test", "fast@local.test"]


def test_a_pending_command_pauses_the_socket_once_much_input_waits(c):
    from exmta.smtp.server import _MAX_AHEAD

    c.ehlo()
    assert c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<slow@local.test>\r\n") == b""
    assert c.transport.producerState == "producing"
    flood = b"NOOP\r\n" * (_MAX_AHEAD // 6 + 1)
    assert c.send(flood) == b""
    assert c.transport.producerState == "paused", "more than _MAX_AHEAD octets behind a pending command"
    c.policy.slow[0].callback(Verdict.ACCEPT)
    assert c.transport.producerState == "producing"
    # in order after the pending reply (the NOOP flood then meets the junk-command limit)
    assert c.read().startswith(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n")


def test_input_arriving_while_paused_is_queued(c):
    c.ehlo()
    assert c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<slow1@local.test>\r\n") == b""
    assert c.send(b"RCPT TO:<slow2@local.test>\r\nNOOP\r\n") == b""
    c.policy.slow[0].callback(Verdict.reject(550, "5.1.1", "No such user"))
    assert c.read() == b""  # slow2 now pending
    assert len(c.policy.slow) == 2
    c.policy.slow[1].callback(Verdict.ACCEPT)
    assert c.read() == b"250 2.1.0 Ok\r\n550 5.1.1 No such user\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n"


def test_policy_errors_are_451_and_the_session_goes_on(c):
    c.ehlo()
    c.policy.raise_on_mail = True
    assert c.send(b"MAIL FROM:<a@sender.test>\r\n") == b"451 4.3.0 Error: internal error, try again later\r\n"
    c.policy.raise_on_mail = False
    assert c.send(b"MAIL FROM:<a@sender.test>\r\n") == b"250 2.1.0 Ok\r\n"


def test_policy_timeout_is_451(c):
    c.ehlo()
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<slow@local.test>\r\n")
    c.clock.advance(ESMTPServer.policy_timeout + 1)
    assert c.read() == b"250 2.1.0 Ok\r\n451 4.3.0 Error: internal error, try again later\r\n"
    assert c.send(b"RCPT TO:<b@local.test>\r\n") == b"250 2.1.5 Ok\r\n"


def test_policy_with_no_opinion_is_relay_denied(c):
    c.ehlo()
    c.send(b"MAIL FROM:<a@sender.test>\r\n")
    assert c.send(b"RCPT TO:<x@noopinion.test>\r\n") == b"554 5.7.1 Relay access denied\r\n"


# ------------------------------------------------------------ postmaster


@pytest.mark.parametrize("rcpt", [b"<postmaster>", b"<Postmaster>", b"<POSTMASTER@local.test>"])
def test_postmaster_is_always_accepted_for_local_domains(c, rcpt):
    c.ehlo()
    c.send(b"MAIL FROM:<a@sender.test>\r\n")
    assert c.send(b"RCPT TO:" + rcpt + b"\r\n") == b"250 2.1.5 Ok\r\n"


def test_postmaster_of_a_foreign_domain_goes_through_policy(c):
    c.ehlo()
    c.send(b"MAIL FROM:<a@sender.test>\r\n")
    assert c.send(b"RCPT TO:<postmaster@denied.test>\r\n") == b"554 5.7.1 Relay access denied\r\n"


# ------------------------------------------------------------ limits


def test_declared_size_over_limit_is_552(c):
    c.ehlo()
    assert c.send(b"MAIL FROM:<a@sender.test> SIZE=1000001\r\n") == (
        b"552 5.3.4 Error: message size exceeds fixed limit of 1000000 octets\r\n"
    )
    assert c.send(b"MAIL FROM:<a@sender.test> SIZE=1000000\r\n") == b"250 2.1.0 Ok\r\n"


def test_actual_size_over_limit_is_552_at_end_and_nothing_queued():
    c = make(max_message_size=100)
    c.read()
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    assert c.send(b"x" * 80 + b"\r\n" + b"y" * 80 + b"\r\n.\r\nNOOP\r\n") == (
        b"552 5.3.4 Error: message file too big\r\n250 2.0.0 Ok\r\n"
    )
    assert c.store.committed == [] and c.store.writers[0].aborted


def test_max_recipients_10000_rcpts_capped():
    c = make(max_recipients=100)
    c.read()
    c.ehlo()
    c.send(b"MAIL FROM:<a@sender.test>\r\n")
    out = c.send(b"".join(b"RCPT TO:<u%d@local.test>\r\n" % i for i in range(10_000)))
    assert out == b"250 2.1.5 Ok\r\n" * 100 + b"452 4.5.3 Error: too many recipients\r\n" * 9_900
    assert not c.closed  # 452 is not a protocol error
    c.send(b"DATA\r\n")
    c.send(b"x\r\n.\r\n")
    assert len(c.store.committed[0][1].recipients) == 100


def test_overlong_command_line(c):
    assert c.send(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n") == b"500 5.5.6 Error: line too long\r\n250 2.0.0 Ok\r\n"


def test_nul_bytes_and_garbage_in_commands(c):
    assert c.send(b"NO\x00OP\r\n") == b"500 5.5.2 Error: bad characters in command line\r\n"
    assert c.send(b"\xff\xfe\xfd\r\n") == b"500 5.5.2 Error: bad characters in command line\r\n"
    assert c.send(b"NOOP\nQUIT\r\n") == b"500 5.5.2 Error: bare <CR> or <LF> in command line\r\n"
    assert not c.closed


def test_too_many_errors_closes_with_421():
    c = make(max_errors=3)
    c.read()
    out = c.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert out == b"500 5.5.2 Error: command not recognized\r\n" * 3 + b"421 4.7.0 mx.test Error: too many errors\r\n"
    assert c.closed
    assert c.send(b"NOOP\r\n") == b""


# ------------------------------------------------------------ DATA content rules


def test_bare_lf_rejected_at_end_of_data(c):
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    out = c.send(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<smuggled@evil.test>\r\n.\r\n")
    assert out == b"550 5.6.11 Error: bare <LF> or <CR> not allowed in message content\r\n"
    assert c.store.committed == [] and c.store.writers[0].aborted
    assert c.send(b"MAIL FROM:<a@sender.test>\r\n") == b"250 2.1.0 Ok\r\n"  # back in command mode


def test_bare_lf_normalized():
    c = make(bare_lf="normalize")
    c.read()
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    assert c.send(b"Subject: x\n\nhello\n.\nMAIL FROM:<smuggled@evil.test>\r\n.\r\n") == (
        b"250 2.0.0 Ok: queued as Q1\r\n"
    )
    content = c.store.committed[0][0]
    assert content.endswith(b"Subject: x\r\n\r\nhello\r\n.\r\nMAIL FROM:<smuggled@evil.test>\r\n")


def test_text_line_too_long_refused():
    c = make(max_text_line=1000)  # the RFC 5321 limit, an option (the default is no limit)
    c.read()
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    assert c.send(b"x" * 1200 + b"\r\n.\r\n") == b"550 5.6.0 Error: message has a line longer than allowed\r\n"
    assert c.store.committed == []


def test_binarymime_requires_bdat(c):
    c.ehlo()
    c.envelope(mail_params=b" BODY=BINARYMIME")
    assert c.send(b"DATA\r\n") == b"503 5.5.1 Error: BODY=BINARYMIME requires BDAT\r\n"
    assert c.send(b"BDAT 3 LAST\r\nabc") == b"250 2.0.0 Ok: queued as Q1\r\n"


# ------------------------------------------------------------ BDAT


def test_bdat_chunks(c):
    c.ehlo()
    c.envelope()
    out = c.send(b"BDAT 25\r\nSubject: BDAT 4\r\n")
    assert out == b""  # 25 octets announced, 17 so far: wait for the rest
    out = c.send(b"\r\nbody\r\nBDAT 0 LAST\r\n")
    assert out == b"250 2.0.0 Ok: 25 octets received\r\n250 2.0.0 Ok: queued as Q1\r\n"
    content = c.store.committed[0][0]
    assert content.endswith(b"\r\nSubject: BDAT 4\r\n\r\nbody\r\n")


def test_bdat_pipelined_with_envelope(c):
    c.ehlo()
    out = c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@local.test>\r\nBDAT 5 LAST\r\n.\r\n\r\n")
    assert out == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued as Q1\r\n"
    assert c.store.committed[0][0].endswith(b".\r\n\r\n")  # no unstuffing in BDAT


def test_bdat_0_last_only(c):
    c.ehlo()
    c.envelope()
    assert c.send(b"BDAT 0 LAST\r\n") == b"250 2.0.0 Ok: queued as Q1\r\n"
    assert c.store.committed[0][0].startswith(b"Received: ")


def test_bdat_without_transaction_swallows_the_chunk(c):
    c.ehlo()
    assert c.send(b"BDAT 12 LAST\r\nMAIL FROM:\r\nNOOP\r\n") == (
        b"503 5.5.1 Error: need MAIL command\r\n250 2.0.0 Ok\r\n"
    )
    c.send(b"MAIL FROM:<a@sender.test>\r\n")
    assert c.send(b"BDAT 4\r\nRSET") == b"554 5.5.1 Error: no valid recipients\r\n"


def test_data_after_bdat_and_rcpt_after_bdat_refused(c):
    c.ehlo()
    c.envelope()
    assert c.send(b"BDAT 2\r\nab") == b"250 2.0.0 Ok: 2 octets received\r\n"
    assert c.send(b"DATA\r\n") == b"503 5.5.1 Error: DATA not allowed after BDAT in one transaction\r\n"
    assert c.send(b"RCPT TO:<x@local.test>\r\n") == b"503 5.5.1 Error: bad sequence of commands\r\n"
    assert c.send(b"BDAT 2 LAST\r\ncd") == b"250 2.0.0 Ok: queued as Q1\r\n"
    assert c.store.committed[0][0].endswith(b"abcd")


def test_bdat_oversize_fails_the_transaction():
    c = make(max_message_size=10)
    c.read()
    c.ehlo()
    c.envelope()
    assert c.send(b"BDAT 6\r\n123456") == b"250 2.0.0 Ok: 6 octets received\r\n"
    assert c.send(b"BDAT 6\r\n123456BDAT 1 LAST\r\nx") == (
        b"552 5.3.4 Error: message file too big\r\n503 5.5.1 Error: need MAIL command\r\n"
    )
    assert c.store.committed == [] and c.store.writers[0].aborted


def test_bdat_bad_syntax_closes(c):
    c.ehlo()
    c.envelope()
    assert c.send(b"BDAT xyz\r\n") == b"501 5.5.4 Syntax: BDAT count [LAST]\r\n"
    assert c.closed
    assert c.store.writers == []


def test_bdat_rset_between_chunks_aborts(c):
    c.ehlo()
    c.envelope()
    c.send(b"BDAT 2\r\nab")
    assert c.send(b"RSET\r\n") == b"250 2.0.0 Ok\r\n"
    assert c.store.writers[0].aborted


# ------------------------------------------------------------ durability and errors


def test_250_is_written_only_after_commit_fires(c):
    c.store.manual = True
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    assert c.send(b"x\r\n.\r\nNOOP\r\n") == b""  # the NOOP waits for the commit
    writer, _, d = c.store.pending[0]
    assert not writer.committed
    d.callback(None)
    assert c.read() == b"250 2.0.0 Ok: queued as Q1\r\n250 2.0.0 Ok\r\n"


def test_commit_failure_is_451_never_5xx(c):
    c.store.fail_commit = True
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    assert c.send(b"x\r\n.\r\n") == b"451 4.3.0 Error: internal error, try again later\r\n"
    assert c.store.writers[0].aborted
    assert c.tracker.events == []


def test_write_failure_is_451_at_end_of_data(c):
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    c.store.fail_write = True
    assert c.send(b"x\r\n.\r\n") == b"451 4.3.0 Error: internal error, try again later\r\n"
    assert c.store.committed == []


def test_open_writer_failure_is_451(c):
    c.ehlo()
    c.envelope()
    c.store.fail_write = True  # the Received header write fails inside open
    assert c.send(b"DATA\r\n") == b"451 4.3.0 Error: internal error, try again later\r\n"
    assert c.send(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"


def test_disconnect_mid_data_queues_nothing(c):
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\nSubject: partial\r\n\r\nsome")
    c.lose()
    assert c.store.committed == [] and c.store.writers[0].aborted
    assert c.factory.sessions == set()


def test_disconnect_while_commit_pending_keeps_the_commit(c):
    c.store.manual = True
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\nx\r\n.\r\n")
    c.lose()
    writer, _, d = c.store.pending[0]
    d.callback(None)
    assert writer.committed and not writer.aborted
    assert c.read() == b""


# ------------------------------------------------------------ timeouts


def test_command_timeout(c):
    c.clock.advance(299)
    assert c.read() == b""
    c.send(b"NOOP\r\n")
    c.clock.advance(299)
    assert not c.closed
    c.clock.advance(2)
    assert c.read() == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
    assert c.closed


def test_data_timeout_aborts_the_message(c):
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\nSubject: x\r\n")
    c.clock.advance(181)
    assert c.read() == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
    assert c.store.writers[0].aborted and c.store.committed == []


def test_no_timeout_while_our_own_deferred_is_pending(c):
    c.ehlo()
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<slow@local.test>\r\n")
    c.clock.advance(50)
    assert not c.closed
    c.policy.slow[0].callback(Verdict.ACCEPT)
    assert c.read() == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
    assert c.clock.getDelayedCalls()[0].getTime() == c.clock.seconds() + 300


def test_no_delayed_calls_left_after_quit(c):
    c.send(b"QUIT\r\n")
    c.lose()
    assert c.clock.getDelayedCalls() == []


# ------------------------------------------------------------ connect verdicts


def test_connect_rejected_by_policy():
    clock = Clock()
    config = ReceiveConnectorConfig(name="x", hostname="mx.test")
    policy = FakePolicy()
    policy.connect_verdict = Verdict.reject(550, "5.7.1", "Go away")
    factory = ESMTPServerFactory(config, policy, FilterChain([], clock), RecordingStore(), clock)
    proto = factory.buildProtocol(None)
    t = StringTransport()
    proto.makeConnection(t)
    assert t.value() == b"554 5.7.1 Go away\r\n" and t.disconnecting


# ------------------------------------------------------------ filters


class Tagger(FilterBase):
    name = "tagger"

    async def on_data(self, session, txn, message):
        subject = message.headers.get("Subject", "")
        message.edits.replace_header("Subject", f"[EXT] {subject}")
        message.edits.add_header("X-Checked", "yes")
        return Verdict.CONTINUE


class Rejecter(FilterBase):
    name = "rejecter"

    def __init__(self, phase: str, verdict: Verdict) -> None:
        self.phase, self.verdict = phase, verdict

    def on_helo(self, session):
        return self.verdict if self.phase == "helo" else Verdict.CONTINUE

    def on_mail(self, session, sender, params):
        return self.verdict if self.phase == "mail" else Verdict.CONTINUE

    def on_rcpt(self, session, txn, rcpt, params):
        return self.verdict if self.phase == "rcpt" else Verdict.CONTINUE

    def on_data(self, session, txn, message):
        return self.verdict if self.phase == "data" else Verdict.CONTINUE


class Hanging(FilterBase):
    """Answers end of data only when the test fires the Deferred it keeps in ``pending``."""

    name = "hanging"

    def __init__(self) -> None:
        self.pending: list[Deferred] = []

    def on_data(self, session, txn, message):
        self.pending.append(Deferred())
        return self.pending[-1]


def test_header_edits_are_applied_before_commit():
    c = make(filters=[Tagger()])
    c.read()
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    assert c.send(b"Subject: hello\r\nDKIM-Signature: v=1;\r\n b=abc\r\n\r\nbody\r\n.\r\n") == (
        b"250 2.0.0 Ok: queued as Q1\r\n"
    )
    content, env = c.store.committed[0]
    assert content.endswith(b"Subject: [EXT] hello\r\nDKIM-Signature: v=1;\r\n b=abc\r\nX-Checked: yes\r\n\r\nbody\r\n")
    assert content.startswith(b"Received: from client.test")
    assert env.size == len(content)


@pytest.mark.parametrize("phase, command", [
    ("mail", b"MAIL FROM:<a@sender.test>\r\n"),
    ("helo", b"EHLO again.test\r\n"),
])
def test_filter_rejections_reach_the_wire(phase, command):
    c = make(filters=[Rejecter(phase, Verdict.reject(550, "5.7.1", f"no {phase}"))])
    c.read()
    if phase != "helo":
        c.ehlo()
    assert c.send(command) == f"550 5.7.1 no {phase}\r\n".encode()


def test_filter_rcpt_tempfail():
    c = make(filters=[Rejecter("rcpt", Verdict.tempfail(450, "4.2.0", "greylisted"))])
    c.read()
    c.ehlo()
    c.send(b"MAIL FROM:<a@sender.test>\r\n")
    assert c.send(b"RCPT TO:<b@local.test>\r\n") == b"450 4.2.0 greylisted\r\n"


def test_filter_data_reject_and_disconnect():
    c = make(filters=[Rejecter("data", Verdict.reject(554, "5.7.1", "spam"))])
    c.read()
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    assert c.send(b"x\r\n.\r\n") == b"554 5.7.1 spam\r\n"
    assert c.store.committed == [] and c.store.writers[0].aborted
    c = make(filters=[Rejecter("data", Verdict.disconnect(421, "4.7.0", "bye"))])
    c.read()
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    assert c.send(b"x\r\n.\r\n") == b"421 4.7.0 bye\r\n"
    assert c.closed


def test_discard_answers_250_and_queues_nothing():
    c = make(filters=[Rejecter("data", Verdict.discard())])
    c.read()
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    assert c.send(b"x\r\n.\r\n") == b"250 2.0.0 Ok: queued as Q1\r\n"
    assert c.store.committed == [] and c.store.writers[0].aborted
    assert [e.event_id for e in c.tracker.events] == [TrackingEventId.AGENTINFO, TrackingEventId.DROP]
    assert c.tracker.events[1].details["filter"] == "rejecter"


def test_discard_at_rcpt_discards_the_message():
    c = make(filters=[Rejecter("rcpt", Verdict.discard())])
    c.read()
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    assert c.send(b"x\r\n.\r\n") == b"250 2.0.0 Ok: queued as Q1\r\n"
    assert c.store.committed == []


def test_hanging_filter_times_out_to_451():
    c = make(filters=[Hanging()])
    c.read()
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    assert c.send(b"x\r\n.\r\n") == b""
    c.clock.advance(11)
    assert c.read() == b"451 4.3.0 Error: temporary failure in message checks\r\n"
    assert c.store.committed == []


# ------------------------------------------------------------ STARTTLS


def test_starttls_discards_injected_plaintext_and_resets():
    """CVE-2011-0411 / probe 2: nothing pipelined after STARTTLS may be executed."""
    ctx = object()
    c = make(tls=ctx)
    c.read()
    c.send(b"EHLO c\r\n")
    c.send(b"MAIL FROM:<a@sender.test>\r\n")
    out = c.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\nRCPT TO:<b@local.test>\r\n")
    assert out == b"220 2.0.0 Ready to start TLS\r\n"
    assert c.transport.tls_started_with is ctx
    assert c.proto.txn is None and c.proto.session.helo_name is None
    assert c.send(b"MAIL FROM:<a@sender.test>\r\n") == b"503 5.5.1 Error: send HELO/EHLO first\r\n"
    ehlo = c.send(b"EHLO c\r\n")
    assert b"STARTTLS" not in ehlo
    assert c.send(b"STARTTLS\r\n") == b"503 5.5.1 Error: TLS already active\r\n"
    c.envelope()
    c.send(b"DATA\r\n")
    c.send(b"x\r\n.\r\n")
    assert b" with ESMTPS id Q1" in c.store.committed[0][0]


def test_starttls_needs_ehlo_first():
    c = make(tls=object())
    c.read()
    assert c.send(b"STARTTLS\r\n") == b"503 5.5.1 Error: send HELO/EHLO first\r\n"


# ------------------------------------------------------------ shutdown


def test_shutdown_closes_idle_sessions_at_once():
    c = make()
    c.read()
    d = c.factory.shutdown(30)
    assert c.read() == b"421 4.3.2 mx.test Service shutting down\r\n"
    assert c.closed and not d.called
    c.lose()
    assert d.called


def test_shutdown_lets_a_transaction_finish_then_refuses_new_ones(c):
    c.ehlo()
    c.envelope()
    d = c.factory.shutdown(30)
    assert c.read() == b""
    c.send(b"DATA\r\n")
    assert c.send(b"x\r\n.\r\nMAIL FROM:<a@sender.test>\r\n") == (
        b"250 2.0.0 Ok: queued as Q1\r\n421 4.3.2 mx.test Service shutting down\r\n"
    )
    c.lose()
    assert d.called and c.clock.getDelayedCalls() == []


def test_shutdown_grace_over_closes_everything(c):
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\npartial")
    d = c.factory.shutdown(30)
    c.clock.advance(30)
    assert c.read() == b"421 4.3.2 mx.test Service shutting down\r\n"
    assert c.store.writers[0].aborted
    c.lose()
    assert d.called


def test_new_connection_during_shutdown_gets_421():
    c = make()
    c.read()
    c.factory.shutdown(30)
    c.lose()
    proto = c.factory.buildProtocol(None)
    t = StringTransport()
    proto.makeConnection(t)
    assert t.value() == b"421 4.3.2 mx.test Service shutting down\r\n" and t.disconnecting


def test_shutdown_without_sessions_fires_at_once():
    c = make()
    c.lose()
    assert c.factory.shutdown(5).called


# ------------------------------------------------------------ more edge cases


def test_connect_check_failure_is_421_and_close():
    clock = Clock()
    policy = FakePolicy()
    policy.check_connect = lambda session: 1 / 0  # type: ignore[method-assign]
    factory = ESMTPServerFactory(ReceiveConnectorConfig(name="x", hostname="mx.test"), policy,
                                 FilterChain([], clock), RecordingStore(), clock)
    proto = factory.buildProtocol(None)
    t = StringTransport()
    proto.makeConnection(t)
    assert t.value() == b"421 4.3.0 mx.test Error: internal error, try again later\r\n" and t.disconnecting


def test_long_orcpt_fits_the_rfc3461_allowance(c):
    c.ehlo()
    c.send(b"MAIL FROM:<a@sender.test>\r\n")
    orcpt = b"rfc822;" + b"o" * 600 + b"@x.test"
    assert c.send(b"RCPT TO:<b@local.test> ORCPT=" + orcpt + b"\r\n") == b"250 2.1.5 Ok\r\n"
    assert c.send(b"NOOP " + b"n" * 600 + b"\r\n") == b"500 5.5.6 Error: line too long\r\n"


def test_ipv6_client_in_received():
    c = make()
    c.proto.session.peer_ip = "2001:db8::7"
    c.read()
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\nx\r\n.\r\n")
    assert c.store.committed[0][0].startswith(b"Received: from client.test ([IPv6:2001:db8::7])\r\n")


def test_disconnect_while_data_filter_runs_queues_nothing():
    hanging = Hanging()
    c = make(filters=[hanging])
    c.read()
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\nx\r\n.\r\n")
    c.lose()
    hanging.pending[0].callback(Verdict.CONTINUE)
    assert c.store.committed == [] and c.store.writers[0].aborted


def test_tracker_failure_does_not_change_the_reply(c):
    c.tracker.track = lambda event: 1 / 0  # type: ignore[method-assign]
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    assert c.send(b"x\r\n.\r\n") == b"250 2.0.0 Ok: queued as Q1\r\n"


# ------------------------------------------------------------ regressions: ../shared/probes/twisted_mail_probe.py


def test_probe1_ehlo_lists_what_we_do_and_no_auth_in_plaintext():
    c = make(tls=object())
    c.read()
    out = c.send(b"EHLO client.test\r\n")
    for ext in (b"PIPELINING", b"SIZE 1000000", b"8BITMIME", b"SMTPUTF8", b"ENHANCEDSTATUSCODES",
                b"CHUNKING", b"DSN", b"STARTTLS"):
        assert b"250-" + ext + b"\r\n" in out or b"250 " + ext + b"\r\n" in out
    assert b"AUTH" not in out


def test_probe4_unknown_mail_parameter_is_555_and_nothing_is_recorded(c):
    c.ehlo()
    out = c.send(b"MAIL FROM:<a@x.test> SIZE=99999999999 BODY=BINARYMIME SMTPUTF8 NONSENSE=1\r\n")
    assert out == b"555 5.5.4 Error: unsupported parameter\r\n"
    assert c.proto.txn is None


def test_probe5_bdat_works_and_bare_auth_does_not_crash(c):
    c.ehlo()
    c.envelope()
    assert c.send(b"BDAT 5 LAST\r\nhello") == b"250 2.0.0 Ok: queued as Q1\r\n"
    assert c.send(b"AUTH\r\n") == b"502 5.5.1 Error: command not implemented\r\n"
    assert not c.closed


def test_probe6_one_commit_for_all_recipients_and_4xx_on_failure(c):
    c.store.fail_commit = True
    c.ehlo()
    c.envelope(rcpts=("ok@local.test", "broken@local.test"))
    c.send(b"DATA\r\n")
    assert c.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n") == b"451 4.3.0 Error: internal error, try again later\r\n"
    assert len(c.store.writers) == 1  # one copy of the message, not one per recipient


def test_probe7_lf_dot_lf_stays_inside_and_is_refused(c):
    c.ehlo()
    c.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<ok@local.test>\r\nDATA\r\n")
    out = c.send(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<smuggled@evil.test>\r\n.\r\n")
    assert out == b"550 5.6.11 Error: bare <LF> or <CR> not allowed in message content\r\n"


def test_long_text_lines_accepted_by_default(c):
    """Real internet mail has lines over 1000 octets; Postfix and Exchange accept it, so does the default."""
    assert ReceiveConnectorConfig(name="x").max_text_line == 0
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    assert c.send(b"Subject: x\r\n\r\n" + b"x" * 5000 + b"\r\n.\r\n") == b"250 2.0.0 Ok: queued as Q1\r\n"


def test_probe8_stuffer_at_a_16k_chunk_boundary_does_not_end_data_early():
    from exmta.smtp.wire import DotStuffer

    c = make(max_text_line=0)  # the probe's first line is 16 KiB long
    c.read()

    n = 2 ** 14
    body = b"Subject: t\n\n" + b"A" * (n - 1 - len(b"Subject: t\n\n")) + b"\n" + b".\nRSET\n"
    stuffer = DotStuffer()
    wire = b"".join(stuffer.feed(body[i:i + n]) for i in range(0, len(body), n)) + stuffer.finish()
    assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    assert c.send(wire) == b"250 2.0.0 Ok: queued as Q1\r\n"
    assert c.store.committed[0][0].endswith(b"\r\n.\r\nRSET\r\n")


def test_probe9_utf8_envelope_addresses(c):
    c.ehlo()
    out = c.send("MAIL FROM:<j\u00f6hn@ex\u00e4mple.test> SMTPUTF8\r\n".encode())
    assert out == b"250 2.1.0 Ok\r\n"
    assert c.send("RCPT TO:<\u00fc@local.test>\r\n".encode()) == b"250 2.1.5 Ok\r\n"


# ------------------------------------------------------------ fuzz: whatever arrives, the server stays sane

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_TOKENS = [
    b"EHLO c\r\n", b"HELO c\r\n", b"MAIL FROM:<a@s.test>\r\n", b"MAIL FROM:<a@s.test> SIZE=5\r\n",
    b"RCPT TO:<b@local.test>\r\n", b"RCPT TO:<x@denied.test>\r\n", b"DATA\r\n", b"BDAT 3\r\n",
    b"BDAT 2 LAST\r\n", b"RSET\r\n", b"NOOP\r\n", b"x\r\n", b".\r\n", b"\r\n", b"\n", b"\r", b".",
    b"\x00", b"\xff", b"A" * 300, b"STARTTLS\r\n", b"VRFY x\r\n",
    b"MAIL FROM:<a@s.test> BODY=BINARYMIME SMTPUTF8 RET=FULL ENVID=+FF\r\n",
    b"RCPT TO:<postmaster> NOTIFY=NEVER ORCPT=utf-8;\\x{FFFFFF}\r\n", "RCPT TO:<\u00fc@local.test>\r\n".encode(),
    b"BDAT 0 LAST\r\n", b"BDAT x\r\n", b"QUIT\r\n", b"Subject: s\r\n",
]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=40), st.integers(min_value=1, max_value=50))
def test_fuzzed_sessions_never_crash_and_answer_with_valid_replies(tokens, cut):
    c = make(max_errors=1000)
    stream = b"".join(tokens)
    for i in range(0, len(stream), cut):
        c.proto.dataReceived(stream[i:i + cut])
    out = c.read()
    for line in out.split(b"\r\n")[:-1]:
        assert re.fullmatch(rb"[2-5]\d\d[ -].*", line), line
        assert not line.startswith(b"451 4.3.0")  # no internal errors
    queued = out.count(b"queued as")
    assert queued == len(c.store.committed)
    c.lose()
    assert all(w.aborted or w.committed for w in c.store.writers)
    assert c.clock.getDelayedCalls() == []


def test_bare_postmaster_is_qualified_in_the_envelope(c):
    c.ehlo()
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<Postmaster>\r\nDATA\r\n")
    c.send(b"x\r\n.\r\n")
    assert [r.address for r in c.store.committed[0][1].recipients] == ["Postmaster@mx.test"]
    c.factory.postmaster_domain = "local.test"
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<postmaster>\r\nDATA\r\nx\r\n.\r\n")
    assert [r.address for r in c.store.committed[1][1].recipients] == ["postmaster@local.test"]


def test_received_header_stays_ascii_without_smtputf8(c):
    c.send("EHLO h\u00e9lo.test\r\n".encode())
    c.envelope()
    c.send(b"DATA\r\nx\r\n.\r\n")
    assert c.store.committed[0][0].startswith(b"Received: from h?lo.test ([192.0.2.7])")


def test_disabled_extensions_are_not_advertised():
    c = make()
    c.read()
    c.factory.disabled_extensions |= {"CHUNKING", "BINARYMIME"}
    out = c.send(b"EHLO c\r\n")
    assert b"CHUNKING" not in out and b"BINARYMIME" not in out and b"250-PIPELINING" in out
    assert c.send(b"MAIL FROM:<a@b.test> BODY=BINARYMIME\r\n") == b"555 5.5.4 Error: unsupported parameter\r\n"


def test_junk_commands_count_as_errors_past_the_limit():
    c = make(max_errors=5)
    c.read()
    out = c.send(b"NOOP\r\n" * 104 + b"VRFY x\r\n")
    assert out == b"250 2.0.0 Ok\r\n" * 104 + b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n" + (
        b"421 4.7.0 mx.test Error: too many errors\r\n"
    )
    assert c.closed


def test_auth_parameter_from_an_unauthenticated_client_is_not_trusted(c):
    c.ehlo()
    c.envelope(mail_params=b" AUTH=someone+40x.test")
    c.send(b"DATA\r\nx\r\n.\r\n")
    assert c.store.committed[0][1].params.auth == "<>"


def test_session_end_is_logged_with_command_counts():
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        c = make()
        c.send(b"EHLO c\r\nNOOP\r\nNOOP\r\nXYZZY\r\nQUIT\r\n")
        c.lose()
    finally:
        globalLogPublisher.removeObserver(events.append)
    # one line per session (benchmarks/PERFORMANCE.rst): no start line, the end line names the peer
    assert not [e for e in events if e.get("log_format", "").startswith("session {session_id} start")]
    [end] = [e for e in events if e.get("session_end")]
    assert end["session_id"] == c.proto.session.session_id
    assert (end["peer_ip"], end["peer_port"]) == (c.proto.session.peer_ip, c.proto.session.peer_port)
    assert end["commands"] == "ehlo=1 noop=2 unknown=1 quit=1"
    assert end["errors"] == 1 and end["connector"] == "inbound"
    assert end["queued"] == "" and end["messages"] == 0


def test_session_end_line_names_the_queued_messages():
    from twisted.logger import formatEvent, globalLogPublisher

    from exmta.smtp import server

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        c = make()
        c.read()
        c.ehlo()
        for _ in range(server._IDS_LOGGED + 2):
            c.envelope()
            c.send(b"DATA\r\n")
            c.send(b"x\r\n.\r\n")
        c.send(b"QUIT\r\n")
        c.lose()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not [e for e in events if "queued {queue_id}" in e.get("log_format", "")], "no line per message"
    [end] = [e for e in events if e.get("session_end")]
    ids = " ".join(f"Q{i}" for i in range(1, server._IDS_LOGGED + 1))
    assert f"12 message(s) queued ({ids} +2 more), 0 error(s)" in formatEvent(end)


def test_refused_and_discarded_messages_are_tracked():
    c = make(filters=[Rejecter("data", Verdict.reject(554, "5.7.1", "spam"))], max_message_size=50)
    c.read()
    c.ehlo()
    for payload in (b"x\r\n.\r\n", b"a\nb\r\n.\r\n", b"y" * 100 + b"\r\n.\r\n"):
        c.envelope()
        c.send(b"DATA\r\n")
        c.send(payload)
    reasons = [(e.event_id, e.reply, e.details["reason"]) for e in c.tracker.events
               if e.event_id is not TrackingEventId.AGENTINFO]
    assert reasons == [
        (TrackingEventId.REJECT, "554 5.7.1 spam", "filter"),
        (TrackingEventId.REJECT, "550 5.6.11 Error: bare <LF> or <CR> not allowed in message content",
         "bare newline"),
        (TrackingEventId.REJECT, "552 5.3.4 Error: message file too big", "message too big"),
    ]
    assert c.tracker.events[1].recipients == ("b@local.test",)
    d = make(filters=[Rejecter("data", Verdict.discard())])
    d.read()
    d.ehlo()
    d.envelope()
    d.send(b"DATA\r\nx\r\n.\r\n")
    _, event = d.tracker.events
    assert event.event_id is TrackingEventId.DROP and event.queue_id == "Q1"


def test_configured_banner_follows_the_hostname():
    c = make(banner="Microsoft ESMTP MAIL Service ready")
    assert c.read() == b"220 mx.test Microsoft ESMTP MAIL Service ready\r\n"


def test_shutdown_while_data_filter_runs_queues_nothing():
    hanging = Hanging()
    c = make(filters=[hanging])
    c.read()
    c.ehlo()
    c.envelope()
    assert c.send(b"DATA\r\n") == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert c.send(b"x\r\n.\r\n") == b""
    c.factory.shutdown(5)
    c.clock.advance(5)
    assert c.read() == b"421 4.3.2 mx.test Service shutting down\r\n"
    hanging.pending[0].callback(Verdict.CONTINUE)
    assert c.store.committed == [] and c.store.writers[0].aborted


def test_write_back_pressure_stops_processing_until_replies_drain(c):
    assert c.transport.producer is c.proto and c.transport.streaming
    c.ehlo()
    c.proto.pauseProducing()  # what a TCP transport does when its send buffer is full
    assert c.transport.producerState == "paused"
    assert c.send(b"NOOP\r\nNOOP\r\n") == b""
    c.proto.resumeProducing()
    assert c.transport.producerState == "producing"
    assert c.read() == b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n"
    c.send(b"QUIT\r\n")
    assert c.transport.producer is None  # unregistered, so the close is not held up


def test_a_client_that_never_reads_is_timed_out(c):
    c.proto.pauseProducing()
    c.send(b"NOOP\r\n" * 10)
    c.clock.advance(301)
    assert c.read() == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
    assert c.closed


def test_header_firewall_strips_exchange_org_headers_from_untrusted_sessions():
    message = (b"X-MS-Exchange-Organization-AuthAs: Internal\r\nSubject: s\r\n"
               b"x-ms-exchange-crosspremises-scl: -1\r\nX-MS-Exchange-Forest-Foo: 1\r\n"
               b"X-MS-Has-Attach: yes\r\n\r\nbody\r\n.\r\n")
    c = make()
    c.read()
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n" + message)
    content = c.store.committed[0][0]
    assert b"X-MS-Exchange-Organization" not in content and b"crosspremises" not in content
    assert b"X-MS-Exchange-Forest" not in content
    assert content.endswith(b"Subject: s\r\nX-MS-Has-Attach: yes\r\n\r\nbody\r\n")
    t = make()
    t.factory.trusted = lambda session: session.peer_ip == "192.0.2.7"
    t.read()
    t.ehlo()
    t.envelope()
    t.send(b"DATA\r\n" + message)
    assert t.store.committed[0][0].endswith(message[:-3])  # byte-exact for a trusted peer


def test_mail_loop_is_refused_by_hop_count(c):
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    looped = b"Received: from a by b; x\r\n" * 29 + b"Subject: loop\r\n\r\nx\r\n.\r\n"
    assert c.send(looped) == b"250 2.0.0 Ok: queued as Q1\r\n"  # 29 + ours = 30: still fine
    c.envelope()
    c.send(b"DATA\r\n")
    assert c.send(b"Received: x\r\n" + looped) == b"554 5.4.6 Error: too many hops (mail forwarding loop)\r\n"
    assert len(c.store.committed) == 1 and c.store.writers[1].aborted


def test_eight_bit_message_id_becomes_valid_text(c):
    import json

    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\n")
    c.send(b"Message-ID: <\xc3\xa9t\xe9@x.test>\r\n\r\nx\r\n.\r\n")
    env = c.store.committed[0][1]
    assert env.message_id == "<\u00e9t\ufffd@x.test>"
    json.dumps(env.to_json(), ensure_ascii=False).encode("utf-8")  # storable as UTF-8


def test_folded_message_id_is_unfolded(c):
    c.ehlo()
    c.envelope()
    c.send(b"DATA\r\nMessage-ID:\r\n <folded@x.test>\r\n\r\nx\r\n.\r\n")
    assert c.store.committed[0][1].message_id == "<folded@x.test>"
