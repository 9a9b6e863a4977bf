"""A real ``twistd exmta`` with a receive worker and the rspamd filter (a real rspamd): the main process
and the worker apply the same SCL threshold, and a SIGHUP that lowers it reaches both; a threshold the
plugin refuses is refused by `exmta check-config` and by the reload alike, and changes nothing."""
from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from support import procs
from support import rspamd as rspamd_support
from support.exmta_proc import ExmtaProcess, exmta_toml

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not rspamd_support.available(), reason="rspamd is not installed "
                                 "(scripts/deps-rspamd.sh)")]

LISTEN_TCP = 'listen = ["tcp:{port}:interface=127.0.0.1"]'
LISTEN_BOTH = 'listen = ["tcp:{port}:interface=127.0.0.1", "unix:{workdir}/main.sock"]'
SPAM = (b"From: a@remote.test\r\nTo: bob@example.test\r\nSubject: offer\r\nDate: Mon, 07 Dec 2026 10:00:00 +0000\r\n"
        b"Message-ID: <reload@remote.test>\r\n\r\nEXMTA-TEST-SCORE=11\r\n")  # SCL 6 (rspamd: rewrite subject)


class _UnixSMTP(smtplib.SMTP):
    def _get_socket(self, host, port, timeout):
        import socket

        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(host)
        return s


def _send(client: smtplib.SMTP) -> tuple[int, str]:
    with client:
        client.ehlo("client.remote.test")
        try:
            client.sendmail("a@remote.test", ["bob@example.test"], SPAM)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
    return 250, ""


def _via_worker(exmta: ExmtaProcess) -> tuple[int, str]:
    return _send(smtplib.SMTP("127.0.0.1", exmta.port, timeout=60))


def _via_main(exmta: ExmtaProcess) -> tuple[int, str]:
    client = _UnixSMTP(timeout=60)
    client.connect(str(exmta.workdir / "main.sock"))
    return _send(client)


def _sighup(exmta: ExmtaProcess, count: int) -> None:
    exmta.process.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    procs.wait_until(lambda: exmta.log_text().count("reloaded (") >= count, timeout=30, what=f"{count}x reloaded")


def test_scl_threshold_in_main_and_worker_and_after_sighup(tmp_path: Path, rspamd) -> None:
    table = f'[filters.rspamd]\nplugin = "rspamd"\nsocket = "{rspamd.endpoint}"\nscan_timeout = "20s"\n'
    toml = exmta_toml(receive_workers=1, relay_networks=(), receive_extra='filters = ["rspamd"]\n',
                      extra=table).replace(LISTEN_TCP, LISTEN_BOTH)
    exmta = ExmtaProcess(tmp_path / "run", toml).start()
    try:
        procs.wait_until(lambda: "SIGHUP reloads" in exmta.log_text(), timeout=30, what="the SIGHUP handler")
        procs.wait_until(lambda: _via_worker(exmta)[0] == 250, timeout=60, what="the worker accepts SCL 6",
                         interval=0.2)
        assert _via_main(exmta)[0] == 250
        assert exmta.config_path is not None
        good = exmta.render_toml()
        # a threshold the plugin refuses: check-config says so, and a reload changes nothing anywhere
        bad = good.replace('scan_timeout = "20s"', 'scan_timeout = "20s"\nscl_reject = 12')
        exmta.config_path.write_text(bad)
        check = subprocess.run([sys.executable, "-m", "exmta", "check-config", str(exmta.config_path)],
                               capture_output=True, text=True, timeout=120)
        assert check.returncode != 0 and "scl_reject must be an SCL from 0 to 9" in check.stdout + check.stderr
        exmta.process.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        procs.wait_until(lambda: "nothing changed" in exmta.log_text(), timeout=30, what="the refused reload")
        assert _via_worker(exmta)[0] == 250 and _via_main(exmta)[0] == 250
        # SCL 6 rejected from now on, in the worker and in the main process
        exmta.config_path.write_text(good.replace('scan_timeout = "20s"', 'scan_timeout = "20s"\nscl_reject = 6'))
        _sighup(exmta, 2)
        code, text = _via_worker(exmta)
        assert code == 550 and text.startswith("5.7.1 Message rejected as spam")
        code, text = _via_main(exmta)
        assert code == 550 and text.startswith("5.7.1")
        assert exmta.error_lines() == []
    finally:
        exmta.stop()
