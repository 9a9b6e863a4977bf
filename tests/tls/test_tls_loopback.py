"""Receive-side TLS on a real 127.0.0.1 socket with real TLS clients.

The server is ESMTPServerFactory with exmta.tls wired in as the service does
it (configure_receive_tls + listening_factory); the clients are Python's
ssl/smtplib, ``openssl s_client -starttls smtp`` and swaks, with
certificates made at test time by a trustme CA.
"""
from __future__ import annotations

import os
import shutil
import smtplib
import socket
import ssl
import subprocess
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from support.tlscerts import TestPKI
from twisted.internet.threads import deferToThread

from exmta.config.schema import ReceiveConnectorConfig, ReceiveTLSConfig, TLSCertificateConfig
from exmta.filters.base import FilterChain
from exmta.smtp.server import ESMTPServerFactory
from exmta.tls.context import listening_factory
from exmta.tls.reload import configure_receive_tls
from support.smtp_stubs import RecordingStore, StubPolicy

pytestmark = pytest.mark.integration

HOST = "mx.loop.test"
OPENSSL = shutil.which("openssl")
SWAKS = shutil.which("swaks")


class Tracker:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def track(self, event: Any) -> None:
        self.events.append(event)


@pytest.fixture
def pki(tmp_path):
    return TestPKI(tmp_path / "pki")


def log_text(events: list[dict]) -> str:
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) for e in events)


def no_failures(events: list[dict]) -> bool:
    return not [e for e in events if "log_failure" in e]


@pytest.fixture
def make_server(pki):
    from twisted.internet import reactor

    started: list[Any] = []

    def make(tls: dict | None = None, require_tls: bool = False, files=None, sni=()) -> SimpleNamespace:
        files = files or pki.server(HOST)
        tls_config = None
        if tls is not None:
            tls_config = ReceiveTLSConfig(
                certificate=TLSCertificateConfig(str(files.cert), str(files.key)), sni=tuple(sni), **tls)
        rc = ReceiveConnectorConfig(name="tls", hostname=HOST, tls=tls_config, require_tls=require_tls)
        store, tracker, policy = RecordingStore("TLS"), Tracker(), StubPolicy()
        factory = ESMTPServerFactory(rc, policy, FilterChain([], reactor), store, reactor, tracker=tracker)
        server_tls = configure_receive_tls(factory, rc, reactor)
        port = reactor.listenTCP(0, listening_factory(factory, reactor), interface="127.0.0.1")
        started.append((port, factory))
        return SimpleNamespace(port=port.getHost().port, store=store, factory=factory, tls=server_tls,
                               tracker=tracker, files=files, policy=policy)

    yield make
    for port, factory in started:
        port.stopListening()
        for session in list(factory.sessions):
            session.transport.abortConnection()


