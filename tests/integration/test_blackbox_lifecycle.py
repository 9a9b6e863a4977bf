"""Black-box: starting, stopping and restarting ``twistd -n exmta``; the queue survives."""
from __future__ import annotations

import signal
import smtplib
from pathlib import Path

import pytest

from support import procs
from support.exmta_proc import DEFAULT_DATA_PORT, ExmtaProcess, clean_exit, exmta_toml
from support.sinks import SmtpSink

pytestmark = pytest.mark.integration


def test_sigterm_stops_cleanly(exmta_relay: ExmtaProcess) -> None:
    port = exmta_relay.port
    assert clean_exit(exmta_relay.stop())
    assert not procs.port_in_use(port)
    assert exmta_relay.error_lines() == []


def test_queued_mail_survives_restart(tmp_path: Path, free_tcp_port: int) -> None:
    """Accepted while the next hop is down, delivered after a restart once it is up."""
    data = tmp_path / "data"
    toml = exmta_toml(smarthost=f"[127.0.0.1]:{free_tcp_port}", retry="1s")
    first = ExmtaProcess(tmp_path / "run1", toml=toml, data_dir=data).start()
    try:
        with smtplib.SMTP(procs.LOOPBACK, first.port, timeout=10) as c:
            c.sendmail("a@example.test", ["later@example.net"],
                       b"Subject: durable\r\n\r\nkeep me\r\n")
    finally:
        assert clean_exit(first.stop())
    with SmtpSink(port=free_tcp_port) as sink:
        second = ExmtaProcess(tmp_path / "run2", toml=toml, data_dir=data).start()
        try:
            (got,) = sink.wait_for(1, timeout=60)
            assert got.rcpt_tos == ["later@example.net"] and b"keep me" in got.content
        finally:
            second.stop()


def test_sigkill_after_250_loses_nothing(tmp_path: Path, free_tcp_port: int) -> None:
    """A 250 means the message is on disk: kill -9 right after it, restart, it is delivered."""
    data = tmp_path / "data"
    toml = exmta_toml(smarthost=f"[127.0.0.1]:{free_tcp_port}", retry="1s")
    first = ExmtaProcess(tmp_path / "run1", toml=toml, data_dir=data).start()
    with smtplib.SMTP(procs.LOOPBACK, first.port, timeout=10) as c:
        c.sendmail("a@example.test", ["k@example.net"], b"Subject: kill\r\n\r\nsurvive -9\r\n")
    assert first.process is not None
    procs.stop_pid(first.pid, sig=signal.SIGKILL, proc=first.process.proc, timeout=5)
    with SmtpSink(port=free_tcp_port) as sink:
        second = ExmtaProcess(tmp_path / "run2", toml=toml, data_dir=data).start()
        try:
            (got,) = sink.wait_for(1, timeout=60)
            assert b"survive -9" in got.content
        finally:
            second.stop()


def test_data_dir_default_config(tmp_path: Path) -> None:
    """``twistd -n exmta --data DIR``: 127.0.0.1:2525, example.test to DIR/mail/, receive workers "auto"."""
    if procs.port_in_use(DEFAULT_DATA_PORT):
        pytest.skip(f"127.0.0.1:{DEFAULT_DATA_PORT} is in use by another process")
    from exmta.config.load import auto_receive_workers

    ex = ExmtaProcess(tmp_path / "run", data_dir=tmp_path / "data").start()
    try:
        workers = auto_receive_workers()  # the default: one receive worker per CPU (none on one CPU)
        procs.wait_until(lambda: ex.log_text().count("receive worker ready") >= workers, 60, "the receive workers")
        assert len(procs.descendants(ex.pid)) == workers
        procs.swaks(ex.port, "bob@localhost", "alice@example.test", "--body", "default config")
        procs.wait_until(lambda: ex.maildir_messages("alice@example.test"), 30, "maildir delivery")
        assert b"default config" in ex.maildir_messages("alice@example.test")[0]
    finally:
        assert clean_exit(ex.stop())


def test_bad_config_exits_with_every_problem(tmp_path: Path) -> None:
    """A config with two mistakes: twistd exits non-zero and names both keys."""
    toml = exmta_toml(receive_extra='max_recipients = "many"',
                      extra='[[route]]\ndomains = ["x.example"]\nconnector = "nosuch"\n')
    ex = ExmtaProcess(tmp_path / "bad", toml=toml, start_timeout=20)
    with pytest.raises(procs.ProcessError):
        ex.start()
    log = ex.log_text()
    assert "max_recipients" in log and "nosuch" in log, log[-2000:]
