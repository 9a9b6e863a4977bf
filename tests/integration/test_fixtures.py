"""Proves the integration fixtures against real peers (no exmta involved).

swaks -> private Postfix -> aiosmtpd sink; Postfix -> Postfix -> Maildir;
Postfix -> Dovecot LMTP; Dovecot LMTP -> Maildir; the process helpers stop
exactly what they start.
"""
from __future__ import annotations

import signal
import smtplib
import socket
import sys
import time
from pathlib import Path

import pytest

from support import procs
from support.dovecot import DovecotLmtp
from support.postfix import PostfixInstance
from support.sinks import SmtpSink

pytestmark = pytest.mark.integration


# ----------------------------------------------------------------- procs


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = procs.free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as s:
            s.bind((procs.LOOPBACK, port))


def test_managed_process_stops_by_pid(tmp_path: Path) -> None:
    p = procs.ManagedProcess(["sleep", "60"], log_path=tmp_path / "sleep.log").start()
    pid = p.pid
    assert procs.pid_alive(pid)
    assert p.stop(timeout=5) == -signal.SIGTERM
    assert not procs.pid_alive(pid)


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")
    p = procs.ManagedProcess([sys.executable, "-c", code], log_path=tmp_path / "ign.log",
                             stop_timeout=0.5).start()
    procs.wait_until(lambda: "ready" in p.log_text(), 10, "child ready", proc=p.proc)
    t0 = time.monotonic()
    assert p.stop() == -signal.SIGKILL
    assert time.monotonic() - t0 < 5


def test_stop_reaps_orphaned_descendants(tmp_path: Path) -> None:
    marker = tmp_path / "kid.pid"
    p = procs.ManagedProcess(
        ["sh", "-c", f"sleep 60 & echo $! > {marker}; wait"], log_path=tmp_path / "sh.log",
    ).start()
    procs.wait_until(lambda: marker.read_text().strip() != "", 10, "grandchild", proc=p.proc)
    kid = int(marker.read_text())
    assert procs.pid_alive(kid)
    p.stop(timeout=5)
    procs.wait_until(lambda: not procs.pid_alive(kid), 5, "grandchild gone")


def test_wait_for_smtp_reports_early_exit(tmp_path: Path) -> None:
    p = procs.ManagedProcess(["sh", "-c", "echo boom; exit 3"], log_path=tmp_path / "x.log").start()
    with pytest.raises(procs.ProcessError, match=r"(?s)rc=3.*boom"):
        p.wait_smtp(procs.free_port(), timeout=10)
    p.stop()


def test_wait_for_smtp_is_bounded() -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        procs.wait_for_smtp(procs.free_port(), timeout=0.5)
    assert time.monotonic() - t0 < 3


# ----------------------------------------------------------------- sinks


def test_sink_records_envelope_and_content(smtp_sink: SmtpSink) -> None:
    with smtplib.SMTP(procs.LOOPBACK, smtp_sink.port, timeout=10) as c:
        c.sendmail("a@example.test", ["b@example.net", "c@example.net"],
                   b"Subject: one\r\n\r\nbody\r\n")
    (got,) = smtp_sink.wait_for(1, timeout=10)
    assert got.mail_from == "a@example.test"
    assert got.rcpt_tos == ["b@example.net", "c@example.net"]
    assert got.message()["Subject"] == "one"


def test_sink_policies_reject_and_tempfail(smtp_sink_factory) -> None:  # noqa: ANN001
    sink = smtp_sink_factory(
        rcpt_policy=lambda rcpt: "550 5.1.1 no such user" if rcpt.startswith("bad") else None,
        data_policy=lambda m: "451 4.3.0 later" if b"tempfail" in m.content else None,
    )
    with smtplib.SMTP(procs.LOOPBACK, sink.port, timeout=10) as c:
        refused = c.sendmail("a@example.test", ["bad@example.net", "ok@example.net"],
                             b"Subject: x\r\n\r\nfine\r\n")
        assert refused == {"bad@example.net": (550, b"5.1.1 no such user")}
        with pytest.raises(smtplib.SMTPDataError) as exc:
            c.sendmail("a@example.test", ["ok@example.net"], b"Subject: x\r\n\r\ntempfail\r\n")
        assert exc.value.smtp_code == 451
    assert len(sink.wait_for(1)) == 1
    assert len(sink.rejected) == 1


# --------------------------------------------------------------- postfix


def test_postfix_relays_swaks_message_to_sink(
    postfix_relay: PostfixInstance, smtp_sink: SmtpSink,
) -> None:
    procs.swaks(postfix_relay.port, "alice@example.test", "bob@example.net",
                "--header", "Subject: via postfix", "--body", "hello sink")
    (got,) = smtp_sink.wait_for(1, timeout=30)
    assert got.mail_from == "alice@example.test"
    assert got.rcpt_tos == ["bob@example.net"]
    msg = got.message()
    assert msg["Subject"] == "via postfix"
    assert "by postfix.example.test (Postfix)" in msg["Received"]
    assert "hello sink" in msg.get_content()
    postfix_relay.wait_queue_empty(timeout=10)
    assert "status=sent" in postfix_relay.log_text()