def client_context(pki: TestPKI, **kw: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def read_smtp_reply(sock: Any) -> tuple[int, list[str]]:
    """One (multi-line) reply, read a byte at a time (works on plain and TLS sockets alike)."""
    lines: list[str] = []
    while True:
        line = b""
        while not line.endswith(b"\r\n"):
            byte = sock.recv(1)
            if not byte:
                raise ConnectionError(f"closed after {lines!r} {line!r}")
            line += byte
        text = line[:-2].decode("utf-8", "replace")
        lines.append(text[4:])
        if text[3:4] != "-":
            return int(text[:3]), lines


def command(sock: Any, line: bytes) -> tuple[int, list[str]]:
    sock.sendall(line + b"\r\n")
    return read_smtp_reply(sock)


# ---------------------------------------------------------------- STARTTLS with real clients


def _smtplib_starttls(port: int, pki: TestPKI) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.loop.test")
        offered = client.has_extn("starttls")
        client._host = HOST  # the name to verify (smtplib uses the address it connected to)
        code, _ = client.starttls(context=client_context(pki))
        version, cipher = client.sock.version(), client.sock.cipher()[0]
        client.ehlo("client.loop.test")
        again = client.has_extn("starttls")
        client.sendmail("a@sender.test", ["b@local.test"], b"Subject: tls\r\n\r\nover TLS\r\n")
    return {"offered": offered, "code": code, "version": version, "cipher": cipher, "again": again}


@pytest_twisted.inlineCallbacks
def test_smtplib_starttls_and_the_received_header_and_tracking_name_the_real_cipher(make_server, pki):
    server = make_server(tls={})
    result = yield deferToThread(_smtplib_starttls, server.port, pki)
    assert result["offered"] and result["code"] == 220 and not result["again"]
    assert result["version"] == "TLSv1.3"
    [(content, envelope)] = server.store.committed
    assert content.startswith(
        b"Received: from client.loop.test ([127.0.0.1])\r\n"
        + f"\t(using {result['version']} with cipher {result['cipher']})\r\n".encode()
        + f"\tby {HOST} (exmta) with ESMTPS id TLS1\r\n".encode())
    [event] = server.tracker.events
    assert event.tls == f"{result['version']} {result['cipher']}"


def _tls12_only(port: int, pki: TestPKI) -> tuple[str, str]:
    ctx = client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("c.loop.test")
        client._host = HOST
        client.starttls(context=ctx)
        return client.sock.version(), client.sock.cipher()[0]


@pytest_twisted.inlineCallbacks
def test_tls12_client_gets_an_ecdhe_aead_cipher(make_server, pki):
    server = make_server(tls={})
    version, cipher = yield deferToThread(_tls12_only, server.port, pki)
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher)


def _s_client(port: int, pki: TestPKI, *extra: str, stdin: bytes = b"QUIT\n") -> subprocess.CompletedProcess:
    """``openssl s_client -starttls smtp``; ``stdin`` lines end in LF (-crlf sends CRLF)."""
    argv = [OPENSSL, "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{port}", "-CAfile",
            str(pki.ca_file), "-verify_return_error", "-crlf", "-ign_eof", *extra]
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=30)


@pytest_twisted.inlineCallbacks
def test_openssl_s_client_starttls_smtp_verifies_and_talks(make_server, pki, log_events):
    assert OPENSSL, "openssl is not installed (scripts/install-test-deps.sh)"
    server = make_server(tls={})
    r = yield deferToThread(_s_client, server.port, pki, "-verify_hostname", HOST, "-brief",
                            stdin=b"EHLO after.tls.test\nMAIL FROM:<a@sender.test>\nQUIT\n")
    out = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
    assert r.returncode == 0, out
    assert "Verification: OK" in out
    assert "Protocol version: TLSv1.3" in out
    assert f"250-{HOST}" in out and "STARTTLS" not in out.split("250-" + HOST, 1)[1]
    assert "250 2.1.0 Ok" in out
    assert f"221 2.0.0 {HOST} closing connection" in out
    assert no_failures(log_events)


# ---------------------------------------------------------------- CVE-2011-0411


def _pipelined_after_starttls(port: int, pki: TestPKI) -> dict[str, Any]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        read_smtp_reply(raw)
        command(raw, b"EHLO client.loop.test")
        # the injection: a command in the same packet as STARTTLS, before the handshake
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\nRCPT TO:<victim@local.test>\r\n")
        go = read_smtp_reply(raw)
        with client_context(pki).wrap_socket(raw, server_hostname=HOST) as tls:
            out = {"go": go}
            out["mail_before_ehlo"] = command(tls, b"MAIL FROM:<a@sender.test>")  # state reset: EHLO first
            out["ehlo"] = command(tls, b"EHLO client.loop.test")
            out["mail"] = command(tls, b"MAIL FROM:<a@sender.test>")  # not "nested MAIL": nothing injected
            out["rcpt"] = command(tls, b"RCPT TO:<b@local.test>")
            out["data"] = command(tls, b"DATA")
            out["end"] = command(tls, b"Subject: x\r\n\r\nbody\r\n.")
            out["quit"] = command(tls, b"QUIT")
            return out
    finally:
        raw.close()


