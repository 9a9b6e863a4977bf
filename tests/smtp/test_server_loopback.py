"""ESMTPServer on a real 127.0.0.1 port, driven by independent clients (smtplib, swaks, raw sockets)."""
from __future__ import annotations

import shutil
import smtplib
import socket
import subprocess
import time
from email.message import EmailMessage
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from exmta.config.schema import ReceiveConnectorConfig
from exmta.filters.base import FilterChain
from exmta.smtp.server import ESMTPServerFactory
from support.smtp_stubs import RecordingStore, StubPolicy

pytestmark = pytest.mark.integration


@pytest.fixture
def server():
    from twisted.internet import reactor

    store = RecordingStore("LOOP")
    config = ReceiveConnectorConfig(name="loop", hostname="mx.loop.test", max_message_size=200_000)
    factory = ESMTPServerFactory(config, StubPolicy(local_domains=("local.test",)), FilterChain([], reactor), store, reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield port.getHost().port, store, factory
    port.stopListening()
    for session in list(factory.sessions):
        session.transport.abortConnection()


def _smtplib_session(port: int) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        code, _ = client.ehlo("client.loop.test")
        features = dict(client.esmtp_features)
        msg = EmailMessage()
        msg["From"] = "a@sender.test"
        msg["To"] = "b@local.test"
        msg["Subject"] = "loopback"
        msg["Message-ID"] = "<loop1@sender.test>"
        msg.set_content("line one\n.\n..two dots\n" + "x" * 70 + "\n")
        refused = client.send_message(msg, rcpt_options=["NOTIFY=FAILURE"], mail_options=["BODY=8BITMIME"])
        try:
            client.sendmail("a@sender.test", ["c@elsewhere.test"], b"Subject: no\r\n\r\nx\r\n")
            denied = None
        except smtplib.SMTPRecipientsRefused as e:
            denied = e.recipients
        try:
            client.sendmail("a@sender.test", ["b@local.test"], b"x" * 300_000)  # smtplib adds SIZE=
            big = None
        except smtplib.SMTPSenderRefused as e:
            big = (e.smtp_code, e.smtp_error)
        return {"ehlo": code, "features": features, "refused": refused, "denied": denied, "big": big}


@pytest_twisted.inlineCallbacks
def test_smtplib_delivers_through_a_real_socket(server):
    port, store, _ = server
    result = yield deferToThread(_smtplib_session, port)
    assert result["ehlo"] == 250
    features = result["features"]
    for ext in ("pipelining", "8bitmime", "smtputf8", "chunking", "dsn", "enhancedstatuscodes"):
        assert ext in features
    assert features["size"] == "200000"
    assert result["refused"] == {}
    assert result["denied"] == {"c@elsewhere.test": (554, b"5.7.1 Relay access denied")}
    assert result["big"][0] == 552
    [(content, env)] = store.committed
    assert env.message_id == "<loop1@sender.test>"
    assert [(r.address, r.notify) for r in env.recipients] == [("b@local.test", ("FAILURE",))]
    body = content.split(b"\r\n\r\n", 1)[1]
    assert body == b"line one\r\n.\r\n..two dots\r\n" + b"x" * 70 + b"\r\n"
    assert content.startswith(b"Received: from client.loop.test ([127.0.0.1])\r\n\tby mx.loop.test (exmta)")


def _raw_session(port: int, payloads: list[bytes]) -> bytes:
    """Send each payload in its own write, then read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for data in payloads:
            sock.sendall(data)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
            if received.endswith(b"221 2.0.0 mx.loop.test closing connection\r\n"):
                return received


@pytest_twisted.inlineCallbacks
def test_pipelined_smuggling_attempt_over_a_socket(server):
    port, store, _ = server
    payload = (
        b"EHLO c\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n"
    )
    body = b"Subject: s\r\n\r\nhello\n.\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<c@local.test>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n"
    out = yield deferToThread(_raw_session, port, [payload, body])
    lines = out.split(b"\r\n")
    assert b"550 5.6.11 Error: bare <LF> or <CR> not allowed in message content" in lines
    assert lines[-2] == b"221 2.0.0 mx.loop.test closing connection"
    assert store.committed == []


@pytest_twisted.inlineCallbacks
def test_bdat_over_a_socket_in_small_writes(server):
    port, store, _ = server
    message = b"Subject: chunks\r\n\r\n" + b"0123456789" * 1000 + b"\r\n"
    cmds = b"EHLO c\r\nMAIL FROM:<a@sender.test> BODY=BINARYMIME\r\nRCPT TO:<b@local.test>\r\n"
    wire = cmds + b"BDAT %d\r\n" % 5000 + message[:5000] + b"BDAT %d LAST\r\n" % (len(message) - 5000) + message[5000:]
    pieces = [wire[i:i + 7] for i in range(0, len(wire), 7)] + [b"QUIT\r\n"]
    out = yield deferToThread(_raw_session, port, pieces)
    assert b"250 2.0.0 Ok: 5000 octets received\r\n" in out
    assert b"250 2.0.0 Ok: queued as LOOP1\r\n" in out
    [(content, env)] = store.committed
    assert content.endswith(message)


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
@pytest_twisted.inlineCallbacks
def test_swaks_with_pipelining(server):
    port, store, _ = server
    cmd = ["swaks", "--server", "127.0.0.1", "--port", str(port), "--pipeline", "--timeout", "10",
           "--from", "a@sender.test", "--to", "b@local.test,x@local.test", "--helo", "swaks.test",
           "--header", "Subject: from swaks"]
    proc = yield deferToThread(subprocess.run, cmd, capture_output=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    [(content, env)] = store.committed
    assert [r.address for r in env.recipients] == ["b@local.test", "x@local.test"]
    assert b"Subject: from swaks" in content


# ------------------------------------------------------------ STARTTLS over a real socket


@pytest.fixture
def tls_server():
    import trustme
    from twisted.internet import reactor
    from twisted.internet.ssl import PrivateCertificate

    ca = trustme.CA()
    cert = ca.issue_cert("mx.loop.test", "127.0.0.1")
    pem = cert.private_key_and_cert_chain_pem.bytes()
    ctx = PrivateCertificate.loadPEM(pem).options()
    store = RecordingStore("LOOP")
    config = ReceiveConnectorConfig(name="loop", hostname="mx.loop.test")
    factory = ESMTPServerFactory(config, StubPolicy(local_domains=("local.test",)), FilterChain([], reactor), store, reactor,
                                 tls_context_factory=ctx)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield port.getHost().port, store, ca
    port.stopListening()
    for session in list(factory.sessions):
        session.transport.abortConnection()


def _tls_session(port: int, ca: Any) -> dict[str, Any]:
    import ssl

    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("c.test")
        before = dict(client.esmtp_features)
        code, _ = client.starttls(context=ctx)
        client.ehlo("c.test")
        after = dict(client.esmtp_features)
        client.sendmail("a@sender.test", ["b@local.test"], b"Subject: tls\r\n\r\nsecret\r\n")
        version = client.sock.version()
        return {"code": code, "before": before, "after": after, "version": version}


def _injected_starttls(port: int) -> bytes:
    """STARTTLS with a plaintext command pipelined behind it: the server must drop that command."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.recv(1000)
        sock.sendall(b"EHLO c\r\n")
        data = b""
        while not data.endswith(b"250 SMTPUTF8\r\n"):
            data += sock.recv(1000)
        sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        out = b""
        while b"\r\n" not in out:
            out += sock.recv(1000)
        sock.settimeout(1)
        try:
            out += sock.recv(1000)  # a plaintext 250 here would be the bug
        except socket.timeout:
            pass
        return out


@pytest_twisted.inlineCallbacks
def test_starttls_with_smtplib(tls_server):
    port, store, ca = tls_server
    result = yield deferToThread(_tls_session, port, ca)
    assert result["code"] == 220
    assert "starttls" in result["before"] and "starttls" not in result["after"]
    [(content, env)] = store.committed
    assert b"with ESMTPS id LOOP1" in content
    assert f"(using {result['version']} with cipher ".encode() in content


@pytest_twisted.inlineCallbacks
def test_starttls_injection_over_a_socket_is_not_executed(tls_server):
    port, store, _ = tls_server
    out = yield deferToThread(_injected_starttls, port)
    assert out == b"220 2.0.0 Ready to start TLS\r\n"


# ------------------------------------------------------------ Postfix as the client (PIPELINING, BDAT, DSN)


@pytest_twisted.inlineCallbacks
def test_postfix_relays_into_the_server(server, postfix_factory):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    port, store, _ = server
    front = yield deferToThread(postfix_factory, relayhost=f"[127.0.0.1]:{port}",
                                hostname="front.example.test",
                                main_cf={"debug_peer_list": "127.0.0.1", "debug_peer_level": "2"})
    body = "".join(f"line {i}\n" if i % 7 else ".dot line\n" for i in range(3000))
    msg = EmailMessage()
    msg["From"] = "alice@sender.test"
    msg["To"] = "b@local.test"
    msg["Subject"] = "via postfix"
    msg["Message-ID"] = "<pf1@sender.test>"
    msg.set_content(body)
    refused = yield deferToThread(front.send, "alice@sender.test", ["b@local.test", "c@local.test"], msg)
    assert refused == {}
    for _ in range(300):  # bounded: 30 s
        if store.committed:
            break
        yield deferLater(reactor, 0.1, lambda: None)
    assert store.committed, front.log_text()[-2000:]
    content, env = store.committed[0]
    assert env.message_id == "<pf1@sender.test>"
    assert sorted(r.address for r in env.recipients) == ["b@local.test", "c@local.test"]
    assert env.client_helo == "front.example.test"
    assert b".dot line\r\nline 8\r\n" in content  # dot-stuffed by Postfix, unstuffed by us
    yield deferToThread(front.wait_queue_empty, 30)
    assert "status=sent (250 2.0.0 Ok: queued as LOOP1)" in front.log_text()


def _flood(port: int, count: int) -> tuple[int, bytes]:
    """Pipeline `count` RCPTs while reading concurrently; the server may stop reading in between."""
    import threading

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # small window: replies pile up server-side
        sock.settimeout(20)
        sock.connect(("127.0.0.1", port))
        payload = b"EHLO c\r\nMAIL FROM:<a@sender.test>\r\n" + b"RCPT TO:<b@local.test>\r\n" * count + b"QUIT\r\n"
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        time.sleep(0.5)  # not reading yet: the server's socket fills and its own buffer grows
        received = bytearray()
        while not received.endswith(b"221 2.0.0 mx.loop.test closing connection\r\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            received += chunk
        sender.join(20)
        return received.count(b"\r\n452 4.5.3 ") + received.count(b"\r\n250 2.1.5 "), bytes(received[-200:])


@pytest_twisted.inlineCallbacks
def test_pipelined_flood_with_back_pressure_keeps_every_reply(server, monkeypatch):
    from exmta.smtp.server import ESMTPServer

    pauses: list[int] = []
    original = ESMTPServer.pauseProducing

    def counting_pause(self):
        pauses.append(1)
        original(self)

    monkeypatch.setattr(ESMTPServer, "pauseProducing", counting_pause)
    made = ESMTPServer.connectionMade

    def small_send_buffer(self):
        # a fixed 8 KiB send buffer (no autotuning): direct sends hit EAGAIN and the rest is buffered
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        made(self)

    monkeypatch.setattr(ESMTPServer, "connectionMade", small_send_buffer)
    port, _, factory = server
    count = 60_000  # ~1.4 MB in, ~2.3 MB of replies out: more than the socket buffers hold
    replies_seen, tail = yield deferToThread(_flood, port, count)
    assert replies_seen == count, tail
    assert tail.endswith(b"221 2.0.0 mx.loop.test closing connection\r\n")
    assert pauses, "the transport never applied back-pressure"
