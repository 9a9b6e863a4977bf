"""Black-box: exmta's SMTP server as a client sees it (``twistd -n exmta`` as a process)."""
from __future__ import annotations

import smtplib
import socket

import pytest

from support import procs
from support.exmta_proc import ExmtaProcess
from support.sinks import SmtpSink

pytestmark = pytest.mark.integration


def _reply(sock: socket.socket) -> tuple[int, list[str]]:
    return procs.read_smtp_reply(sock, timeout=10)


def test_banner_names_the_host(exmta_relay: ExmtaProcess) -> None:
    code, text = procs.smtp_banner(procs.LOOPBACK, exmta_relay.port)
    assert code == 220
    assert text[0].startswith("mx.example.test")


def test_ehlo_advertises_p0_extensions(exmta_relay: ExmtaProcess) -> None:
    with smtplib.SMTP(procs.LOOPBACK, exmta_relay.port, timeout=10) as c:
        code, _ = c.ehlo("client.example.test")
        assert code == 250
        for ext in ("pipelining", "size", "8bitmime", "enhancedstatuscodes", "chunking"):
            assert c.has_extn(ext), f"{ext} not advertised: {c.esmtp_features}"
        assert int(c.esmtp_features["size"]) > 0


def test_relay_from_relay_network_reaches_next_hop(
    exmta_relay: ExmtaProcess, smtp_sink: SmtpSink,
) -> None:
    body = (b"Subject: relay test\r\nMessage-ID: <relay-1@example.test>\r\n\r\n"
            b"line one\r\nline two\r\n")
    with smtplib.SMTP(procs.LOOPBACK, exmta_relay.port, timeout=10) as c:
        rcpts = ["bob@example.net", "carol@example.org"]
        assert c.sendmail("alice@example.test", rcpts, body) == {}
    got = smtp_sink.wait_for_rcpts(["bob@example.net", "carol@example.org"], timeout=30)
    assert sorted(r for m in got for r in m.rcpt_tos) == ["bob@example.net", "carol@example.org"]
    assert all(m.mail_from == "alice@example.test" for m in got)
    content = got[0].content.replace(b"\r\n", b"\n")
    assert content.endswith(body.replace(b"\r\n", b"\n")), "message body changed in transit"
    assert b"Received: " in content.split(body.replace(b"\r\n", b"\n")[:20])[0]


def test_local_domain_delivered_to_maildir(exmta_relay: ExmtaProcess) -> None:
    procs.swaks(exmta_relay.port, "bob@example.net", "alice@example.test",
                "--header", "Subject: to maildir", "--body", "maildir body")
    procs.wait_until(lambda: exmta_relay.maildir_messages("alice@example.test"), 30,
                     "maildir delivery")
    (msg,) = exmta_relay.maildir_messages("alice@example.test")
    assert b"maildir body" in msg and b"Subject: to maildir" in msg


def test_relay_refused_outside_relay_networks(
    exmta_factory, smtp_sink: SmtpSink,  # noqa: ANN001
) -> None:
    from support.exmta_proc import exmta_toml
    ex = exmta_factory(toml=exmta_toml(smarthost=smtp_sink.next_hop, relay_networks=[]))
    with smtplib.SMTP(procs.LOOPBACK, ex.port, timeout=10) as c:
        c.ehlo("client.example.test")
        c.mail("x@example.net")
        code, text = c.rcpt("someone@example.org")
        assert 500 <= code < 600, (code, text)
        code, _ = c.rcpt("alice@example.test")  # an accepted domain is still open to anyone
        assert code == 250


