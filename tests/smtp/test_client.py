"""ESMTP/LMTP client on StringTransport and Clock: exact bytes, per-recipient results."""
from __future__ import annotations

import io
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from exmta.model import (
    Body, DeliveryRequest, Envelope, MailParams, Outcome, Recipient,
)
from exmta.smtp.client import (
    ClientTimeouts, ConnectionLostError, ProtocolError, ReplyTimeout, SMTPClientProtocol,
    SessionFailure, StaleConnection,
)
from support.smtp_stubs import TLSStringTransport
from support.sync import failure as failure_of, result as results_of

MESSAGE = b"Subject: hi\r\n\r\nHello\r\n.dot line\r\n"


def make_request(rcpts: tuple[str, ...] = ("a@example.net", "b@example.net"), content: bytes = MESSAGE,
                 sender: str = "s@example.org", params: MailParams | None = None,
                 recipients: tuple[Recipient, ...] | None = None) -> DeliveryRequest:
    recipients = recipients or tuple(Recipient(r) for r in rcpts)
    env = Envelope(sender=sender, recipients=list(recipients), params=params or MailParams(),
                   queue_id="Q1", size=len(content))
    return DeliveryRequest("Q1", env, recipients, lambda: io.BytesIO(content))


class Peer:
    """Drives a client protocol: feeds server lines, reads what the client wrote."""

    def __init__(self, transport: StringTransport | None = None, **kw: Any) -> None:
        self.clock = Clock()
        kw.setdefault("tls_mode", "none")
        self.proto = SMTPClientProtocol(self.clock, "client.test", remote_host="mx.test[127.0.0.1]:25", **kw)
        self.transport = transport or StringTransport()
        self.proto.makeConnection(self.transport)

    def server(self, *lines: str) -> None:
        self.proto.dataReceived("".join(line + "\r\n" for line in lines).encode())

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def sent_lines(self) -> list[str]:
        return self.sent().decode().split("\r\n")[:-1]

    def establish(self, ehlo: tuple[str, ...] = ("250-mx.test", "250-PIPELINING", "250 8BITMIME")) -> Any:
        d = self.proto.establish()
        self.server("220 mx.test ESMTP")
        assert self.sent_lines() == ["EHLO client.test"]
        self.server(*ehlo)
        return d


# ---------------------------------------------------------------- session


def test_ehlo_capabilities_parsed() -> None:
    p = Peer()
    d = p.establish(("250-mx.test hello", "250-SIZE 1000", "250-pipelining", "250-DSN", "250 8BITMIME"))
    assert results_of(d.addCallback(lambda _: [])) == []
    assert p.proto.capabilities == {"SIZE": "1000", "PIPELINING": "", "DSN": "", "8BITMIME": ""}
    assert p.proto.esmtp and p.proto.usable


def test_helo_fallback_on_5xx_ehlo() -> None:
    p = Peer()
    d = p.proto.establish()
    p.server("220 old.test")
    assert p.sent_lines() == ["EHLO client.test"]
    p.server("502 5.5.2 what")
    assert p.sent_lines() == ["HELO client.test"]
    p.server("250 old.test")
    assert results_of(d.addCallback(lambda _: [])) == []
    assert not p.proto.esmtp and p.proto.capabilities == {}
    # no pipelining without ESMTP: one command at a time
    dd = p.proto.deliver(make_request(rcpts=("a@example.net",)))
    assert p.sent_lines() == ["MAIL FROM:<s@example.org>"]
    p.server("250 ok")
    assert p.sent_lines() == ["RCPT TO:<a@example.net>"]
    p.server("250 ok")
    assert p.sent_lines() == ["DATA"]
    p.server("354 go")
    assert p.sent() == b"Subject: hi\r\n\r\nHello\r\n..dot line\r\n.\r\n"
    p.server("250 2.0.0 queued")
    [r] = results_of(dd)
    assert r.outcome is Outcome.DELIVERED and r.reply.status == "2.0.0"


@pytest.mark.parametrize("greeting,permanent", [("421 4.3.2 busy", False), ("554 5.7.1 go away", True)])
def test_greeting_refused(greeting: str, permanent: bool) -> None:
    p = Peer()
    d = p.proto.establish()
    p.server(greeting)
    assert p.sent_lines() == ["QUIT"]
    p.server("221 bye")
    f = failure_of(d)
    assert f.check(SessionFailure)
    assert f.value.permanent is permanent and f.value.phase == "greeting"
    assert f.value.reply.code == int(greeting[:3])
    assert p.transport.disconnecting


