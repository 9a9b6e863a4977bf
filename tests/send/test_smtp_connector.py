"""SMTPSendConnector on loopback against aiosmtpd and scripted Twisted peers (pytest-twisted)."""
from __future__ import annotations

import gc
import io
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from exmta.config.schema import SendConnectorConfig, SmartHost
from exmta.interfaces import ISendConnector
from exmta.model import Body, DeliveryRequest, Envelope, MailParams, Outcome, Recipient
from exmta.send.smtp import SMTPSendConnector
from exmta.smtp.client import ClientTimeouts
from support.smtp_peers import ScriptedServer, dead_port, start_sink, stop_sink
from zope.interface.verify import verifyObject

pytestmark = pytest.mark.integration

BODY = (b"From: s@example.org\r\nTo: a@example.net\r\nSubject: test\r\n\r\n"
        b"Hello\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n")


def request(rcpts: tuple[str, ...] = ("a@example.net", "b@example.net"), content: bytes = BODY,
            params: MailParams | None = None, nexthop: str | None = None) -> DeliveryRequest:
    recipients = tuple(Recipient(r) for r in rcpts)
    env = Envelope("s@example.org", list(recipients), params=params or MailParams(), queue_id="Q1",
                   size=len(content))
    return DeliveryRequest("Q1", env, recipients, lambda: io.BytesIO(content), nexthop=nexthop)


def connector(*ports: int, tls: str = "none", **kw: Any) -> SMTPSendConnector:
    from twisted.internet import reactor
    cfg = SendConnectorConfig(name="out", smarthosts=tuple(SmartHost("127.0.0.1", p) for p in ports),
                              tls=tls, connect_timeout=5.0)
    kw.setdefault("timeouts", ClientTimeouts.uniform(5.0))
    return SMTPSendConnector(cfg, reactor, reactor, None, "exmta.test", **kw)


@pytest_twisted.inlineCallbacks
def test_delivers_to_aiosmtpd_exact_bytes():
    sink = yield start_sink()
    try:
        conn = connector(sink.port)
        assert verifyObject(ISendConnector, conn)
        results = yield conn.deliver(request())
        yield conn.close()
    finally:
        yield stop_sink(sink)
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert results[0].remote_host == f"127.0.0.1[127.0.0.1]:{sink.port}"
    [got] = sink.messages
    assert got.mail_from == "s@example.org"
    assert got.rcpt_tos == ["a@example.net", "b@example.net"]
    assert got.content == BODY
    assert got.helo == "exmta.test"
    assert f"SIZE={len(BODY)}" in got.mail_options


@pytest_twisted.inlineCallbacks
def test_8bit_and_smtputf8_to_aiosmtpd():
    sink = yield start_sink()
    body = "Subject: grüße\r\n\r\nÄÖÜ\r\n".encode()
    try:
        conn = connector(sink.port)
        results = yield conn.deliver(request(rcpts=("jürgen@exämple.net",), content=body,
                                             params=MailParams(body=Body.EIGHT_BIT, smtputf8=True)))
        yield conn.close()
    finally:
        yield stop_sink(sink)
    assert results[0].outcome is Outcome.DELIVERED
    [got] = sink.messages
    assert got.content == body and got.rcpt_tos == ["jürgen@exämple.net"]
    assert "BODY=8BITMIME" in got.mail_options and "SMTPUTF8" in got.mail_options


@pytest_twisted.inlineCallbacks
def test_4xx_then_accepts_on_retry():
    calls: list[str] = []

    def policy(addr: str) -> str | None:
        calls.append(addr)
        return "451 4.3.0 greylisted, try later" if len(calls) == 1 else None

    sink = yield start_sink(rcpt_policy=policy)
    try:
        conn = connector(sink.port)
        first = yield conn.deliver(request(rcpts=("a@example.net",)))
        second = yield conn.deliver(request(rcpts=("a@example.net",)))
        yield conn.close()
    finally:
        yield stop_sink(sink)
    assert first[0].outcome is Outcome.DEFERRED and first[0].reply.code == 451
    assert "greylisted" in first[0].reply.text
    assert second[0].outcome is Outcome.DELIVERED
    assert len(sink.messages) == 1


@pytest_twisted.inlineCallbacks
def test_5xx_fails_only_that_recipient():
    sink = yield start_sink(rcpt_policy=lambda a: "550 5.1.1 no such user" if a.startswith("b@") else None)
    try:
        conn = connector(sink.port)
        results = yield conn.deliver(request(rcpts=("a@example.net", "b@example.net", "c@example.net")))
        yield conn.close()
    finally:
        yield stop_sink(sink)
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.FAILED, Outcome.DELIVERED]
    assert results[1].reply.status == "5.1.1"
    assert sink.messages[0].rcpt_tos == ["a@example.net", "c@example.net"]


