"""Receive workers are real processes: a per-IP rate limit holds for the node, not per worker, and workers
run against the PostgreSQL queue too.

Which worker accepts a connection is the kernel's choice; the tests make it
deterministic by stopping (SIGSTOP) the other worker while a client sends.
"""
from __future__ import annotations

import os
import signal
import smtplib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support.exmta_proc import ExmtaProcess, clean_exit, exmta_toml
from support.procs import descendants, wait_until
from support.sinks import SmtpSink

LIMIT = 4


def _send(port: int, count: int, tag: str) -> list[int]:
    """``count`` messages, one connection each: the final reply code of each (250, or the 4xx at MAIL)."""
    codes = []
    for i in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            try:
                client.sendmail("app@lan.test", ["x@dest.test"], f"Subject: {tag}-{i}\r\n\r\nbody\r\n".encode())
                codes.append(250)
            except smtplib.SMTPSenderRefused as e:
                codes.append(e.smtp_code)
    return codes


def _workers(exmta: ExmtaProcess, count: int) -> list[int]:
    """The worker pids, once every worker said it is ready."""
    wait_until(lambda: exmta.log_text().count("receive worker ready") >= count, timeout=60,
               what=f"{count} receive workers ready")
    pids = [pid for pid, _ in descendants(exmta.pid)]
    assert len(pids) == count, pids
    return pids


@contextmanager
def _only(running: int, workers: list[int]) -> Iterator[None]:
    """Every worker but ``running`` stopped (SIGSTOP), so that it takes the next connections."""
    stopped = [pid for pid in workers if pid != running]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


def test_a_per_ip_message_limit_holds_across_two_workers(tmp_path: Path, smtp_sink: SmtpSink) -> None:
    toml = exmta_toml(smarthost=smtp_sink.next_hop, receive_workers=2,
                      receive_extra=f"messages_per_minute_per_ip = {LIMIT}")
    with ExmtaProcess(tmp_path, toml, start_timeout=60) as exmta:
        a, b = _workers(exmta, 2)
        with _only(a, [a, b]):
            first = _send(exmta.port, 2, "a")
        with _only(b, [a, b]):
            second = _send(exmta.port, 3, "b")  # per worker, b would have a fresh quota of LIMIT
        third = _send(exmta.port, 2, "any")
        assert first == [250, 250]
        assert second == [250, 250, 450]
        assert third == [450, 450]
        got = smtp_sink.wait_for(LIMIT, timeout=30)
        assert len(got) == LIMIT
        log = exmta.log_text()
        assert "worker[0]" in log and "worker[1]" in log
        assert "rate limit: too much mail from 127.0.0.1 (limit 4 messages per minute)" in log
        assert exmta.error_lines() == []
        # the workers were answered on their stdin: the stop still ends them and the main process cleanly
        assert clean_exit(exmta.stop())


def test_sessions_per_ip_are_limited_for_the_node_not_per_worker(tmp_path: Path) -> None:
    toml = exmta_toml(receive_workers=2, receive_extra="max_connections_per_ip = 2")
    clients: list[smtplib.SMTP] = []
    with ExmtaProcess(tmp_path, toml, start_timeout=60) as exmta:
        a, b = _workers(exmta, 2)
        try:
            with _only(a, [a, b]):
                clients.append(smtplib.SMTP("127.0.0.1", exmta.port, timeout=20))  # held open by worker a
            with _only(b, [a, b]):
                clients.append(smtplib.SMTP("127.0.0.1", exmta.port, timeout=20))  # b's first, the node's second
                try:
                    third = smtplib.SMTP("127.0.0.1", exmta.port, timeout=20)
                except smtplib.SMTPConnectError as e:
                    refused = (e.smtp_code, e.smtp_error.decode())
                else:
                    third.close()
                    refused = (220, "admitted")
            assert refused[0] == 421 and "Too many connections from 127.0.0.1 (limit 2)" in refused[1]
            clients.pop().quit()  # one session ends: the node admits the next one again
            wait_until(lambda: _banner(exmta.port) == 220, timeout=30, what="a session to be admitted again")
        finally:
            for client in clients:
                client.close()
        assert exmta.error_lines() == []


def _banner(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        return client.noop()[0] and 220


def test_receive_workers_on_the_postgresql_queue(tmp_path: Path, pg_dsn: str, smtp_sink: SmtpSink) -> None:
    """Two workers commit into PostgreSQL, the main process delivers; the limit is the cluster's
    (exmta.receive.sharedrates): a worker sees what the other counted once its exchange ran (1 s)."""
    import psycopg

    extra = (f'store = "postgres"\n\n[postgres]\ndsn = "{pg_dsn}"\nnode = "mx1"\npoll_interval = "0.5s"\n')
    toml = exmta_toml(smarthost=smtp_sink.next_hop, receive_workers=2, extra=extra,
                      receive_extra=f"messages_per_minute_per_ip = {LIMIT}")

    def counted() -> int:
        with psycopg.connect(pg_dsn) as conn:
            row = conn.execute("SELECT coalesce(sum(count), 0) FROM exmta_rate WHERE name = %s",
                               ("default/messages_per_ip",)).fetchone()
        return int(row[0]) if row else 0

    with ExmtaProcess(tmp_path, toml, start_timeout=60) as exmta:
        a, b = _workers(exmta, 2)
        with _only(a, [a, b]):
            first = _send(exmta.port, 3, "a")
        wait_until(lambda: counted() >= 3, timeout=30, what="worker a's counts in exmta_rate")
        with _only(b, [a, b]):
            # b learns a's counts at its next exchange (once a second): poll for its first refusal
            second: list[int] = []
            wait_until(lambda: (second.extend(_send(exmta.port, 1, "b")) or second[-1] == 450), timeout=30,
                       what="worker b to refuse past the limit")
        assert first == [250, 250, 250]
        assert second.count(250) <= LIMIT and second[-1] == 450  # b's exchange may lag a second behind
        accepted = 3 + second.count(250)
        got = smtp_sink.wait_for(accepted, timeout=60)
        assert sorted(r.message()["Subject"] for r in got)[:3] == ["a-0", "a-1", "a-2"]
        with psycopg.connect(pg_dsn) as conn:
            wait_until(lambda: conn.execute("SELECT count(*) FROM exmta_message").fetchone()[0] == 0,
                       timeout=60, what="the delivered messages to leave the PostgreSQL queue")
            wait_until(lambda: conn.execute("SELECT count(*) FROM exmta_tracking WHERE node = 'mx1'"
                                            " AND event_id = 'RECEIVE'").fetchone()[0] == accepted,
                       timeout=30, what="the workers' RECEIVE events in the cluster's table (written in batches)")
        assert "worker[0]" in exmta.log_text() or "worker[1]" in exmta.log_text()
        assert exmta.error_lines() == []