def test_greeting_timeout() -> None:
    p = Peer(timeouts=ClientTimeouts(greeting=10))
    d = p.proto.establish()
    p.clock.advance(9.9)
    assert not d.called
    p.clock.advance(0.2)
    f = failure_of(d)
    assert f.check(ReplyTimeout)
    assert f.value.reply.code == 451 and f.value.reply.status.startswith("4.4.")
    assert "greeting" in f.value.reply.text


def test_mandatory_tls_not_offered() -> None:
    p = Peer(transport=TLSStringTransport(), tls_mode="mandatory", tls_context=object())
    d = p.establish()
    assert p.sent_lines() == ["QUIT"]
    p.server("221 bye")
    f = failure_of(d)
    assert f.check(SessionFailure) and not f.value.permanent
    assert f.value.reply.status == "4.7.5" and "mandatory" in f.value.reply.text


def test_mandatory_tls_refused_never_falls_back() -> None:
    p = Peer(transport=TLSStringTransport(), tls_mode="mandatory", tls_context=object())
    d = p.establish(("250-mx.test", "250 STARTTLS"))
    assert p.sent_lines() == ["STARTTLS"]
    p.server("454 4.7.0 TLS not available")
    assert p.sent_lines() == ["QUIT"]
    p.server("221 bye")
    f = failure_of(d)
    assert f.check(SessionFailure) and "refused" in f.value.reply.text
    assert p.transport.tls_started_with is None


def test_opportunistic_tls_refused_continues_plain() -> None:
    p = Peer(transport=TLSStringTransport(), tls_mode="opportunistic", tls_context=object())
    d = p.establish(("250-mx.test", "250 STARTTLS"))
    assert p.sent_lines() == ["STARTTLS"]
    p.server("454 4.7.0 TLS not available")
    assert results_of(d.addCallback(lambda _: [])) == []
    assert p.proto.tls is None and p.proto.usable


def test_starttls_then_ehlo_again_and_auth() -> None:
    ctx = object()
    p = Peer(transport=TLSStringTransport(), tls_mode="mandatory", tls_context=ctx,
             username="user", password="pw")
    d = p.establish(("250-mx.test", "250-AUTH PLAIN LOGIN", "250 STARTTLS"))
    assert p.sent_lines() == ["STARTTLS"]
    p.server("220 2.0.0 go ahead")
    assert p.transport.tls_started_with is ctx
    assert p.sent_lines() == ["EHLO client.test"]
    p.server("250-mx.test", "250 AUTH PLAIN LOGIN")
    assert p.sent_lines() == ["AUTH PLAIN AHVzZXIAcHc="]
    p.server("235 2.7.0 ok")
    assert results_of(d.addCallback(lambda _: [])) == []
    assert p.proto.authenticated and p.proto.tls == "TLS"


def test_no_auth_in_plaintext() -> None:
    p = Peer(username="user", password="pw")
    d = p.establish(("250-mx.test", "250 AUTH PLAIN"))
    assert p.sent() == b""
    assert results_of(d.addCallback(lambda _: [])) == []
    assert not p.proto.authenticated


def test_auth_login_failure_defers() -> None:
    p = Peer(transport=TLSStringTransport(), tls_mode="opportunistic", tls_context=object(),
             username="user", password="pw")
    d = p.establish(("250-mx.test", "250 STARTTLS"))
    p.sent()
    p.server("220 go")
    p.sent()
    p.server("250-mx.test", "250 AUTH LOGIN")
    assert p.sent_lines() == ["AUTH LOGIN"]
    p.server("334 VXNlcm5hbWU6")
    assert p.sent_lines() == ["dXNlcg=="]
    p.server("334 UGFzc3dvcmQ6")
    assert p.sent_lines() == ["cHc="]
    p.server("535 5.7.8 bad credentials")
    assert p.sent_lines() == ["QUIT"]
    p.server("221 bye")
    f = failure_of(d)
    assert f.check(SessionFailure) and f.value.phase == "AUTH"
    assert f.value.reply.code == 451 and "535" in f.value.reply.text