@pytest_twisted.inlineCallbacks
def test_data_5xx_fails_all():
    sink = yield start_sink(data_policy=lambda got: "554 5.7.1 content rejected")
    try:
        conn = connector(sink.port)
        results = yield conn.deliver(request())
        yield conn.close()
    finally:
        yield stop_sink(sink)
    assert {r.outcome for r in results} == {Outcome.FAILED}
    assert results[0].reply.text == "content rejected"


@pytest_twisted.inlineCallbacks
def test_dead_first_smarthost_fails_over():
    sink = yield start_sink()
    try:
        conn = connector(dead_port(), sink.port)
        results = yield conn.deliver(request())
        yield conn.close()
    finally:
        yield stop_sink(sink)
    assert {r.outcome for r in results} == {Outcome.DELIVERED}
    assert results[0].remote_host.endswith(f":{sink.port}")
    assert len(sink.messages) == 1


@pytest_twisted.inlineCallbacks
def test_greeting_421_fails_over_and_all_dead_defers():
    from twisted.internet import reactor
    refusing = ScriptedServer(greeting="421 4.3.2 too busy")
    port = refusing.listen(reactor)
    hanging = ScriptedServer(greeting=None)
    hport = hanging.listen(reactor)
    sink = yield start_sink()
    try:
        conn = connector(port, hport, sink.port, timeouts=ClientTimeouts.uniform(0.5))
        ok = yield conn.deliver(request(rcpts=("a@example.net",)))
        yield conn.close()
        conn2 = connector(port, dead_port(), timeouts=ClientTimeouts.uniform(0.5))
        bad = yield conn2.deliver(request(rcpts=("a@example.net",)))
    finally:
        yield stop_sink(sink)
        yield refusing.stop()
        yield hanging.stop()
    assert ok[0].outcome is Outcome.DELIVERED
    assert len(refusing.sessions) == 2 and len(hanging.sessions) == 1
    assert bad[0].outcome is Outcome.DEFERRED
    assert bad[0].reply.status == "4.4.1" and "failed" in bad[0].reply.text


@pytest_twisted.inlineCallbacks
def test_5xx_greeting_everywhere_defers_not_bounces():
    from twisted.internet import reactor
    server = ScriptedServer(greeting="554 5.7.1 no service")
    port = server.listen(reactor)
    try:
        results = yield connector(port).deliver(request(rcpts=("a@example.net",)))
    finally:
        yield server.stop()
    assert results[0].outcome is Outcome.DEFERRED
    assert results[0].reply.code == 451 and results[0].reply.status == "4.7.1"
    assert "no service" in results[0].reply.text


@pytest_twisted.inlineCallbacks
def test_connection_reuse_with_rset_and_pipelining():
    from twisted.internet import reactor
    server = ScriptedServer()
    port = server.listen(reactor)
    try:
        conn = connector(port)
        r1 = yield conn.deliver(request(rcpts=("a@example.net",)))
        assert conn.idle_connections == 1
        r2 = yield conn.deliver(request(rcpts=("b@example.net",)))
        yield conn.close()
        assert conn.idle_connections == 0
    finally:
        yield server.stop()
    assert r1[0].outcome is r2[0].outcome is Outcome.DELIVERED
    [session] = server.sessions
    verbs = [c.split(" ")[0] for c in session.commands]
    assert verbs == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "QUIT"]
    assert session.data == BODY.replace(b"\r\n.", b"\r\n..")


@pytest_twisted.inlineCallbacks
def test_max_messages_per_connection():
    from twisted.internet import reactor
    server = ScriptedServer()
    port = server.listen(reactor)
    try:
        cfg = SendConnectorConfig(name="out", smarthosts=(SmartHost("127.0.0.1", port),), tls="none",
                                  max_messages_per_connection=1)
        conn = SMTPSendConnector(cfg, reactor, reactor, None, "exmta.test")
        yield conn.deliver(request(rcpts=("a@example.net",)))
        yield conn.deliver(request(rcpts=("a@example.net",)))
        yield conn.close()
    finally:
        yield server.stop()
    assert len(server.sessions) == 2