@pytest_twisted.inlineCallbacks
def test_commands_pipelined_after_starttls_are_discarded_cve_2011_0411(make_server, pki, log_events):
    server = make_server(tls={})
    out = yield deferToThread(_pipelined_after_starttls, server.port, pki)
    assert out["go"] == (220, ["2.0.0 Ready to start TLS"])
    assert out["mail_before_ehlo"] == (503, ["5.5.1 Error: send HELO/EHLO first"])
    assert out["ehlo"][0] == 250 and "STARTTLS" not in out["ehlo"][1]
    assert out["mail"] == (250, ["2.1.0 Ok"])
    assert out["rcpt"] == (250, ["2.1.5 Ok"])
    assert out["end"][0] == 250
    [(content, envelope)] = server.store.committed
    assert envelope.sender == "a@sender.test"
    assert [r.address for r in envelope.recipients] == ["b@local.test"]
    assert b"injected" not in content and b"victim" not in content
    assert "plaintext octets after STARTTLS dropped" in log_text(log_events)


# ---------------------------------------------------------------- implicit TLS (465)


def _implicit(port: int, pki: TestPKI) -> dict[str, Any]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with client_context(pki).wrap_socket(raw, server_hostname=HOST) as tls:
        out = {"banner": read_smtp_reply(tls), "version": tls.version()}
        out["ehlo"] = command(tls, b"EHLO client.loop.test")
        out["starttls"] = command(tls, b"STARTTLS")
        out["mail"] = command(tls, b"MAIL FROM:<a@sender.test>")
        command(tls, b"RCPT TO:<b@local.test>")
        command(tls, b"DATA")
        out["end"] = command(tls, b"Subject: 465\r\n\r\nimplicit\r\n.")
        command(tls, b"QUIT")
    return out


@pytest_twisted.inlineCallbacks
def test_implicit_tls_from_the_first_byte(make_server, pki):
    server = make_server(tls={"implicit": True})
    out = yield deferToThread(_implicit, server.port, pki)
    assert out["banner"] == (220, [f"{HOST} ESMTP exmta"])
    assert out["version"] == "TLSv1.3"
    assert out["ehlo"][0] == 250 and "STARTTLS" not in out["ehlo"][1]
    assert out["starttls"] == (503, ["5.5.1 Error: TLS already active"])
    assert out["mail"] == (250, ["2.1.0 Ok"]) and out["end"][0] == 250
    [(content, _)] = server.store.committed
    assert b"\t(using TLSv1.3 with cipher " in content and b"with ESMTPS id" in content


