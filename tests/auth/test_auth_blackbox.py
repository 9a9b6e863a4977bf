"""Black-box: ``twistd -n exmta`` with a users file, driven by swaks and smtplib (AUTH from a pinned network)."""
from __future__ import annotations

import smtplib
import subprocess
from pathlib import Path

import pytest

from exmta.auth.users import PasswordHasher, UserRecord, UsersFile
from support import procs
from support.exmta_proc import ExmtaProcess, exmta_toml
from support.sinks import SmtpSink

pytestmark = pytest.mark.integration

PASSWORD = "Blackb0x pass"


@pytest.fixture
def submission(tmp_path: Path, smtp_sink: SmtpSink, exmta_factory) -> ExmtaProcess:
    users = tmp_path / "users.jsonl"
    UsersFile(str(users)).write({"alice": UserRecord("alice", PasswordHasher().hash(PASSWORD), ["*@example.test"])})
    toml = exmta_toml(smarthost=smtp_sink.next_hop, relay_networks=(), receive_extra=(
        'auth = ["PLAIN", "LOGIN"]\n'
        f'auth_backend = "{users}"\n'
        'auth_before_tls_networks = ["127.0.0.0/8"]\n'  # loopback is pinned: no TLS needed in this test
        'auth_tarpit = "0.5s"\n'
        'auth_lockout_user_failures = 3\n'))
    return exmta_factory(toml=toml)


def _swaks(port: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(port), "--timeout", "20",
                           "--helo", "swaks.test", *extra], capture_output=True, text=True, timeout=60)


def test_authenticated_user_relays_and_anonymous_does_not(submission: ExmtaProcess, smtp_sink: SmtpSink):
    proc = _swaks(submission.port, "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", PASSWORD,
                  "--from", "alice@example.test", "--to", "bob@remote.test", "--header", "From: alice@example.test")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [message] = smtp_sink.wait_for(1, timeout=30)
    assert message.rcpt_tos == ["bob@remote.test"]
    assert b"(exmta) with ESMTPA id " in message.content
    proc = _swaks(submission.port, "--from", "alice@example.test", "--to", "bob@remote.test")
    assert proc.returncode != 0 and "<** 554 5.7.1 Relay access denied" in proc.stdout


def test_smtplib_login_wrong_password_send_as_and_lockout(submission: ExmtaProcess, smtp_sink: SmtpSink):
    with smtplib.SMTP(procs.LOOPBACK, submission.port, timeout=20) as c:
        c.ehlo("c.test")
        assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.login("alice", "not it")
        assert e.value.smtp_code == 535
        c.login("alice", PASSWORD)
        with pytest.raises(smtplib.SMTPSenderRefused) as sender:
            c.sendmail("ceo@contoso.example", ["x@remote.test"], b"Subject: x\r\n\r\nx\r\n")
        assert sender.value.smtp_code == 550 and sender.value.smtp_error.startswith(b"5.7.60 ")
        assert c.sendmail("sales@example.test", ["x@remote.test"], b"From: sales@example.test\r\n\r\nx\r\n") == {}
    smtp_sink.wait_for(1, timeout=30)
    for _ in range(2):  # with the first failure above, 3 failures lock the user out
        with smtplib.SMTP(procs.LOOPBACK, submission.port, timeout=20) as c:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                c.login("ALICE", "still not it")
    with smtplib.SMTP(procs.LOOPBACK, submission.port, timeout=20) as c:
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.login("alice", PASSWORD)
        assert e.value.smtp_code == 454
    log = submission.log_path.read_text()
    assert "AUTH PLAIN failed for 'alice' from 127.0.0.1" in log or "AUTH LOGIN failed for 'alice' from 127.0.0.1" in log
    assert "AUTH PLAIN as alice from 127.0.0.1" in log or "AUTH LOGIN as alice from 127.0.0.1" in log
    for secret in ("not it", PASSWORD):
        assert secret not in log
