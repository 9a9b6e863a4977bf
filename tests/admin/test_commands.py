"""Every ``exmta queue`` and ``exmta track`` command against a running ``twistd -n exmta``.

The next hop is an aiosmtpd sink whose answers the test switches (451 or
250), so messages sit in the queue until a command moves them.
"""
from __future__ import annotations

import http.client
import json
import os
import smtplib
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support import procs
from support.exmta_proc import REPO_ROOT, ExmtaProcess, exmta_toml
from support.sinks import SmtpSink

pytestmark = pytest.mark.integration

ADMIN = '[admin]\nlisten = ["tcp:{admin_port}:interface=127.0.0.1"]\n'


class Switch:
    """The sink's answer to DATA: None accepts, a reply line refuses."""

    def __init__(self, reply: str | None) -> None:
        self.reply = reply
        self.lock = threading.Lock()

    def __call__(self, got: Any) -> str | None:
        with self.lock:
            return self.reply


def run(ex: ExmtaProcess, *argv: str, config: bool = True, env: dict[str, str] | None = None,
        input_bytes: bool = False) -> subprocess.CompletedProcess:
    """``exmta ARGV -c CONFIG`` with the tests' interpreter; returns the finished process."""
    full = [sys.executable, "-m", "exmta", *argv]
    if config:
        full += ["-c", str(ex.config_path)]
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO_ROOT)
    e.pop("EXMTA_ADMIN_TOKEN", None)
    e.update(env or {})
    return subprocess.run(full, capture_output=True, timeout=60, env=e, cwd=ex.workdir, text=not input_bytes)


def tracking(ex: ExmtaProcess) -> list[dict[str, Any]]:
    path = ex.data_dir / "log" / "tracking.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def events_of(ex: ExmtaProcess, queue_id: str) -> list[str]:
    return [e["event_id"] for e in tracking(ex) if e.get("queue_id") == queue_id]


def send(ex: ExmtaProcess, rcpt: str, message_id: str, sender: str = "alice@example.org") -> str:
    with smtplib.SMTP(procs.LOOPBACK, ex.port, timeout=10) as c:
        c.sendmail(sender, [rcpt],
                   f"Subject: test {message_id}\r\nMessage-ID: <{message_id}>\r\n\r\nhello\r\n".encode())
    procs.wait_until(lambda: any(e.get("message_id") == f"<{message_id}>" for e in tracking(ex)), 10,
                     f"RECEIVE of {message_id}")
    return next(e["queue_id"] for e in tracking(ex) if e.get("message_id") == f"<{message_id}>")


@pytest.fixture(params=["spool", "postgres"])
def queue_extra(request: pytest.FixtureRequest) -> str:
    """The operator commands run against each store: the spool and the PostgreSQL queue."""
    if request.param == "spool":
        return ""
    dsn = request.getfixturevalue("pg_dsn")
    return f'store = "postgres"\n\n[postgres]\ndsn = "{dsn}"\n\n'


@pytest.fixture
def server(tmp_path: Path, queue_extra: str) -> Iterator[tuple[ExmtaProcess, SmtpSink, Switch]]:
    switch = Switch("451 4.3.0 try again later")
    with SmtpSink(data_policy=switch) as sink:
        toml = exmta_toml(smarthost=sink.next_hop, retry="1h", receive_extra='protocol_log = "verbose"',
                          extra=queue_extra + ADMIN)
        toml = toml.replace('tls = "none"', 'tls = "none"\nprotocol_log = "verbose"')
        ex = ExmtaProcess(tmp_path / "ex", toml=toml, subst={"admin_port": procs.free_port()})
        ex.start()
        try:
            procs.wait_until(lambda: (ex.data_dir / "admin.token").exists(), 10, "admin token")
            procs.wait_for_port(int(ex.subst["admin_port"]), timeout=10)  # the token is written before listening
            yield ex, sink, switch
        finally:
            ex.stop()
        assert ex.error_lines() == [], ex.log_text()[-4000:]


def listed(ex: ExmtaProcess) -> list[list[str]]:
    """`exmta queue messages` without the columns that change with time (queue id and state)."""
    return [line.split()[:2] for line in run(ex, "queue", "messages").stdout.splitlines()]


def admin_port(ex: ExmtaProcess) -> int:
    return int(ex.subst["admin_port"])