def _plain_to_implicit(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"EHLO plaintext.test\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data


@pytest_twisted.inlineCallbacks
def test_plaintext_client_on_an_implicit_tls_port_is_closed_not_served(make_server, pki, log_events):
    server = make_server(tls={"implicit": True})
    data = yield deferToThread(_plain_to_implicit, server.port)
    assert b"220" not in data and b"250" not in data  # at most a TLS alert, never SMTP in clear
    assert server.store.committed == []
    assert no_failures(log_events)


# ---------------------------------------------------------------- SNI


def _peer_names(port: int, pki: TestPKI, sni: str | None) -> list[str]:
    ctx = client_context(pki)
    ctx.check_hostname = False
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("c.loop.test")
        client._host = sni
        client.starttls(context=ctx)
        cert = client.sock.getpeercert()
        return [v for k, v in cert["subjectAltName"]]


@pytest_twisted.inlineCallbacks
def test_sni_chooses_the_certificate(make_server, pki):
    fabrikam = pki.server("mail.fabrikam.test", "smtp.fabrikam.test")
    wildcard = pki.server("*.tailspin.test")
    server = make_server(tls={}, sni=(
        TLSCertificateConfig(str(fabrikam.cert), str(fabrikam.key)),                 # names from the cert
        TLSCertificateConfig(str(wildcard.cert), str(wildcard.key), names=("*.tailspin.test",)),
    ))
    assert (yield deferToThread(_peer_names, server.port, pki, "smtp.fabrikam.test")) == [
        "mail.fabrikam.test", "smtp.fabrikam.test"]
    assert (yield deferToThread(_peer_names, server.port, pki, "mx.tailspin.test")) == ["*.tailspin.test"]
    assert (yield deferToThread(_peer_names, server.port, pki, "unknown.test")) == [HOST]
    assert (yield deferToThread(_peer_names, server.port, pki, None)) == [HOST]


# ---------------------------------------------------------------- legacy TLS for pinned ranges


def _tls10(port: int, pki: TestPKI) -> str:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl.TLSVersion.TLSv1: that is the point
        ctx = client_context(pki, minimum_version=ssl.TLSVersion.TLSv1, maximum_version=ssl.TLSVersion.TLSv1)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("printer.loop.test")
        client._host = HOST
        try:
            client.starttls(context=ctx)
        except (ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError) as e:
            return f"refused: {e.__class__.__name__}"
        version = client.sock.version()
        client.ehlo("printer.loop.test")
        client.sendmail("scanner@local.test", ["b@local.test"], b"Subject: scan\r\n\r\nscan\r\n")
        return version


@pytest_twisted.inlineCallbacks
def test_tls10_only_for_legacy_networks(make_server, pki, log_events):
    modern = make_server(tls={})
    other_range = make_server(tls={"legacy_networks": ("192.0.2.0/24",)})
    pinned = make_server(tls={"legacy_networks": ("127.0.0.0/8",)})
    assert (yield deferToThread(_tls10, modern.port, pki)).startswith("refused")
    assert (yield deferToThread(_tls10, other_range.port, pki)).startswith("refused")
    assert (yield deferToThread(_tls10, pinned.port, pki)) == "TLSv1"
    [(content, _)] = pinned.store.committed
    assert b"(using TLSv1 with cipher " in content
    assert modern.store.committed == []
    assert "TLS with 127.0.0.1 on tls failed: TLS handshake failed" in log_text(log_events)
    # the pinned range still gets TLS 1.3 when the client can
    result = yield deferToThread(_smtplib_starttls, pinned.port, pki)
    assert result["version"] == "TLSv1.3"


# ---------------------------------------------------------------- require_tls


def _mail_without_tls(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("c.loop.test")
        return client.mail("a@sender.test")


@pytest_twisted.inlineCallbacks
def test_require_tls_refuses_mail_before_starttls(make_server, pki, log_events):
    server = make_server(tls={}, require_tls=True)
    assert (yield deferToThread(_mail_without_tls, server.port)) == (
        530, b"5.7.0 Must issue a STARTTLS command first")
    result = yield deferToThread(_smtplib_starttls, server.port, pki)
    assert result["code"] == 220 and len(server.store.committed) == 1
    assert "MAIL before STARTTLS refused for 127.0.0.1 on tls" in log_text(log_events)


@pytest_twisted.inlineCallbacks
def test_plaintext_networks_are_exempt_from_require_tls(make_server):
    server = make_server(tls={"plaintext_networks": ("127.0.0.1/32",)}, require_tls=True)
    assert (yield deferToThread(_mail_without_tls, server.port)) == (250, b"2.1.0 Ok")


# ---------------------------------------------------------------- partner connectors (client certificates)


def _with_client_cert(port: int, pki: TestPKI, cert: Any) -> dict[str, Any]:
    ctx = client_context(pki)
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("partner.loop.test")
        client._host = HOST
        client.starttls(context=ctx)
        client.ehlo("partner.loop.test")
        mail = client.mail("a@partner.test")
        if mail[0] == 250:
            client.rcpt("b@local.test")
            client.data(b"Subject: partner\r\n\r\nfrom a partner\r\n")
        return {"mail": mail}


PARTNER = {"client_certificate": "require", "client_names": ("mail.protection.outlook.com",)}


@pytest_twisted.inlineCallbacks
def test_partner_certificate_that_matches_is_accepted(make_server, pki, log_events):
    server = make_server(tls={**PARTNER, "client_ca": str(pki.ca_file)})
    exo = pki.client("mail.protection.outlook.com", "*.mail.protection.outlook.com", file="exo")
    out = yield deferToThread(_with_client_cert, server.port, pki, exo)
    assert out["mail"] == (250, b"2.1.0 Ok")
    assert len(server.store.committed) == 1
    assert ("client certificate accepted for 127.0.0.1 on tls: mail.protection.outlook.com"
            in log_text(log_events))
    [tls] = server.policy.tls_at_mail  # what the relay policy's "partners" permission group reads
    assert tls.partner == "mail.protection.outlook.com" and tls.peer_certificate_verified
    assert tls.peer_certificate_names == ("mail.protection.outlook.com", "*.mail.protection.outlook.com")
    assert tls.peer_certificate_subject.startswith("CN=mail.protection.outlook.com")


@pytest_twisted.inlineCallbacks
def test_request_mode_marks_partners_and_lets_the_others_in_as_anonymous(make_server, pki):
    server = make_server(tls={"client_certificate": "request", "client_ca": str(pki.ca_file)})
    exo = pki.client("relay.partner.test", file="partner")
    assert (yield deferToThread(_with_client_cert, server.port, pki, exo))["mail"] == (250, b"2.1.0 Ok")
    assert (yield deferToThread(_with_client_cert, server.port, pki, None))["mail"] == (250, b"2.1.0 Ok")
    rogue = pki.other_ca().client("relay.partner.test", file="rogue2")
    assert (yield deferToThread(_with_client_cert, server.port, pki, rogue))["mail"] == (250, b"2.1.0 Ok")
    assert [t.partner for t in server.policy.tls_at_mail] == ["relay.partner.test", None, None]
    assert [t.peer_certificate_verified for t in server.policy.tls_at_mail] == [True, False, False]


@pytest_twisted.inlineCallbacks
def test_partner_certificate_with_another_name_is_refused(make_server, pki, log_events):
    server = make_server(tls={**PARTNER, "client_ca": str(pki.ca_file)})
    other = pki.client("relay.fabrikam.test", file="fabrikam")
    out = yield deferToThread(_with_client_cert, server.port, pki, other)
    assert out["mail"] == (530, b"5.7.1 Client was not authenticated: certificate names relay.fabrikam.test "
                                b"match none of mail.protection.outlook.com")
    assert server.store.committed == []
    assert "client certificate refused for 127.0.0.1 on tls: certificate names relay.fabrikam.test" \
        in log_text(log_events)


@pytest_twisted.inlineCallbacks
def test_partner_without_a_certificate_is_refused(make_server, pki, log_events):
    server = make_server(tls={**PARTNER, "client_ca": str(pki.ca_file)})
    out = yield deferToThread(_with_client_cert, server.port, pki, None)
    assert out["mail"] == (530, b"5.7.1 Client was not authenticated: this connector requires a client "
                                b"certificate")
    assert "client certificate refused for 127.0.0.1 on tls: no client certificate" in log_text(log_events)
    assert (yield deferToThread(_mail_without_tls, server.port)) == (
        530, b"5.7.0 Must issue a STARTTLS command first")


@pytest_twisted.inlineCallbacks
def test_partner_certificate_from_an_untrusted_ca_is_refused(make_server, pki, log_events):
    server = make_server(tls={**PARTNER, "client_ca": str(pki.ca_file)})
    rogue = pki.other_ca().client("mail.protection.outlook.com", file="rogue")
    out = yield deferToThread(_with_client_cert, server.port, pki, rogue)
    assert out["mail"][0] == 530
    assert out["mail"][1].startswith(b"5.7.1 Client was not authenticated: certificate not trusted: "
                                     b"unable to get local issuer certificate")
    assert server.store.committed == []
    assert no_failures(log_events)


@pytest_twisted.inlineCallbacks
def test_partner_expired_certificate_is_refused(make_server, pki):
    server = make_server(tls={**PARTNER, "client_ca": str(pki.ca_file)})
    old = pki.client("mail.protection.outlook.com", file="old-exo", expired=True)
    out = yield deferToThread(_with_client_cert, server.port, pki, old)
    assert out["mail"][0] == 530 and b"certificate has expired" in out["mail"][1]


@pytest_twisted.inlineCallbacks
def test_openssl_s_client_with_a_partner_certificate(make_server, pki):
    assert OPENSSL, "openssl is not installed (scripts/install-test-deps.sh)"
    server = make_server(tls={**PARTNER, "client_ca": str(pki.ca_file)})
    exo = pki.client("mail.protection.outlook.com", file="exo")
    r = yield deferToThread(_s_client, server.port, pki, "-cert", str(exo.cert), "-key", str(exo.key),
                            stdin=b"EHLO exo.test\nMAIL FROM:<a@partner.test>\nQUIT\n")
    out = r.stdout.decode(errors="replace")
    assert "250 2.1.0 Ok" in out, out + r.stderr.decode(errors="replace")


# ---------------------------------------------------------------- garbage


def _garbage_during_handshake(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        read_smtp_reply(sock)
        command(sock, b"EHLO c.loop.test")
        assert command(sock, b"STARTTLS")[0] == 220
        sock.sendall(b"\x16\x03\x01\x00\x30" + os.urandom(48) + b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        return data


def _garbage_after_handshake(port: int, pki: TestPKI) -> dict[str, Any]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        read_smtp_reply(raw)
        command(raw, b"EHLO c.loop.test")
        command(raw, b"STARTTLS")
        with client_context(pki).wrap_socket(raw, server_hostname=HOST) as tls:
            out = {"junk_command": command(tls, b"\x00\xff\xfe garbage \x01")}
            out["ehlo"] = command(tls, b"EHLO c.loop.test")
            # now bytes that are not TLS records at all, under the TLS layer
            with socket.socket(fileno=os.dup(tls.fileno())) as under:
                under.sendall(b"this is not a TLS record\r\n" * 4)
            try:
                out["after"] = tls.recv(4096)
            except (ssl.SSLError, ConnectionResetError) as e:
                out["after"] = e.__class__.__name__
            return out
    finally:
        raw.close()


@pytest_twisted.inlineCallbacks
def test_garbage_during_the_handshake_closes_cleanly_and_the_server_goes_on(make_server, pki, log_events):
    server = make_server(tls={})
    data = yield deferToThread(_garbage_during_handshake, server.port)
    assert b"250" not in data and b"Traceback" not in data
    assert "TLS with 127.0.0.1 on tls failed: TLS handshake failed" in log_text(log_events)
    result = yield deferToThread(_smtplib_starttls, server.port, pki)  # still serving
    assert result["code"] == 220
    assert no_failures(log_events)


@pytest_twisted.inlineCallbacks
def test_garbage_after_the_handshake(make_server, pki, log_events):
    server = make_server(tls={})
    out = yield deferToThread(_garbage_after_handshake, server.port, pki)
    assert out["junk_command"][0] == 500
    assert out["ehlo"][0] == 250
    assert out["after"] in (b"", "SSLError", "ConnectionResetError")
    assert "TLS with 127.0.0.1 on tls failed: TLS error after the handshake: " in log_text(log_events)
    result = yield deferToThread(_smtplib_starttls, server.port, pki)
    assert result["code"] == 220
    assert no_failures(log_events)


# ---------------------------------------------------------------- swaks


@pytest_twisted.inlineCallbacks
def test_swaks_with_tls(make_server, pki):
    assert SWAKS, "swaks is not installed (scripts/install-test-deps.sh)"
    server = make_server(tls={}, require_tls=True)

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(
            [SWAKS, "--server", f"127.0.0.1:{server.port}", "--from", "a@sender.test", "--to", "b@local.test",
             "--helo", "swaks.loop.test", "--tls", "--tls-verify", "--tls-ca-path", str(pki.ca_file),
             "--tls-sni", HOST, "--header", "Subject: swaks tls", "--timeout", "20"],
            capture_output=True, text=True, timeout=40, stdin=subprocess.DEVNULL)

    r = yield deferToThread(run)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TLS started with cipher TLSv1.3" in r.stdout
    [(content, _)] = server.store.committed
    assert b"Subject: swaks tls" in content and b"with ESMTPS" in content