@pytest_twisted.inlineCallbacks
def test_bdat_to_chunking_peer():
    from twisted.internet import reactor
    server = ScriptedServer(replies={"EHLO": "250-scripted.test\r\n250-PIPELINING\r\n250 CHUNKING"})
    port = server.listen(reactor)
    try:
        conn = connector(port)
        results = yield conn.deliver(request())
        yield conn.close()
    finally:
        yield server.stop()
    assert {r.outcome for r in results} == {Outcome.DELIVERED}
    [session] = server.sessions
    assert f"BDAT {len(BODY)} LAST" in session.commands
    assert session.data == BODY


@pytest_twisted.inlineCallbacks
def test_mandatory_tls_without_starttls_defers():
    sink = yield start_sink()
    try:
        conn = connector(sink.port, tls="mandatory")
        results = yield conn.deliver(request())
    finally:
        yield stop_sink(sink)
    assert {r.outcome for r in results} == {Outcome.DEFERRED}
    assert results[0].reply.status == "4.7.5"
    assert sink.messages == []


@pytest_twisted.inlineCallbacks
def test_opportunistic_starttls_with_aiosmtpd():
    import ssl

    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "sink.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    sink = yield start_sink(tls_context=server_ctx)
    try:
        conn = connector(sink.port, tls="opportunistic")
        results = yield conn.deliver(request(rcpts=("a@example.net",)))
        yield conn.close()
    finally:
        yield stop_sink(sink)
    assert results[0].outcome is Outcome.DELIVERED
    assert results[0].tls is not None and results[0].tls.startswith("TLSv1")
    assert sink.messages[0].content == BODY


