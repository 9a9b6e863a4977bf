"""SMTP AUTH over real loopback sockets: smtplib and swaks, STARTTLS with a test CA, argon2 on the thread pool."""
from __future__ import annotations

import shutil
import smtplib
import ssl
import subprocess
from typing import Any

import argon2
import pytest
import pytest_twisted
from twisted.cred.portal import Portal
from twisted.internet.threads import deferToThread

from exmta.auth.lockout import LockoutSettings
from exmta.auth.smtp import Authenticator, blocking_runner
from exmta.auth.users import PasswordHasher, UserRecord, UsersChecker, UsersFile, UsersRealm
from exmta.config.schema import ReceiveConnectorConfig
from exmta.filters.base import FilterChain
from exmta.smtp.server import ESMTPServerFactory
from exmta.testing.memstore import MemoryStore
from support.smtp_stubs import StubPolicy

pytestmark = pytest.mark.integration

PASSWORD = "s3cret pass"


@pytest.fixture
def submission(tmp_path):
    import trustme
    from twisted.internet import reactor
    from twisted.internet.ssl import PrivateCertificate

    ca = trustme.CA()
    cert = ca.issue_cert("mx.loop.test", "127.0.0.1")
    ctx = PrivateCertificate.loadPEM(cert.private_key_and_cert_chain_pem.bytes()).options()
    hasher = PasswordHasher(argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    users = str(tmp_path / "users.jsonl")
    UsersFile(users).write({"alice": UserRecord("alice", hasher.hash(PASSWORD), ["alice@example.test"])})
    checker = UsersChecker(users, blocking_runner(reactor), hasher=hasher)
    store = MemoryStore(reactor)
    config = ReceiveConnectorConfig(name="submission", hostname="mx.loop.test")
    policy = StubPolicy(local_domains=("local.test",), relay_authenticated=True)  # authenticated clients may relay
    factory = ESMTPServerFactory(config, policy, FilterChain([], reactor), store, reactor, tls_context_factory=ctx)
    factory.authenticator = Authenticator(Portal(UsersRealm(checker), [checker]), reactor,
                                          lockout=LockoutSettings(tarpit=0.2))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield port.getHost().port, store, ca
    port.stopListening()
    for session in list(factory.sessions):
        session.transport.abortConnection()


def _smtplib(port: int, ca: Any, password: str, sender: str = "alice@example.test",
             starttls: bool = True) -> dict[str, Any]:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    out: dict[str, Any] = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.loop.test")
        out["auth_before_tls"] = client.esmtp_features.get("auth")
        if starttls:
            client.starttls(context=ctx)
            client.ehlo("client.loop.test")
        out["auth_after_tls"] = client.esmtp_features.get("auth")
        try:
            out["login"] = client.login("alice", password)
        except smtplib.SMTPException as e:
            out["login_error"] = e
            return out
        try:
            out["refused"] = client.sendmail(sender, ["someone@remote.test"],
                                             f"From: {sender}\r\nSubject: hi\r\n\r\nhello\r\n".encode())
        except smtplib.SMTPException as e:
            out["send_error"] = e
    return out


@pytest_twisted.inlineCallbacks
def test_smtplib_starttls_then_login_and_send(submission):
    port, store, ca = submission
    out = yield deferToThread(_smtplib, port, ca, PASSWORD)
    assert out["auth_before_tls"] is None and out["auth_after_tls"].split() == ["PLAIN", "LOGIN"]
    assert out["login"] == (235, b"2.7.0 Authentication successful")
    assert out["refused"] == {}
    [envelope] = (yield store.list_messages("incoming"))
    assert envelope.auth_identity == "alice" and envelope.sender == "alice@example.test"
    content = store.open_content(envelope.queue_id).read()
    assert b"with ESMTPSA id" in content


@pytest_twisted.inlineCallbacks
def test_smtplib_wrong_password_and_no_auth_without_tls(submission):
    port, store, ca = submission
    out = yield deferToThread(_smtplib, port, ca, "wrong")
    assert isinstance(out["login_error"], smtplib.SMTPAuthenticationError)
    assert out["login_error"].smtp_code == 535
    out = yield deferToThread(_smtplib, port, ca, PASSWORD, starttls=False)
    assert isinstance(out["login_error"], smtplib.SMTPNotSupportedError)  # AUTH is not offered in clear text
    assert (yield store.list_messages("incoming")) == []


@pytest_twisted.inlineCallbacks
def test_smtplib_send_as_someone_else_is_refused(submission):
    port, store, ca = submission
    out = yield deferToThread(_smtplib, port, ca, PASSWORD, "ceo@example.test")
    err = out["send_error"]
    assert isinstance(err, smtplib.SMTPSenderRefused)
    assert (err.smtp_code, err.smtp_error) == (550, b"5.7.60 Client does not have permissions to send as this sender")


def _swaks(port: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["swaks", "--server", "127.0.0.1", "--port", str(port), "--timeout", "15", "--helo", "swaks.test",
           "--to", "someone@remote.test", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest_twisted.inlineCallbacks
def test_swaks_auth_over_starttls(submission, mechanism):
    assert shutil.which("swaks"), "swaks is not installed: run scripts/install-test-deps.sh"
    port, store, _ = submission
    proc = yield deferToThread(_swaks, port, "--tls", "--auth", mechanism, "--auth-user", "alice",
                               "--auth-password", PASSWORD, "--from", "alice@example.test",
                               "--header", "From: alice@example.test")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "<~  235 2.7.0 Authentication successful" in proc.stdout
    [envelope] = (yield store.list_messages("incoming"))
    assert envelope.auth_identity == "alice"


@pytest_twisted.inlineCallbacks
def test_swaks_bad_password_and_plaintext_auth(submission):
    port, store, _ = submission
    proc = yield deferToThread(_swaks, port, "--tls", "--auth", "PLAIN", "--auth-user", "alice",
                               "--auth-password", "nope", "--from", "alice@example.test")
    assert proc.returncode != 0 and "<~* 535 5.7.8 Error: authentication failed" in proc.stdout
    proc = yield deferToThread(_swaks, port, "--auth", "PLAIN", "--auth-user", "alice",
                               "--auth-password", PASSWORD, "--from", "alice@example.test")
    assert proc.returncode != 0
    assert "Host did not advertise authentication" in proc.stdout + proc.stderr
    assert (yield store.list_messages("incoming")) == []
