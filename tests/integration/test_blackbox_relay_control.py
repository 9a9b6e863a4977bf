"""Black-box relay control: every classic open-relay trick over a real socket, a recipient list, and a
submission connector for authenticated users only with per-user limits (``twistd -n exmta``)."""
from __future__ import annotations

import smtplib
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from exmta.auth.users import PasswordHasher, UserRecord, UsersFile
from support import procs
from support.exmta_proc import ExmtaProcess, exmta_toml
from support.sinks import SmtpSink

pytestmark = pytest.mark.integration

TRICKS = [
    "<user%elsewhere.test@example.test>",
    "<elsewhere.test!user@example.test>",
    "<\"user@elsewhere.test\"@example.test>",
    "<\"user%elsewhere.test\"@example.test>",
    "<user@[127.0.0.1]>",
    "<user@[IPv6:::1]>",
    "<user@example.test.>",
    "<user@elsewhere.test>",
    "<user@ElseWhere.TEST>",
    "<user@example.test.elsewhere.test>",
    "<@example.test:user@elsewhere.test>",
    "<@example.test,@mx.example.test:user@elsewhere.test>",
]


def rcpt_replies(port: int, addresses: list[str]) -> list[tuple[int, list[str]]]:
    """Say RCPT TO for each address in one session (from 127.0.0.1); the replies."""
    out = []
    with socket.create_connection((procs.LOOPBACK, port), timeout=10) as sock:
        assert procs.read_smtp_reply(sock)[0] == 220
        sock.sendall(b"EHLO c.example.test\r\n")
        assert procs.read_smtp_reply(sock)[0] == 250
        sock.sendall(b"MAIL FROM:<x@example.net>\r\n")
        assert procs.read_smtp_reply(sock)[0] == 250
        for address in addresses:
            sock.sendall(b"RCPT TO:" + address.encode() + b"\r\n")
            out.append(procs.read_smtp_reply(sock))
        sock.sendall(b"QUIT\r\n")
    return out


def test_every_relay_trick_is_refused_and_unknown_users_get_550(
        exmta_factory: Callable[..., ExmtaProcess], tmp_path: Path) -> None:
    listing = tmp_path / "recipients.txt"
    listing.write_text("alice@example.test\n")
    toml = exmta_toml(relay_networks=[]).replace("[server]\n", f'[server]\nrecipient_list = "{listing}"\n', 1)
    exmta = exmta_factory(toml=toml)
    for address, (code, text) in zip(TRICKS, rcpt_replies(exmta.port, TRICKS)):
        assert (address, code, text) == (address, 554, ["5.7.1 Relay access denied"])
    replies = rcpt_replies(exmta.port, ["<alice@example.test>", "<bob@example.test>", "<postmaster@example.test>"])
    assert replies == [(250, ["2.1.5 Ok"]), (550, ["5.1.1 Recipient address rejected: user unknown"]),
                       (250, ["2.1.5 Ok"])]
    # the list is re-read when it changes: no restart
    listing.write_text("alice@example.test\nbob@example.test\n")
    procs.wait_until(lambda: rcpt_replies(exmta.port, ["<bob@example.test>"])[0][0] == 250, 15, "list reloaded")
    assert "relay denied for 127.0.0.1 to <user@elsewhere.test>" in exmta.log_text()
    assert not exmta.error_lines()


PASSWORD = "Subm1ssion pass"


def test_submission_connector_for_authenticated_users_with_a_per_user_limit(
        exmta_factory: Callable[..., ExmtaProcess], smtp_sink: SmtpSink, tmp_path: Path) -> None:
    users = tmp_path / "users.jsonl"
    UsersFile(str(users)).write({"alice": UserRecord("alice", PasswordHasher().hash(PASSWORD), ["*@example.test"])})
    toml = exmta_toml(smarthost=smtp_sink.next_hop, relay_networks=[], receive_extra=(
        'permission_groups = ["authenticated"]\n'
        'messages_per_minute_per_user = 2\n'
        'auth = ["PLAIN", "LOGIN"]\n'
        f'auth_backend = "{users}"\n'
        'auth_before_tls_networks = ["127.0.0.0/8"]\n'))
    exmta = exmta_factory(toml=toml)
    with smtplib.SMTP(procs.LOOPBACK, exmta.port, timeout=20) as c:
        c.ehlo("c.example.test")
        code, text = c.mail("alice@example.test")
        assert (code, text) == (530, b"5.7.0 Authentication required")  # no anonymous mail, not even local
    with smtplib.SMTP(procs.LOOPBACK, exmta.port, timeout=20) as c:
        c.login("alice", PASSWORD)
        for i in range(2):
            message = b"From: alice@example.test\r\nSubject: s\r\n\r\nx\r\n"  # no From: fails send-as
            assert c.sendmail("alice@example.test", [f"r{i}@remote.test"], message) == {}
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            c.sendmail("alice@example.test", ["r9@remote.test"], b"Subject: s\r\n\r\nx\r\n")
        assert refused.value.smtp_code == 450
        assert refused.value.smtp_error == (b"4.7.1 Error: too much mail from alice, limit 2 messages per minute; "
                                            b"try again later")
    smtp_sink.wait_for(2, timeout=30)
    assert not exmta.error_lines()
