"""A real ``twistd exmta`` with a receive worker, OpenDKIM as its milter, mail delivered to Maildir:
signed (verified by exmta's own DKIM verifier), then OpenDKIM stopped (451, nothing delivered), then a
SIGHUP that switches the milter's default action to accept reaches the worker (250, delivered unsigned)."""
from __future__ import annotations

import signal
import smtplib
from pathlib import Path

import pytest

from exmta.dns import AuthDNS
from exmta.filters.dkim_verify import verify_all
from exmta.routing.dns import DNSResolver
from support import knot, milters, procs
from support.exmta_proc import ExmtaProcess, exmta_toml

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not milters.opendkim_available(),
                                 reason="opendkim is not installed (scripts/deps-milter.sh)")]

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: u@example.test\r\nSubject: via twistd\r\n"
           b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\nMessage-ID: <bb1@example.test>\r\n\r\nHello from the worker.\r\n")


def _send(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.example.test")
        client.mail("alice@example.test")
        client.rcpt("u@example.test")
        return client.data(MESSAGE)


def test_opendkim_through_twistd_with_a_worker_and_sighup(tmp_path: Path) -> None:
    signer = milters.OpenDKIM(tmp_path / "dkim").start()
    milter = (f'\n[filters.milter]\nplugin = "milter"\ntimeout = "2m"\n\n[[filters.milter.milters]]\n'
              f'name = "opendkim"\nsocket = "{signer.socket}"\ndefault_action = "tempfail"\n'
              'connect_timeout = "10s"\n')
    toml = exmta_toml(receive_workers=1, receive_extra='filters = ["milter"]\n', extra=milter)
    exmta = ExmtaProcess(tmp_path / "run", toml).start()
    try:
        procs.wait_until(lambda: "SIGHUP reloads" in exmta.log_text(), timeout=30, what="the SIGHUP handler")
        code, reply = _send(exmta.port)
        assert code == 250, reply
        procs.wait_until(lambda: len(exmta.maildir_messages("u@example.test")) == 1, timeout=60, what="delivery")
        [signed] = exmta.maildir_messages("u@example.test")
        assert b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test;" in signed
        with knot.KnotServer(tmp_path, {"example.test": f'sel1._domainkey IN TXT "{signer.txt}"\n'}) as server:
            dns = AuthDNS(DNSResolver(None, None, server.nameservers, timeout=3.0))
            # the delivered copy starts with the Maildir's own Return-Path/Delivered-To: both unsigned
            assert [(r.result, r.selector) for r in verify_all(dns, signed)] == [("pass", "sel1")]

        signer.stop()  # the milter is gone: tempfail, and nothing is delivered
        code, reply = _send(exmta.port)
        assert (code, reply[:5]) == (451, b"4.7.1"), reply
        assert len(exmta.maildir_messages("u@example.test")) == 1

        assert exmta.config_path is not None
        exmta.config_path.write_text(exmta.render_toml().replace('default_action = "tempfail"',
                                                                 'default_action = "accept"'))
        exmta.process.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        procs.wait_until(lambda: exmta.log_text().count("reloaded (") >= 2, timeout=30,
                         what="the main process and the worker reloaded")
        code, reply = _send(exmta.port)
        assert code == 250, reply
        procs.wait_until(lambda: len(exmta.maildir_messages("u@example.test")) == 2, timeout=60, what="delivery")
        assert b"DKIM-Signature" not in exmta.maildir_messages("u@example.test")[1]
        assert "milter opendkim" in exmta.log_text() and exmta.error_lines() == []
    finally:
        exmta.stop()
        signer.stop()