def test_injected_reply_after_starttls_220_refused() -> None:
    p = Peer(transport=TLSStringTransport(), tls_mode="opportunistic", tls_context=object())
    d = p.establish(("250-mx.test", "250 STARTTLS"))
    p.sent()
    p.server("220 go", "250 injected")
    assert p.sent_lines() == ["QUIT"]
    p.server("221 bye")
    f = failure_of(d)
    assert f.check(SessionFailure) and "injection" in f.value.reply.text
    assert p.transport.tls_started_with is None


# ---------------------------------------------------------------- transactions


def test_pipelining_one_write_replies_in_order() -> None:
    p = Peer()
    p.establish(("250-mx.test", "250-PIPELINING", "250-SIZE 100000", "250 DSN"))
    rcpts = (Recipient("a@example.net", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;a+x@example.net"),
             Recipient("b@example.net"), Recipient("c@example.net"))
    req = make_request(recipients=rcpts, params=MailParams(ret="HDRS", envid="id=1"))
    d = p.proto.deliver(req)
    assert p.transport.io.getvalue().count(b"\r\n") == 5
    assert p.sent_lines() == [
        f"MAIL FROM:<s@example.org> SIZE={len(MESSAGE)} RET=HDRS ENVID=id+3D1",
        "RCPT TO:<a@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Bx@example.net",
        "RCPT TO:<b@example.net>",
        "RCPT TO:<c@example.net>",
        "DATA",
    ]
    p.server("250 2.1.0 ok", "250 2.1.5 ok", "550 5.1.1 no such user", "451 4.3.0 later", "354 go")
    assert p.sent().endswith(b"..dot line\r\n.\r\n")
    assert not d.called
    p.server("250 2.0.0 queued as X")
    a, b, c = results_of(d)
    assert (a.recipient, a.outcome, a.reply.code) == ("a@example.net", Outcome.DELIVERED, 250)
    assert (b.outcome, b.reply.status, b.reply.text) == (Outcome.FAILED, "5.1.1", "no such user")
    assert (c.outcome, c.reply.code) == (Outcome.DEFERRED, 451)
    assert a.remote_host == "mx.test[127.0.0.1]:25"


def test_all_recipients_refused_no_data_rset() -> None:
    p = Peer()
    p.establish(("250-mx.test", "250 8BITMIME"))
    d = p.proto.deliver(make_request())
    assert p.sent_lines() == ["MAIL FROM:<s@example.org>"]
    p.server("250 ok")
    p.sent()
    p.server("550 5.1.1 nope")
    p.sent()
    p.server("450 4.2.1 later")
    assert p.sent_lines() == ["RSET"]
    p.server("250 ok")
    a, b = results_of(d)
    assert a.outcome is Outcome.FAILED and b.outcome is Outcome.DEFERRED
    assert p.proto.usable


def test_pipelined_all_refused_but_354_gets_lone_dot() -> None:
    p = Peer()
    p.establish()
    d = p.proto.deliver(make_request(rcpts=("a@example.net",)))
    p.sent()
    p.server("250 ok", "550 5.1.1 nope", "354 go ahead anyway")
    assert p.sent_lines() == ["."]
    p.server("554 5.5.1 no valid recipients")
    assert p.sent_lines() == ["RSET"]
    p.server("250 ok")
    [a] = results_of(d)
    assert a.outcome is Outcome.FAILED and a.reply.text == "nope"


def test_mail_from_refused_fails_everyone() -> None:
    p = Peer()
    p.establish()
    d = p.proto.deliver(make_request())
    p.sent()
    p.server("553 5.7.1 sender refused", "503 5.5.1 no mail", "503 5.5.1 no mail", "503 5.5.1 no")
    assert p.sent_lines() == ["RSET"]
    p.server("250 ok")
    a, b = results_of(d)
    assert a.outcome is b.outcome is Outcome.FAILED
    assert a.reply.text == "sender refused"


def test_data_refused_and_end_of_data_4xx() -> None:
    p = Peer()
    p.establish()
    d = p.proto.deliver(make_request(rcpts=("a@example.net",)))
    p.sent()
    p.server("250 ok", "250 ok", "354 go")
    p.sent()
    p.server("452 4.3.1 disk full")
    [a] = results_of(d)
    assert a.outcome is Outcome.DEFERRED and a.reply.status == "4.3.1"


def test_size_refused_before_mail() -> None:
    p = Peer()
    p.establish(("250-mx.test", "250 SIZE 10"))
    d = p.proto.deliver(make_request())
    assert p.sent() == b""
    a, b = results_of(d)
    assert a.outcome is Outcome.FAILED and a.reply.code == 552 and a.reply.status == "5.3.4"
    assert "exceeds" in a.reply.text


def test_smtputf8_refused_when_not_offered() -> None:
    p = Peer()
    p.establish()
    d = p.proto.deliver(make_request(rcpts=("jürgen@exämple.net",)))
    assert p.sent() == b""
    [a] = results_of(d)
    assert (a.outcome, a.reply.code, a.reply.status) == (Outcome.FAILED, 553, "5.6.7")


def test_smtputf8_and_8bitmime_parameters() -> None:
    p = Peer()
    p.establish(("250-mx.test", "250-SMTPUTF8", "250 8BITMIME"))
    d = p.proto.deliver(make_request(rcpts=("jürgen@exämple.net",),
                                     params=MailParams(body=Body.EIGHT_BIT, smtputf8=True)))
    assert p.sent_lines() == ["MAIL FROM:<s@example.org> BODY=8BITMIME SMTPUTF8"]
    p.server("250 ok")
    assert p.sent().decode() == "RCPT TO:<jürgen@exämple.net>\r\n"
    p.server("250 ok")
    p.sent()
    p.server("354 go")
    p.sent()
    p.server("250 ok")
    [a] = results_of(d)
    assert a.outcome is Outcome.DELIVERED


def test_8bit_body_not_downgraded() -> None:
    p = Peer()
    p.establish(("250-mx.test", "250 PIPELINING"))
    d = p.proto.deliver(make_request(params=MailParams(body=Body.EIGHT_BIT)))
    assert p.sent() == b""
    a, _ = results_of(d)
    assert (a.outcome, a.reply.status) == (Outcome.FAILED, "5.6.3")
    assert "8BITMIME" in a.reply.text


def test_dsn_parameters_omitted_without_dsn() -> None:
    p = Peer()
    p.establish(("250-mx.test", "250 PIPELINING"))
    rc = (Recipient("a@example.net", notify=("NEVER",), orcpt="rfc822;a@example.net"),)
    p.proto.deliver(make_request(recipients=rc, params=MailParams(ret="FULL", envid="x")))
    assert p.sent_lines() == ["MAIL FROM:<s@example.org>", "RCPT TO:<a@example.net>", "DATA"]


def test_bdat_chunking_without_dot_stuffing() -> None:
    p = Peer()
    p.establish(("250-mx.test", "250-PIPELINING", "250 CHUNKING"))
    d = p.proto.deliver(make_request(rcpts=("a@example.net",)))
    assert p.sent_lines() == ["MAIL FROM:<s@example.org>", "RCPT TO:<a@example.net>"]
    p.server("250 ok", "250 ok")
    assert p.sent() == f"BDAT {len(MESSAGE)} LAST\r\n".encode() + MESSAGE
    p.server("250 2.0.0 done")
    [a] = results_of(d)
    assert a.outcome is Outcome.DELIVERED


def test_bdat_multiple_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import exmta.smtp.client as client
    monkeypatch.setattr(client, "BDAT_CHUNK", 10)
    body = b"0123456789" * 2 + b"abc"
    p = Peer()
    p.establish(("250-mx.test", "250 CHUNKING"))
    d = p.proto.deliver(make_request(rcpts=("a@example.net",), content=body))
    p.sent()
    p.server("250 ok")
    p.sent()
    p.server("250 ok")
    assert p.sent() == b"BDAT 10\r\n0123456789"
    p.server("250 2.0.0 10 octets")
    assert p.sent() == b"BDAT 10\r\n0123456789"
    p.server("250 2.0.0 10 octets")
    assert p.sent() == b"BDAT 3 LAST\r\nabc"
    p.server("250 2.0.0 queued")
    assert results_of(d)[0].outcome is Outcome.DELIVERED


def test_bdat_empty_message() -> None:
    p = Peer()
    p.establish(("250-mx.test", "250-PIPELINING", "250 CHUNKING"))
    d = p.proto.deliver(make_request(rcpts=("a@example.net",), content=b""))
    p.sent()
    p.server("250 ok", "250 ok")
    assert p.sent() == b"BDAT 0 LAST\r\n"
    p.server("250 ok")
    assert results_of(d)[0].outcome is Outcome.DELIVERED


def test_reuse_sends_rset_and_stale_connection() -> None:
    p = Peer()
    p.establish()
    d = p.proto.deliver(make_request(rcpts=("a@example.net",)))
    p.sent()
    p.server("250 ok", "250 ok", "354 go")
    p.sent()
    p.server("250 ok")
    assert results_of(d)[0].outcome is Outcome.DELIVERED
    d2 = p.proto.deliver(make_request(rcpts=("b@example.net",)))
    assert p.sent_lines() == ["RSET"]
    p.server("250 ok")
    assert p.sent_lines()[0] == "MAIL FROM:<s@example.org>"
    p.server("250 ok", "250 ok", "354 go")
    p.sent()
    p.server("250 ok")
    assert results_of(d2)[0].outcome is Outcome.DELIVERED
    assert p.proto.messages_sent == 2
    d3 = p.proto.deliver(make_request(rcpts=("c@example.net",)))
    assert p.sent_lines() == ["RSET"]
    p.server("421 4.4.2 idle too long")
    assert failure_of(d3).check(StaleConnection)


# ---------------------------------------------------------------- robustness


def test_timeout_during_rcpt_defers_everyone() -> None:
    p = Peer(timeouts=ClientTimeouts(rcpt=60))
    p.establish()
    d = p.proto.deliver(make_request())
    p.sent()
    p.server("250 ok", "550 5.1.1 no")
    p.clock.advance(61)
    a, b = results_of(d)
    assert a.outcome is Outcome.FAILED  # already decided before the timeout
    assert b.outcome is Outcome.DEFERRED and b.reply.status == "4.4.2" and "RCPT" in b.reply.text
    assert p.transport.disconnecting or p.transport.disconnected
    assert not p.proto.usable
    assert p.clock.getDelayedCalls() == []


def test_data_end_timeout_uses_its_own_value() -> None:
    p = Peer(timeouts=ClientTimeouts(data_end=600, rcpt=5, data_init=5))
    p.establish()
    d = p.proto.deliver(make_request(rcpts=("a@example.net",)))
    p.server("250 ok", "250 ok", "354 go")
    p.clock.advance(599)
    assert not d.called
    p.clock.advance(2)
    [a] = results_of(d)
    assert a.outcome is Outcome.DEFERRED and "end of data" in a.reply.text


def test_garbage_reply_defers() -> None:
    p = Peer()
    p.establish()
    d = p.proto.deliver(make_request(rcpts=("a@example.net",)))
    p.server("250 ok", "HTTP/1.1 400 Bad Request")
    [a] = results_of(d)
    assert a.outcome is Outcome.DEFERRED and a.reply.code == 451 and "Malformed" in a.reply.text
    assert p.transport.disconnecting or p.transport.disconnected


def test_inconsistent_multiline_defers() -> None:
    p = Peer()
    d = p.proto.establish()
    p.server("220 ok")
    p.server("250-mx.test", "550 oops")
    f = failure_of(d)
    assert f.check(ProtocolError)


def test_truncated_multiline_then_close_defers() -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    p = Peer()
    p.establish()
    d = p.proto.deliver(make_request(rcpts=("a@example.net",)))
    p.server("250 ok", "250 ok", "354 go")
    p.proto.dataReceived(b"250-first line\r\n250-second")
    p.proto.connectionLost(Failure(ConnectionDone()))
    [a] = results_of(d)
    assert a.outcome is Outcome.DEFERRED and a.reply.status == "4.4.2"
    assert "middle of a reply" in a.reply.text


def test_multiline_reply_split_anywhere() -> None:
    p = Peer()
    d = p.proto.establish()
    data = b"220 hi\r\n"
    for i in range(len(data)):
        p.proto.dataReceived(data[i:i + 1])
    assert p.sent_lines() == ["EHLO client.test"]
    for byte in b"250-mx.test\r\n250-SIZE 5\r\n250 PIPELINING\r\n":
        p.proto.dataReceived(bytes([byte]))
    assert results_of(d.addCallback(lambda _: [])) == []
    assert p.proto.capabilities == {"SIZE": "5", "PIPELINING": ""}


def test_connection_lost_before_greeting() -> None:
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure
    p = Peer()
    d = p.proto.establish()
    p.proto.connectionLost(Failure(ConnectionLost()))
    assert failure_of(d).check(ConnectionLostError)


# ---------------------------------------------------------------- LMTP


def test_lmtp_one_reply_per_recipient() -> None:
    p = Peer(lmtp=True)
    d0 = p.proto.establish()
    p.server("220 lmtp ready")
    assert p.sent_lines() == ["LHLO client.test"]
    p.server("250-dovecot", "250-PIPELINING", "250 ENHANCEDSTATUSCODES")
    assert results_of(d0.addCallback(lambda _: [])) == []
    d = p.proto.deliver(make_request(rcpts=("a@example.net", "b@example.net", "c@example.net")))
    assert p.sent_lines()[-1] == "DATA"
    p.server("250 ok", "250 ok", "550 5.1.1 unknown", "250 ok", "354 go")
    p.sent()
    p.server("250 2.0.0 <a@example.net> saved")
    assert not d.called
    p.server("452 4.2.2 <c@example.net> quota")
    a, b, c = results_of(d)
    assert a.outcome is Outcome.DELIVERED and b.outcome is Outcome.FAILED
    assert c.outcome is Outcome.DEFERRED and c.reply.status == "4.2.2"


def test_lmtp_lhlo_failure_is_session_failure() -> None:
    p = Peer(lmtp=True)
    d = p.proto.establish()
    p.server("220 lmtp ready")
    p.sent()
    p.server("500 5.5.1 no")
    assert p.sent_lines() == ["QUIT"]
    p.server("221 bye")
    f = failure_of(d)
    assert f.check(SessionFailure) and f.value.phase == "LHLO"


class PausingTransport(StringTransport):
    """Pauses its streaming producer once more than ``limit`` octets are buffered, like TCP."""

    limit = 100_000

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming and len(self.io.getvalue()) > self.limit:
            self.producer.pauseProducing()


def test_streaming_respects_backpressure_and_data_block_timeout() -> None:
    body = b"x" * 998 + b"\r\n"
    content = body * 1000  # ~1 MB
    p = Peer(transport=PausingTransport(), timeouts=ClientTimeouts(data_block=30))
    p.establish()
    d = p.proto.deliver(make_request(rcpts=("a@example.net",), content=content))
    p.sent()
    p.server("250 ok", "250 ok", "354 go")
    first = p.sent()
    assert 100_000 < len(first) < len(content)  # stopped reading the file while paused
    p.proto.resumeProducing()
    second = p.sent()
    assert second and not d.called
    p.clock.advance(29)
    p.proto.resumeProducing()
    rest = b""
    for _ in range(100):
        if rest.endswith(b"\r\n.\r\n"):
            break
        p.clock.advance(1)
        rest += p.sent()
        p.proto.resumeProducing()
    rest += p.sent()
    assert first + second + rest == content + b".\r\n"
    p.server("250 2.0.0 ok")
    assert results_of(d)[0].outcome is Outcome.DELIVERED

    # now a peer that never drains: the data block timeout defers
    p2 = Peer(transport=PausingTransport(), timeouts=ClientTimeouts(data_block=30))
    p2.establish()
    d2 = p2.proto.deliver(make_request(rcpts=("a@example.net",), content=content))
    p2.server("250 ok", "250 ok", "354 go")
    p2.clock.advance(31)
    [r] = results_of(d2)
    assert r.outcome is Outcome.DEFERRED and "sending data" in r.reply.text
    assert p2.transport.disconnecting or p2.transport.disconnected


def test_orcpt_without_type_and_null_sender() -> None:
    p = Peer()
    p.establish(("250-mx.test", "250-PIPELINING", "250 DSN"))
    rc = (Recipient("a@example.net", orcpt="a=b@example.net"),)
    p.proto.deliver(make_request(recipients=rc, sender=""))
    assert p.sent_lines() == ["MAIL FROM:<>", "RCPT TO:<a@example.net> ORCPT=rfc822;a+3Db@example.net", "DATA"]


def test_unsolicited_reply_makes_connection_unusable() -> None:
    p = Peer()
    p.establish()
    assert p.proto.usable
    p.server("421 4.4.2 idle timeout")
    assert not p.proto.usable


def test_quit_waits_for_close_bounded() -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure
    p = Peer(timeouts=ClientTimeouts(quit=5))
    p.establish()
    d = p.proto.quit()
    assert p.sent_lines() == ["QUIT"]
    p.server("221 bye")
    assert p.transport.disconnecting and not d.called
    p.proto.connectionLost(Failure(ConnectionDone()))
    assert d.called and p.clock.getDelayedCalls() == []
    # a peer that never closes: the quit timeout ends the wait
    p2 = Peer(timeouts=ClientTimeouts(quit=5))
    p2.establish()
    d2 = p2.proto.quit()
    p2.server("221 bye")
    p2.clock.advance(5)
    assert d2.called


def test_reused_connection_lost_before_mail_reply_is_stale() -> None:
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure
    p = Peer()
    p.establish()
    d = p.proto.deliver(make_request(rcpts=("a@example.net",)))
    p.server("250 ok", "250 ok", "354 go", "250 ok")
    assert results_of(d)[0].outcome is Outcome.DELIVERED
    d2 = p.proto.deliver(make_request(rcpts=("b@example.net",)))
    p.sent()
    p.server("250 reset")
    p.proto.connectionLost(Failure(ConnectionLost()))
    assert failure_of(d2).check(StaleConnection)
    # on a fresh connection the same loss is a deferral
    p2 = Peer()
    p2.establish()
    d3 = p2.proto.deliver(make_request(rcpts=("a@example.net",)))
    p2.proto.connectionLost(Failure(ConnectionLost()))
    assert results_of(d3)[0].outcome is Outcome.DEFERRED


def test_smtputf8_judged_on_the_recipients_sent() -> None:
    p = Peer()
    p.establish()
    req = make_request(rcpts=("jürgen@exämple.net", "plain@example.net"))
    d = p.proto.deliver(req, [req.recipients[1]])
    assert p.sent_lines()[0] == "MAIL FROM:<s@example.org>"
    p.server("250 ok", "250 ok", "354 go", "250 ok")
    assert [r.recipient for r in results_of(d)] == ["plain@example.net"]


def test_unreadable_content_errbacks_and_drops_the_connection() -> None:
    p = Peer()
    p.establish()
    req = make_request(rcpts=("a@example.net",))

    def broken() -> Any:
        raise OSError("spool file vanished")

    req.open_content = broken
    d = p.proto.deliver(req)
    p.server("250 ok", "250 ok", "354 go")
    f = failure_of(d)
    assert f.check(OSError)
    assert not p.proto.usable and (p.transport.disconnecting or p.transport.disconnected)


def test_the_last_piece_of_content_and_the_final_dot_are_one_write() -> None:
    """A separate small ".\\r\\n" segment would wait for the peer's delayed ACK (Nagle): measured
    on loopback, deliveries fell to half speed when the terminator went out on its own."""
    writes: list[bytes] = []

    class Recording(StringTransport):
        def write(self, data: bytes) -> None:
            writes.append(data)
            super().write(data)

    p = Peer(Recording())
    p.establish(("250-mx.test", "250 PIPELINING"))
    d = p.proto.deliver(make_request(rcpts=("a@example.net",)))
    writes.clear()  # MAIL, RCPT and DATA (one pipelined write)
    p.server("250 2.1.0 ok", "250 2.1.5 ok", "354 go")
    assert not d.called
    # everything after 354 went out in one write, the dot included
    assert writes == [b"Subject: hi\r\n\r\nHello\r\n..dot line\r\n.\r\n"]
    p.server("250 2.0.0 queued")
    assert results_of(d)[0].outcome is Outcome.DELIVERED


@pytest.mark.parametrize("ehlo, peer_dsn", [
    (("250-mx.test", "250 DSN"), True), (("250-mx.test", "250 PIPELINING"), False),
])
def test_results_say_whether_the_next_hop_offered_dsn(ehlo: tuple[str, ...], peer_dsn: bool) -> None:
    """The scheduler sends an action=relayed DSN for NOTIFY=SUCCESS when the hop could not take NOTIFY."""
    p = Peer()
    p.establish(ehlo)
    d = p.proto.deliver(make_request(rcpts=("a@example.net",)))
    p.server("250 2.1.0 ok")
    p.server("250 2.1.5 ok")
    p.server("354 go")
    p.server("250 2.0.0 queued")
    [result] = results_of(d)
    assert result.outcome is Outcome.DELIVERED and result.peer_dsn is peer_dsn
