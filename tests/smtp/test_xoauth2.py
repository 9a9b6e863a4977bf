"""The XOAUTH2 client exchange on StringTransport and Clock: exact bytes, the 334-JSON failure path, one refresh."""
from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock

from exmta.config.schema import OAuth2Config
from exmta.observe.protocol import ProtocolLog
from exmta.send.oauth2 import ClientSecret, TokenSource
from exmta.smtp.client import SMTPClientProtocol, SessionFailure
from exmta.smtp.xoauth2 import XOAuth2Login, error_details, initial_response
from exmta.model import Reply
from support.smtp_stubs import TLSStringTransport
from support.sync import failure as failure_of, result as result_of

CFG = OAuth2Config(token_endpoint="http://127.0.0.1:1/token", client_id="app", client_secret="s3cret",
                   mailbox="relay@contoso.test")


class Endpoint:
    """A token endpoint stand-in that hands out tok-1, tok-2, ... and counts requests."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def post(self, url: str, body: bytes, timeout: float) -> defer.Deferred[tuple[int, bytes]]:
        self.bodies.append(body)
        doc = {"access_token": f"tok-{len(self.bodies)}", "expires_in": 3600, "token_type": "Bearer"}
        return defer.succeed((200, json.dumps(doc).encode()))


class Session:
    def __init__(self, clock: Clock | None = None, source: TokenSource | None = None, user: str = "relay@contoso.test",
                 plog: Any = None) -> None:
        self.clock = clock or Clock()
        self.endpoint = Endpoint()
        self.source = source or TokenSource(CFG, self.clock, post=self.endpoint.post, credential=ClientSecret("s"))
        self.transport = TLSStringTransport()
        self.proto = SMTPClientProtocol(self.clock, "client.test", tls_mode="mandatory", tls_context=object(),
                                        remote_host="smtp.test[127.0.0.1]:587", sasl=XOAuth2Login(user, self.source),
                                        protocol_log=plog)
        self.proto.makeConnection(self.transport)

    def server(self, *lines: str) -> None:
        self.proto.dataReceived("".join(line + "\r\n" for line in lines).encode())

    def sent_lines(self) -> list[str]:
        data = self.transport.value()
        self.transport.clear()
        return data.decode().split("\r\n")[:-1]

    def up_to_auth(self, auth: str = "250 AUTH LOGIN XOAUTH2") -> defer.Deferred[None]:
        d = self.proto.establish()
        self.server("220 smtp.test ESMTP")
        assert self.sent_lines() == ["EHLO client.test"]
        self.server("250-smtp.test", "250 STARTTLS")
        assert self.sent_lines() == ["STARTTLS"]
        self.server("220 2.0.0 go ahead")
        assert self.sent_lines() == ["EHLO client.test"]
        self.server("250-smtp.test", auth)
        return d


def decode(line: str) -> str:
    verb, mech, payload = line.split(" ")
    assert (verb, mech) == ("AUTH", "XOAUTH2")
    return base64.b64decode(payload).decode()


def test_initial_response_format() -> None:
    raw = base64.b64decode(initial_response("relay@contoso.test", "abc"))
    assert raw == b"user=relay@contoso.test\x01auth=Bearer abc\x01\x01"


def test_login_succeeds_with_one_token_request() -> None:
    s = Session()
    d = s.up_to_auth()
    (auth,) = s.sent_lines()
    assert decode(auth) == "user=relay@contoso.test\x01auth=Bearer tok-1\x01\x01"
    s.server("235 2.7.0 Authentication successful")
    assert result_of(d.addCallback(lambda _: "ok")) == "ok"
    assert s.proto.authenticated and len(s.endpoint.bodies) == 1
    assert s.source.requests == {"ok": 1}


def test_334_error_json_gets_an_empty_line_then_535_refreshes_once() -> None:
    clock = Clock()
    s = Session(clock)
    result_of(s.source.token())          # tok-1 is in the cache, obtained at t=0
    clock.advance(120)                   # older than MIN_AGE_TO_DROP
    d = s.up_to_auth()
    assert "Bearer tok-1" in decode(s.sent_lines()[0])
    error = base64.b64encode(json.dumps({"status": "401", "schemes": "bearer", "scope": "mail"}).encode()).decode()
    s.server(f"334 {error}")
    assert s.sent_lines() == [""]        # the spec's empty response to the error challenge
    s.server("535 5.7.8 Authentication failed.")
    (again,) = s.sent_lines()            # a new token at once, on the same session
    assert "Bearer tok-2" in decode(again)
    s.server("235 2.7.0 Logged in.")
    assert result_of(d.addCallback(lambda _: "ok")) == "ok"
    assert len(s.endpoint.bodies) == 2


def test_second_refusal_defers_with_the_reason_and_no_third_token() -> None:
    clock = Clock()
    s = Session(clock)
    result_of(s.source.token())
    clock.advance(120)
    d = s.up_to_auth()
    s.sent_lines()
    s.server("535 5.7.3 Authentication unsuccessful")      # Exchange Online: 535 at once
    assert "Bearer tok-2" in decode(s.sent_lines()[0])
    s.server("535 5.7.3 Authentication unsuccessful")
    assert s.sent_lines() == ["QUIT"]
    s.server("221 bye")
    f = failure_of(d)
    assert f.check(SessionFailure) and f.value.phase == "AUTH"
    assert f.value.reply.code == 451 and f.value.reply.status == "4.7.0"
    assert "XOAUTH2 authentication as relay@contoso.test failed: 535 5.7.3" in f.value.reply.text
    assert "tok-" not in f.value.reply.text
    assert len(s.endpoint.bodies) == 2


def test_replacement_token_refused_is_not_replaced_again() -> None:
    """A 535 for the token that replaced a refused one (no rights, wrong mailbox) costs no new request."""
    clock = Clock()
    s = Session(clock)
    result_of(s.source.token())
    assert s.source.invalidate("tok-1") and result_of(s.source.token()) == "tok-2"
    d = s.up_to_auth()
    assert "Bearer tok-2" in decode(s.sent_lines()[0])
    error = base64.b64encode(b'{"status":"401","schemes":"bearer"}').decode()
    s.server(f"334 {error}")
    assert s.sent_lines() == [""]
    s.server("535 5.7.8 Authentication failed.")
    assert s.sent_lines() == ["QUIT"]
    s.server("221 bye")
    f = failure_of(d)
    assert "schemes=bearer, status=401" in f.value.reply.text
    assert len(s.endpoint.bodies) == 2


def test_403_insufficient_scope_is_not_a_token_problem() -> None:
    clock = Clock()
    s = Session(clock)
    result_of(s.source.token())
    clock.advance(120)
    d = s.up_to_auth()
    s.sent_lines()
    s.server("334 " + base64.b64encode(b'{"status":"403","scope":"mail"}').decode())
    assert s.sent_lines() == [""]
    s.server("535 5.7.8 Authentication failed.")
    assert s.sent_lines() == ["QUIT"]
    s.server("221 bye")
    assert failure_of(d).check(SessionFailure)
    assert len(s.endpoint.bodies) == 1


def test_not_offered_defers_without_sending_a_token() -> None:
    s = Session()
    d = s.up_to_auth("250 AUTH PLAIN LOGIN")
    assert s.sent_lines() == ["QUIT"]
    s.server("221 bye")
    f = failure_of(d)
    assert f.value.reply.code == 451 and "does not offer AUTH XOAUTH2 (offers: LOGIN PLAIN)" in f.value.reply.text
    assert s.endpoint.bodies == []


def test_never_in_clear_even_if_tls_was_skipped() -> None:
    """The login itself refuses a session without TLS (belt and braces to check-config)."""
    s = Session()
    proto = SMTPClientProtocol(s.clock, "client.test", tls_mode="none", remote_host="smtp.test",
                               sasl=XOAuth2Login("relay@contoso.test", s.source))
    transport = TLSStringTransport()
    proto.makeConnection(transport)
    d = proto.establish()
    proto.dataReceived(b"220 smtp.test\r\n")
    transport.clear()
    proto.dataReceived(b"250-smtp.test\r\n250 AUTH XOAUTH2\r\n")
    assert transport.value() == b"QUIT\r\n"
    proto.dataReceived(b"221 bye\r\n")
    f = failure_of(d)
    assert f.value.reply.status == "4.7.5" and "not sending the token in clear" in f.value.reply.text
    assert s.endpoint.bodies == []


def test_token_endpoint_failure_defers_the_session() -> None:
    clock = Clock()

    def down(url: str, body: bytes, timeout: float) -> defer.Deferred[tuple[int, bytes]]:
        return defer.fail(ConnectionRefusedError("Connection refused"))

    source = TokenSource(CFG, clock, post=down, credential=ClientSecret("s"))
    s = Session(clock, source)
    d = s.up_to_auth()
    assert s.sent_lines() == ["QUIT"]
    s.server("221 bye")
    f = failure_of(d)
    assert f.value.reply.code == 451
    assert "XOAUTH2 token not available: token endpoint http://127.0.0.1:1/token unreachable" in f.value.reply.text


def test_protocol_log_redacts_the_exchange() -> None:
    class File:
        clock = Clock()
        lines: list[str] = []

        def write_line(self, line: str) -> None:
            self.lines.append(line)

    file = File()
    s = Session(plog=ProtocolLog("exo", "send", file))  # type: ignore[arg-type]
    d = s.up_to_auth()
    s.sent_lines()
    s.server("334 " + base64.b64encode(b'{"status":"401"}').decode())
    s.server("535 5.7.8 no")
    s.server("535 5.7.8 no again")
    s.server("221 bye")
    failure_of(d)
    records = [json.loads(line) for line in file.lines]
    commands = [r["line"] for r in records if r["event"] == "command"]
    assert "AUTH XOAUTH2 <redacted>" in commands
    assert not any("tok-" in line or "dXNlcj" in line for line in file.lines)


def test_error_details_tolerates_garbage() -> None:
    assert error_details(Reply.make(334, None, "not base64!")) == {}
    assert error_details(Reply.make(334, None, base64.b64encode(b"[1]").decode())) == {}
    assert error_details(Reply.make(334, None, base64.b64encode(b'{"status":"400"}').decode())) == {"status": "400"}