def test_pipelined_transaction_replies_in_order(
    exmta_relay: ExmtaProcess, smtp_sink: SmtpSink,
) -> None:
    with socket.create_connection((procs.LOOPBACK, exmta_relay.port), timeout=10) as s:
        assert _reply(s)[0] == 220
        s.sendall(b"EHLO client.example.test\r\n")
        assert _reply(s)[0] == 250
        s.sendall(b"MAIL FROM:<p@example.test>\r\nRCPT TO:<x@example.net>\r\n"
                  b"RCPT TO:<y@example.net>\r\nDATA\r\n")
        assert [_reply(s)[0] for _ in range(4)] == [250, 250, 250, 354]
        s.sendall(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert _reply(s)[0] == 250
        assert _reply(s)[0] == 221
    got = smtp_sink.wait_for_rcpts(["x@example.net", "y@example.net"], timeout=30)
    assert sorted(r for m in got for r in m.rcpt_tos) == ["x@example.net", "y@example.net"]


def test_bare_lf_in_data_is_rejected(exmta_relay: ExmtaProcess, smtp_sink: SmtpSink) -> None:
    """SMTP smuggling defence (bare_lf = "reject" is the default)."""
    with socket.create_connection((procs.LOOPBACK, exmta_relay.port), timeout=10) as s:
        _reply(s)
        for cmd, want in ((b"EHLO c.example.test\r\n", 250),
                          (b"MAIL FROM:<a@example.test>\r\n", 250),
                          (b"RCPT TO:<b@example.net>\r\n", 250), (b"DATA\r\n", 354)):
            s.sendall(cmd)
            assert _reply(s)[0] == want
        s.sendall(b"Subject: smuggle\r\n\r\nhello\n.\nMAIL FROM:<evil@example.test>\r\n.\r\n")
        code, text = _reply(s)
        assert 500 <= code < 600, (code, text)
    assert smtp_sink.messages == []


def test_oversized_message_refused_at_mail_from(
    exmta_factory, smtp_sink: SmtpSink,  # noqa: ANN001
) -> None:
    from support.exmta_proc import exmta_toml
    ex = exmta_factory(toml=exmta_toml(smarthost=smtp_sink.next_hop,
                                       receive_extra="max_message_size = 10000"))
    with smtplib.SMTP(procs.LOOPBACK, ex.port, timeout=10) as c:
        c.ehlo("client.example.test")
        assert int(c.esmtp_features["size"]) == 10000
        code, text = c.mail("a@example.test", ["SIZE=20000"])
        assert code == 552, (code, text)


def test_quit_and_errors_do_not_crash_the_server(exmta_relay: ExmtaProcess) -> None:
    with socket.create_connection((procs.LOOPBACK, exmta_relay.port), timeout=10) as s:
        _reply(s)
        s.sendall(b"EHLO client.example.test\r\n")
        assert _reply(s)[0] == 250
        for junk in (b"FOO\r\n", b"RCPT TO:<x@example.net>\r\n", b"DATA\r\n",
                     b"MAIL FROM:<unterminated\r\n"):
            s.sendall(junk)
            code, text = _reply(s)
            assert 500 <= code < 600, (junk, code, text)
        s.sendall(b"QUIT\r\n")
        assert _reply(s)[0] == 221
    assert procs.smtp_banner(procs.LOOPBACK, exmta_relay.port)[0] == 220
    assert exmta_relay.running()
    assert exmta_relay.error_lines() == []


def test_bdat_chunks_are_joined(exmta_relay: ExmtaProcess, smtp_sink: SmtpSink) -> None:
    """CHUNKING (RFC 3030): two BDAT chunks, the last one with LAST."""
    part1 = b"Subject: chunked\r\n\r\nfirst chunk "
    part2 = b"second chunk\r\n"
    with socket.create_connection((procs.LOOPBACK, exmta_relay.port), timeout=10) as s:
        _reply(s)
        for cmd, want in ((b"EHLO c.example.test\r\n", 250),
                          (b"MAIL FROM:<a@example.test>\r\n", 250),
                          (b"RCPT TO:<chunks@example.net>\r\n", 250)):
            s.sendall(cmd)
            assert _reply(s)[0] == want
        s.sendall(b"BDAT %d\r\n" % len(part1) + part1)
        assert _reply(s)[0] == 250
        s.sendall(b"BDAT %d LAST\r\n" % len(part2) + part2)
        assert _reply(s)[0] == 250
        s.sendall(b"QUIT\r\n")
        assert _reply(s)[0] == 221
    (got,) = smtp_sink.wait_for(1, timeout=30)
    assert got.content.replace(b"\r\n", b"\n").endswith(b"first chunk second chunk\n")