def test_postfix_delivers_to_maildir(postfix_maildir: PostfixInstance) -> None:
    procs.swaks(postfix_maildir.port, "x@example.test",
                ["alice@example.net", "carol@example.net"], "--body", "to maildir")
    (alice,) = postfix_maildir.wait_maildir("alice@example.net", 1, timeout=30)
    (carol,) = postfix_maildir.wait_maildir("carol@example.net", 1, timeout=30)
    assert b"to maildir" in alice and b"Delivered-To: carol@example.net" in carol
    assert postfix_maildir.maildir_messages("bob@example.net") == []


def test_postfix_as_client_relays_to_next_hop(postfix_factory) -> None:  # noqa: ANN001
    """Role (b): a Postfix whose relayhost is another server (here a second Postfix)."""
    server = postfix_factory(maildir_domains=["example.net"], hostname="server.example.test")
    client = postfix_factory(relayhost=f"[127.0.0.1]:{server.port}", hostname="client.example.test")
    client.send("a@example.test", ["dave@example.net"], b"Subject: chain\r\n\r\nchained\r\n")
    (got,) = server.wait_maildir("dave@example.net", 1, timeout=30)
    assert got.count(b"(Postfix) with ESMTP") == 2
    client.wait_queue_empty(timeout=10)


def test_postfix_deferred_mail_is_visible_and_retried(
    postfix_factory, free_tcp_port: int,  # noqa: ANN001
) -> None:
    """Mail to a next hop that is down stays queued; it leaves once the hop is up."""
    pf = postfix_factory(relayhost=f"[127.0.0.1]:{free_tcp_port}")
    pf.send("a@example.test", ["z@example.net"], b"Subject: later\r\n\r\nwait\r\n")
    pf.wait_log(r"status=deferred", timeout=30)
    assert len(pf.queue()) == 1
    with SmtpSink(port=free_tcp_port) as sink:
        pf.flush()
        assert sink.wait_for(1, timeout=30)[0].rcpt_tos == ["z@example.net"]
    pf.wait_queue_empty(timeout=10)


def test_postfix_stop_leaves_no_process(tmp_path: Path) -> None:
    pf = PostfixInstance(tmp_path / "pf").start()
    pf.send("a@example.test", ["b@example.net"], b"Subject: x\r\n\r\ny\r\n")  # spawns daemons
    kids = procs.descendants(pf.pid)
    assert kids, "master should have children (qmgr, pickup, smtpd ...)"
    master = pf.pid
    pf.stop()
    assert not procs.pid_alive(master)
    # stop() returns once every process of the instance is gone: the children seen above, and any
    # daemon the master forked after that snapshot (all stay in the master's process group)
    assert not any(procs.pid_alive(k, st) for k, st in kids)
    assert procs.process_group(master) == []
    # so nothing of this instance listens on its port (whatever else on this shared machine may
    # have been given the same ephemeral port since: a connect would not tell them apart)
    assert not set(procs.listeners(pf.port)) & ({master} | {k for k, _ in kids})


def test_postfix_routes_to_dovecot_lmtp(
    postfix_factory, dovecot_lmtp: DovecotLmtp,  # noqa: ANN001
) -> None:
    pf = postfix_factory(routes={"example.net": f"lmtp:inet:127.0.0.1:{dovecot_lmtp.port}"})
    procs.swaks(pf.port, "a@example.test", "bob@example.net", "--body", "via lmtp")
    (got,) = dovecot_lmtp.wait_maildir("bob@example.net", 1, timeout=30)
    assert b"via lmtp" in got and b"with LMTP" in got


# --------------------------------------------------------------- dovecot


def test_dovecot_lmtp_stores_in_maildir(dovecot_lmtp: DovecotLmtp) -> None:
    refused = dovecot_lmtp.send("x@example.test", ["alice@example.net", "nobody@example.net"],
                                b"Subject: lmtp\r\n\r\nstored\r\n")
    assert refused["nobody@example.net"][0] == 550
    (got,) = dovecot_lmtp.wait_maildir("alice@example.net", 1, timeout=10)
    assert b"Delivered-To: alice@example.net" in got and b"stored" in got


def test_dovecot_swaks_lmtp(dovecot_lmtp: DovecotLmtp) -> None:
    procs.swaks(dovecot_lmtp.port, "x@example.test", "bob@example.net",
                "--protocol", "LMTP", "--body", "swaks lmtp")
    assert b"swaks lmtp" in dovecot_lmtp.wait_maildir("bob@example.net", 1, timeout=10)[0]


def test_dovecot_stops_by_pid(tmp_path: Path) -> None:
    dv = DovecotLmtp(tmp_path / "dv").start()
    master = dv.pid
    kids = procs.descendants(master)
    dv.stop()
    assert not procs.pid_alive(master)
    procs.wait_until(lambda: not any(procs.pid_alive(k, st) for k, st in kids), 10,
                     "dovecot children gone")
    assert not procs.port_in_use(dv.port)