def test_deferred_then_delivered_history(server: tuple[ExmtaProcess, SmtpSink, Switch]) -> None:
    """451 first, then 250 after `exmta queue retry`: list, show, export, retry and track on one message."""
    ex, sink, switch = server
    qid = send(ex, "bob@example.net", "dtd-1@example.org")
    procs.wait_until(lambda: "DEFER" in events_of(ex, qid), 15, "DEFER")

    listed = run(ex, "queue", "list")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()[:2]
    assert header.split()[:3] == ["QUEUE", "STATUS", "MESSAGES"]
    assert row.split()[:3] == ["relay", "retry", "1"] and "451 4.3.0 try again later" in row
    as_json = json.loads(run(ex, "queue", "list", "--json").stdout)["queues"][0]
    assert as_json["messages"] == 1 and as_json["oldest_queue_id"] == qid and as_json["oldest_age"] >= 0

    messages = run(ex, "queue", "messages", "--queue", "relay")
    assert messages.returncode == 0 and qid in messages.stdout and "deferred" in messages.stdout
    shown = run(ex, "queue", "show", qid)
    assert shown.returncode == 0, shown.stderr
    assert f"Queue id:     {qid}" in shown.stdout and "Subject:      test dtd-1@example.org" in shown.stdout
    assert "bob@example.net  pending  attempts=1  last: 451 4.3.0 try again later" in shown.stdout

    out = ex.workdir / f"{qid}.eml"
    exported = run(ex, "queue", "export", qid, "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    eml = out.read_bytes()
    assert eml.startswith(b"X-Sender: <alice@example.org>\r\nX-Receiver: <bob@example.net>\r\n")
    assert b"Message-ID: <dtd-1@example.org>" in eml and eml.endswith(b"hello\r\n")

    switch.reply = None
    retried = run(ex, "queue", "retry", "relay")
    assert retried.returncode == 0 and retried.stdout == "1 message(s) in relay are due now.\n", retried
    (got,) = sink.wait_for(1, timeout=30)
    assert got.rcpt_tos == ["bob@example.net"]
    procs.wait_until(lambda: "SEND" in events_of(ex, qid), 10, "SEND")
    assert run(ex, "queue", "list").stdout == "The queue is empty.\n"

    def tracked_send() -> bool:  # the PostgreSQL store's table gets events in batches, once a second
        return "SEND" in run(ex, "track", "--message-id", "dtd-1@example.org").stdout.split()

    procs.wait_until(tracked_send, 15, "SEND in exmta track")
    history = run(ex, "track", "--message-id", "dtd-1@example.org")
    assert history.returncode == 0, history.stderr
    print(history.stdout)  # the report shows this history
    (ex.workdir.parent / "history.txt").write_text(history.stdout)
    lines = history.stdout.splitlines()
    assert lines[0].split() == ["TIME", "EVENT", "QUEUE_ID", "SOURCE", "CONNECTOR", "SENDER", "RECIPIENTS", "REPLY"]
    assert [line.split()[2] for line in lines[1:]] == ["RECEIVE", "DEFER", "SEND"]
    assert all(qid in line for line in lines[1:])
    assert "451 4.3.0 try again later" in lines[2] and "250" in lines[3] and "latency=" in lines[3]
    times = [line.split()[0] + line.split()[1] for line in lines[1:]]
    assert times == sorted(times)

    as_csv = run(ex, "track", "--queue-id", qid, "--format", "csv").stdout.splitlines()
    assert as_csv[0].startswith("timestamp,event_id,queue_id,message_id") and len(as_csv) == 4
    records = [json.loads(x) for x in run(ex, "track", "--queue-id", qid, "--format", "json").stdout.splitlines()]
    assert [r["event_id"] for r in records] == ["RECEIVE", "DEFER", "SEND"]
    send_rec = records[2]
    assert send_rec["connector"] == "relay" and send_rec["remote_host"] and send_rec["latency"] >= 0
    assert send_rec["message_id"] == "<dtd-1@example.org>" and send_rec["size"] > 0
    assert records[0]["connector"] == "default" and records[0]["remote_host"] == "127.0.0.1"

    # search filters, as Get-MessageTrackingLog
    defer_only = run(ex, "track", "--recipient", "BOB@example.net", "--event", "DEFER", "--format", "json")
    assert [json.loads(x)["event_id"] for x in defer_only.stdout.splitlines()] == ["DEFER"]
    assert run(ex, "track", "--sender", "*@example.org", "--connector", "relay", "--start", "1h").returncode == 0
    assert run(ex, "track", "--sender", "nobody@example.org").returncode == 1
    assert run(ex, "track", "--end", "2000-01-01").returncode == 1

    # the protocol logs of both connectors have the session, without the message text
    plog = ex.data_dir / "log" / "protocol"
    receive = [json.loads(x) for x in (plog / "receive-default.jsonl").read_text().splitlines()]
    assert any(r["event"] == "command" and r["line"].upper().startswith("MAIL FROM:<ALICE@EXAMPLE.ORG>") for r in receive)
    assert any(r["event"] == "data" for r in receive)
    sent = (plog / "send-relay.jsonl").read_text()
    assert "RCPT TO:<bob@example.net>" in sent and "hello" not in sent and "451 4.3.0" in sent


def test_suspend_resume_remove_and_redirect(server: tuple[ExmtaProcess, SmtpSink, Switch]) -> None:
    ex, sink, switch = server
    q1 = send(ex, "one@example.net", "m1@example.org")
    q2 = send(ex, "two@example.net", "m2@example.org")
    q3 = send(ex, "three@example.net", "m3@example.org")
    for q in (q1, q2, q3):
        procs.wait_until(lambda q=q: "DEFER" in events_of(ex, q), 15, f"DEFER of {q}")

    # a message: suspend (hold) and resume (tried again at once, 451 again)
    r = run(ex, "queue", "suspend", "--message", q1)
    assert r.returncode == 0 and r.stdout == f"Message {q1} suspended (held).\n", r
    queues = json.loads(run(ex, "queue", "list", "--json").stdout)["queues"]
    assert {q["queue"]: q["messages"] for q in queues} == {"relay": 2, "hold": 1}
    assert run(ex, "queue", "suspend", "--message", q1).returncode == 2  # already held: says so
    r = run(ex, "queue", "resume", "--message", q1)
    assert r.returncode == 0, r.stderr
    procs.wait_until(lambda: events_of(ex, q1).count("DEFER") == 2, 15, "second DEFER after resume")
    assert "RESUBMIT" in events_of(ex, q1)

    # remove without and with a non-delivery report
    r = run(ex, "queue", "remove", q1)
    assert r.returncode == 0 and r.stdout == f"Message {q1} removed without a report.\n"
    assert events_of(ex, q1)[-1] == "DROP"
    r = run(ex, "queue", "remove", q2, "--ndr")
    assert r.returncode == 0 and "removed with a non-delivery report" in r.stdout, r
    assert events_of(ex, q2)[-2:] == ["FAIL", "DSN"]
    ndr = json.loads(run(ex, "queue", "messages", "--json").stdout)["messages"]
    dsn = [m for m in ndr if m["sender"] == ""]
    assert len(dsn) == 1 and dsn[0]["recipients"] == ["alice@example.org"]
    assert run(ex, "queue", "show", q2).returncode == 1  # gone

    # a queue: suspend, resume (retried at once)
    r = run(ex, "queue", "suspend", "relay")
    assert r.returncode == 0 and r.stdout == "Queue relay suspended.\n"
    relay = next(q for q in json.loads(run(ex, "queue", "list", "--json").stdout)["queues"] if q["queue"] == "relay")
    assert relay["status"] == "suspended" and relay["suspended"]
    assert run(ex, "queue", "retry", "relay").returncode == 2  # suspended: resume first
    before = events_of(ex, q3).count("DEFER")
    r = run(ex, "queue", "resume", "relay")
    assert r.returncode == 0 and r.stdout.startswith("Queue relay resumed."), r
    procs.wait_until(lambda: events_of(ex, q3).count("DEFER") > before, 15, "attempt after resume")

    # drain: everything goes to another host, which accepts
    with SmtpSink() as other:
        r = run(ex, "queue", "redirect", other.next_hop)
        assert r.returncode == 0 and f"All queued mail now goes to {other.host}:{other.port}" in r.stdout, r
        got = other.wait_for_rcpts(["three@example.net", "alice@example.org"], timeout=30)
        assert sorted(r for m in got for r in m.rcpt_tos) == ["alice@example.org", "three@example.net"]
        procs.wait_until(lambda: "SEND" in events_of(ex, q3), 10, "SEND via the redirect")
        assert "REDIRECT" in events_of(ex, q3)
        assert run(ex, "queue", "redirect", "--stop").returncode == 0
    assert sink.messages == []  # nothing reached the original next hop
    assert run(ex, "queue", "list").stdout == "The queue is empty.\n"


def queue_files(ex: ExmtaProcess, *dirs: str) -> dict[str, bytes]:
    """``{dir/name: bytes}`` of the spool's messages and state: envelopes in the state directories,
    content in msg/, the files in the root (*dirs* to look elsewhere). tmp/ holds work in progress,
    never a message (exmta.queue.spool); the PostgreSQL store's local temp and cache files (postgres/)
    come and go with deliveries (its queue is the database, compared through `exmta queue messages`)."""
    root = ex.data_dir / "queue"
    out = {}
    for d in dirs or (".", "incoming", "active", "deferred", "hold", "corrupt", "msg"):
        if (root / d).is_dir():
            out.update({f"{d}/{p.name}": p.read_bytes() for p in (root / d).iterdir() if p.is_file()})
    return out


def test_bad_input_changes_nothing(server: tuple[ExmtaProcess, SmtpSink, Switch], tmp_path: Path,
                                   queue_extra: str) -> None:
    ex, sink, switch = server
    qid = send(ex, "keep@example.net", "keep@example.org")
    procs.wait_until(lambda: "DEFER" in events_of(ex, qid), 15, "DEFER")
    # the DEFER line is written before the store keeps the new state (the spool: a temp file in tmp/,
    # then renames into deferred/): wait for that to finish, so the snapshot is of a queue at rest
    deferred = ex.data_dir / "queue" / "deferred" / f"{qid}.json"

    def at_rest() -> bool:
        stored = (deferred.is_file() and not queue_files(ex, "tmp")) if queue_extra == "" else True
        return stored and [qid, "deferred"] in listed(ex)
    procs.wait_until(at_rest, 30, "the deferred message stored")
    before = queue_files(ex)
    listed_before = listed(ex)
    events_before = len(tracking(ex))

    cases: list[tuple[list[str], int, str]] = [
        (["queue", "show", "0123456789ABCDEF"], 1, "no message '0123456789ABCDEF'"),
        (["queue", "show", "../../etc/passwd"], 1, "no message"),
        (["queue", "remove", "FFFFFFFFFFFFFFFF", "--ndr"], 1, "no message"),
        (["queue", "export", "FFFFFFFFFFFFFFFF"], 1, "no message"),
        (["queue", "suspend", "--message", "FFFFFFFFFFFFFFFF"], 1, "no message"),
        (["queue", "retry", "nosuchconnector"], 1, "no queue 'nosuchconnector'"),
        (["queue", "suspend", "nosuch/queue"], 1, "no queue"),
        (["queue", "messages", "--queue", "nosuch"], 1, "no queue"),
        (["queue", "resume", "relay"], 2, "is not suspended"),
        (["queue", "redirect", "[bad"], 2, "bad target"),
        (["queue", "suspend"], 2, "give a QUEUE"),
        (["track", "--event", "DELIVERED"], 2, "unknown event 'DELIVERED'"),
        (["track", "--start", "yesterday-ish"], 2, "is not a time"),
        (["track", "--queue-id", "x;y"], 2, "is not a queue id"),
        (["track", "--start", "1h", "--end", "2h"], 2, "--start is after --end"),
    ]
    for argv, code, text in cases:
        r = run(ex, *argv)
        assert r.returncode == code and text in r.stderr, (argv, r.returncode, r.stderr)
        assert r.stdout == "", argv
    usage = run(ex, "queue", "frobnicate")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr

    # credentials: a wrong token, a missing token file, an unreachable server
    bad = tmp_path / "bad.token"
    bad.write_text("not-the-token\n")
    r = run(ex, "queue", "list", "--token-file", str(bad))
    assert r.returncode == 2 and "refused the admin token" in r.stderr
    r = run(ex, "queue", "list", "--token-file", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no admin token at" in r.stderr
    r = run(ex, "queue", "list", "--url", f"http://127.0.0.1:{procs.free_port()}")
    assert r.returncode == 3 and "cannot reach the admin API" in r.stderr
    r = run(ex, "queue", "list", "--data", str(tmp_path / "nodata"), config=False)
    assert r.returncode == 2 and "no admin token at" in r.stderr

    # a corrupt and a truncated tracking line: skipped with a warning, the rest still found
    log = ex.data_dir / "log" / "tracking.jsonl"
    good = log.read_text()
    rotated = log.with_name("tracking.jsonl.20260101T000000")
    rotated.write_text('{"event_id": "RECEIVE", "timestamp": 1, "queue_id": "OLD"}\nnot json at all\n'
                       '{"event_id": "SEND", "timest')
    # (--log: this node's file, also with the PostgreSQL queue, where `exmta track -c` reads the cluster's table)
    r = run(ex, "track", "--queue-id", qid, "--log", str(log))
    assert r.returncode == 0 and qid in r.stdout
    assert "tracking.jsonl.20260101T000000:2: skipped a corrupt or truncated line" in r.stderr
    assert "tracking.jsonl.20260101T000000:3: skipped" in r.stderr
    r = run(ex, "track", "--queue-id", "OLD", "--format", "json", "--log", str(log))
    assert r.returncode == 0 and json.loads(r.stdout)["queue_id"] == "OLD"  # rotated files are searched
    rotated.unlink()
    assert log.read_text().startswith(good)

    assert queue_files(ex) == before and len(tracking(ex)) == events_before
    assert listed(ex) == listed_before
    assert events_of(ex, qid) == ["RECEIVE", "DEFER"]


def http_call(ex: ExmtaProcess, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    conn = http.client.HTTPConnection(procs.LOOPBACK, admin_port(ex), timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, body, resp.headers
    finally:
        conn.close()


def test_admin_api_refuses_without_credentials(server: tuple[ExmtaProcess, SmtpSink, Switch]) -> None:
    ex, sink, switch = server
    token_file = ex.data_dir / "admin.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 40

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic Zm9vOmJhcg=="},
                    {"Authorization": f"Bearer {token}x"}, {"Authorization": token}):
        for method, path in (("GET", "/api/queues"), ("POST", "/api/queues/relay/suspend"),
                             ("POST", "/api/redirect?target=127.0.0.1:1"), ("GET", "/api")):
            status, body, hdrs = http_call(ex, method, path, headers)
            assert status == 401, (headers, path, status)
            assert json.loads(body)["error"] == "the admin API needs the admin token"
            assert 'Bearer realm="exmta"' in hdrs.get_all("www-authenticate")
    # nothing changed: the queue is not suspended and not redirected
    status, body, _ = http_call(ex, "GET", "/api/queues", {"Authorization": f"Bearer {token}"})
    assert status == 200 and json.loads(body)["queues"] == []
    import base64
    basic = base64.b64encode(f"admin:{token}".encode()).decode()
    assert http_call(ex, "GET", "/api/queues", {"Authorization": f"Basic {basic}"})[0] == 401  # Bearer only (CSRF)
    status, body, _ = http_call(ex, "GET", "/api/nosuch", {"Authorization": f"Bearer {token}"})
    assert status == 404 and "no such admin API call" in json.loads(body)["error"]


def test_admin_api_refuses_other_addresses(tmp_path: Path) -> None:
    """allowed_networks without loopback: every call from 127.0.0.1 gets 403, even with the token."""
    toml = exmta_toml(extra='[admin]\nlisten = ["tcp:{admin_port}:interface=127.0.0.1"]\n'
                            'allowed_networks = ["192.0.2.0/24"]\n')
    ex = ExmtaProcess(tmp_path / "ex", toml=toml, subst={"admin_port": procs.free_port()}).start()
    try:
        procs.wait_until(lambda: (ex.data_dir / "admin.token").exists(), 10, "admin token")
        procs.wait_for_port(admin_port(ex), timeout=10)
        token = (ex.data_dir / "admin.token").read_text().strip()
        for path in ("/api/queues", "/", "/anything"):
            status, body, _ = http_call(ex, "GET", path, {"Authorization": f"Bearer {token}"})
            assert status == 403 and "may not use the admin API" in json.loads(body)["error"], path
        r = run(ex, "queue", "list")
        assert r.returncode == 2 and "may not use the admin API" in r.stderr
    finally:
        ex.stop()


def test_unix_socket_admin_api(tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    toml = exmta_toml(extra=f'[admin]\nlisten = ["unix:{sock}"]\ntoken_file = "{tmp_path}/tok"\n')
    ex = ExmtaProcess(tmp_path / "ex", toml=toml).start()
    try:
        procs.wait_until(sock.exists, 10, "admin socket")
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "tok").stat().st_mode) == 0o600
        r = run(ex, "queue", "list")
        assert r.returncode == 0 and r.stdout == "The queue is empty.\n", r.stderr
    finally:
        ex.stop()