# aiosmtpd leaks its socket when our client aborts a TLS handshake (its bug, not ours)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest_twisted.inlineCallbacks
def test_mandatory_tls_verified_with_trustme():
    import ssl

    import trustme
    from twisted.internet.ssl import optionsForClientTLS, Certificate
    ca = trustme.CA()
    cert = ca.issue_cert("sink.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    sink = yield start_sink(tls_context=server_ctx)
    root = Certificate.loadPEM(ca.cert_pem.bytes())
    try:
        from twisted.internet import reactor
        cfg = SendConnectorConfig(name="out", smarthosts=(SmartHost("127.0.0.1", sink.port),), tls="mandatory")
        good = SMTPSendConnector(cfg, reactor, reactor, None, "exmta.test",
                                 tls_context=lambda host: optionsForClientTLS("sink.test", trustRoot=root),
                                 timeouts=ClientTimeouts.uniform(5.0))
        ok = yield good.deliver(request(rcpts=("a@example.net",)))
        yield good.close()
        wrong = SMTPSendConnector(cfg, reactor, reactor, None, "exmta.test",
                                  tls_context=lambda host: optionsForClientTLS("other.test", trustRoot=root),
                                  timeouts=ClientTimeouts.uniform(5.0))
        bad = yield wrong.deliver(request(rcpts=("a@example.net",)))
    finally:
        yield stop_sink(sink)
        gc.collect()  # collect aiosmtpd's leaked socket here, under this test's filter
    assert ok[0].outcome is Outcome.DELIVERED and ok[0].tls.startswith("TLSv1")
    assert bad[0].outcome is Outcome.DEFERRED and bad[0].reply.status == "4.7.5"
    assert len(sink.messages) == 1


# aiosmtpd leaks its socket when our client aborts a TLS handshake (its bug, not ours)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest_twisted.inlineCallbacks
def test_opportunistic_tls_failure_falls_back_to_plaintext():
    import ssl

    import trustme
    from twisted.internet.ssl import Certificate, optionsForClientTLS
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("sink.test").configure_cert(server_ctx)
    sink = yield start_sink(tls_context=server_ctx)
    root = Certificate.loadPEM(trustme.CA().cert_pem.bytes())  # a CA that did not sign the server
    try:
        conn = connector(sink.port, tls="opportunistic",
                         tls_context=lambda host: optionsForClientTLS("sink.test", trustRoot=root))
        results = yield conn.deliver(request(rcpts=("a@example.net",)))
        yield conn.close()
    finally:
        yield stop_sink(sink)
        gc.collect()  # collect aiosmtpd's leaked socket here, under this test's filter
    assert results[0].outcome is Outcome.DELIVERED
    assert results[0].tls is None
    assert sink.messages[0].content == BODY


@pytest_twisted.inlineCallbacks
def test_empty_request_gives_no_results():
    results = yield connector(dead_port()).deliver(request(rcpts=()))
    assert results == []


@pytest_twisted.inlineCallbacks
def test_bracketed_nexthop_and_address_literal_skip_mx():
    from twisted.internet import reactor
    server = ScriptedServer()
    port = server.listen(reactor)
    cfg = SendConnectorConfig(name="internet", port=port, tls="none")
    # resolver=None: any MX lookup would go to the reactor's resolver; none happens here
    conn = SMTPSendConnector(cfg, reactor, reactor, None, "exmta.test", idle_timeout=0)
    try:
        [a] = yield conn.deliver(request(rcpts=("a@example.net",), nexthop=f"[127.0.0.1]:{port}"))
        [b] = yield conn.deliver(request(rcpts=("b@[127.0.0.1]",)))
        yield conn.close()
    finally:
        yield server.stop()
    assert a.outcome is b.outcome is Outcome.DELIVERED
    assert a.remote_host == f"127.0.0.1[127.0.0.1]:{port}"
    assert len(server.sessions) == 2


@pytest_twisted.inlineCallbacks
def test_large_message_over_tls_streams_intact():
    """A few MB through STARTTLS: exercises the producer/back-pressure path on a real TLS transport."""
    import ssl

    import trustme
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("sink.test").configure_cert(server_ctx)
    sink = yield start_sink(tls_context=server_ctx, data_size_limit=0)
    lines = [b"Subject: big\r\n", b"\r\n"]
    for i in range(60_000):
        lines.append(b".%06d starts with a dot and is padded ...........................\r\n" % i)
    content = b"".join(lines)
    assert len(content) > 4_000_000
    try:
        conn = connector(sink.port, tls="opportunistic")
        results = yield conn.deliver(request(rcpts=("a@example.net",), content=content))
        yield conn.close()
    finally:
        yield stop_sink(sink)
    assert results[0].outcome is Outcome.DELIVERED and results[0].tls is not None
    assert sink.messages[0].content == content


@pytest_twisted.inlineCallbacks
def test_idle_connection_expires_on_the_injected_clock():
    from twisted.internet import reactor
    from twisted.internet.task import Clock
    clock = Clock()
    server = ScriptedServer()
    port = server.listen(reactor)
    cfg = SendConnectorConfig(name="out", smarthosts=(SmartHost("127.0.0.1", port),), tls="none")
    conn = SMTPSendConnector(cfg, reactor, clock, None, "exmta.test", idle_timeout=15.0)
    try:
        [r] = yield conn.deliver(request(rcpts=("a@example.net",)))
        assert r.outcome is Outcome.DELIVERED and conn.idle_connections == 1
        clock.advance(14)
        assert conn.idle_connections == 1
        clock.advance(2)
        assert conn.idle_connections == 0
        for _ in range(200):  # bounded: wait for QUIT to reach the server
            if server.sessions[0].commands[-1:] == ["QUIT"]:
                break
            yield deferLater(reactor, 0.01)
    finally:
        yield server.stop()
    assert server.sessions[0].commands[-1] == "QUIT"


def deferLater(reactor: Any, seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater as _later
    return _later(reactor, seconds, lambda: None)


def test_build_wire_connector_picks_the_class():
    from twisted.internet.task import Clock

    from exmta.send import build_wire_connector
    from exmta.send.lmtp import LMTPSendConnector
    clock = Clock()
    smtp = build_wire_connector(SendConnectorConfig(name="a"), clock, clock, None, "h.test")
    lmtp = build_wire_connector(SendConnectorConfig(name="b", kind="lmtp", lmtp="unix:/x"), clock, clock, None, "h")
    assert type(smtp) is SMTPSendConnector and isinstance(lmtp, LMTPSendConnector) and lmtp.lmtp
    assert verifyObject(ISendConnector, lmtp)
    with pytest.raises(ValueError):
        build_wire_connector(SendConnectorConfig(name="c", kind="maildir"), clock, clock, None, "h")


@pytest_twisted.inlineCallbacks
def test_stale_cached_connection_is_replaced():
    from twisted.internet import reactor
    server = ScriptedServer(replies={"RSET": "CLOSE"})  # the server drops idle sessions at our RSET
    port = server.listen(reactor)
    try:
        conn = connector(port)
        [a] = yield conn.deliver(request(rcpts=("a@example.net",)))
        assert conn.idle_connections == 1
        [b] = yield conn.deliver(request(rcpts=("b@example.net",)))
        yield conn.close()
    finally:
        yield server.stop()
    assert a.outcome is b.outcome is Outcome.DELIVERED
    assert len(server.sessions) == 2
    assert server.sessions[0].commands[-1] == "RSET"
