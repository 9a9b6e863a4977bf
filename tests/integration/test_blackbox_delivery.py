"""Black-box: exmta between real MTAs (Postfix in front and behind, Dovecot LMTP)."""
from __future__ import annotations

import pytest

from support import procs
from support.dovecot import DovecotLmtp
from support.exmta_proc import exmta_toml
from support.sinks import SmtpSink

pytestmark = pytest.mark.integration


def test_postfix_to_exmta_to_postfix(postfix_factory, exmta_factory) -> None:  # noqa: ANN001
    """swaks -> Postfix (relayhost = exmta) -> exmta -> Postfix delivering to Maildir."""
    behind = postfix_factory(maildir_domains=["example.net"], hostname="behind.example.test")
    ex = exmta_factory(toml=exmta_toml(smarthost=f"[127.0.0.1]:{behind.port}"))
    front = postfix_factory(relayhost=f"[127.0.0.1]:{ex.port}", hostname="front.example.test")
    procs.swaks(front.port, "alice@example.test", "dave@example.net",
                "--header", "Subject: through exmta", "--body", "three hops")
    (got,) = behind.wait_maildir("dave@example.net", 1, timeout=60)
    assert b"three hops" in got
    received = [line for line in got.split(b"\n") if line.startswith(b"Received:")]
    assert len(received) >= 3, got[:1500]  # behind, exmta, front
    assert b"mx.example.test" in got  # exmta's hostname in its Received header
    front.wait_queue_empty(timeout=30)
    assert "relay=127.0.0.1[127.0.0.1]:%d" % ex.port in front.log_text()


def test_exmta_delivers_over_lmtp_to_dovecot(
    exmta_factory, dovecot_lmtp: DovecotLmtp,  # noqa: ANN001
) -> None:
    ex = exmta_factory(toml=exmta_toml(lmtp=f"127.0.0.1:{dovecot_lmtp.port}",
                                       lmtp_domains=["example.net"]))
    procs.swaks(ex.port, "x@example.test", ["alice@example.net", "bob@example.net"],
                "--body", "lmtp via exmta")
    for rcpt in ("alice@example.net", "bob@example.net"):
        (got,) = dovecot_lmtp.wait_maildir(rcpt, 1, timeout=30)
        assert b"lmtp via exmta" in got


def test_8bit_and_long_message_relayed_intact(
    exmta_relay, smtp_sink: SmtpSink,  # noqa: ANN001
) -> None:
    import smtplib
    body = ("Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n").encode() + \
        "Grüße aus Köln\r\n.leading dot\r\n".encode() * 3000
    with smtplib.SMTP(procs.LOOPBACK, exmta_relay.port, timeout=30) as c:
        c.ehlo("client.example.test")
        c.sendmail("a@example.test", ["b@example.net"], body, mail_options=["BODY=8BITMIME"])
    (got,) = smtp_sink.wait_for(1, timeout=30)
    assert got.content.endswith(body), "body changed in transit (dot-stuffing or 8-bit damage)"


def test_notify_success_through_a_hop_without_dsn_gets_a_relayed_report(
    exmta_relay, smtp_sink: SmtpSink,  # noqa: ANN001
) -> None:
    """aiosmtpd offers no DSN: exmta cannot pass NOTIFY on, so it reports action=relayed itself
    (RFC 3461 5.2.2); the report goes to the sender through the same next hop."""
    import smtplib
    with smtplib.SMTP(procs.LOOPBACK, exmta_relay.port, timeout=30) as c:
        c.ehlo("client.example.test")
        c.sendmail("alice@sender.example", ["bob@example.net"], b"Subject: track me\r\n\r\nhello\r\n",
                   rcpt_options=["NOTIFY=SUCCESS"])
    got = smtp_sink.wait_for(2, timeout=30)
    [report] = [r for r in got if r.message().get_content_type() == "multipart/report"]
    assert report.rcpt_tos == ["alice@sender.example"] and report.mail_from in ("", "<>")
    status = report.message().get_payload()[1].get_payload()
    assert status[1]["Action"] == "relayed" and status[1]["Final-Recipient"] == "rfc822; bob@example.net"
    [original] = [r for r in got if r is not report]
    assert original.rcpt_tos == ["bob@example.net"] and b"hello" in original.content
