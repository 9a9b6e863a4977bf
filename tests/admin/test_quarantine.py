"""``exmta quarantine`` against a running ``twistd -n exmta`` whose receive connector has the attachments
filter with ``action = "quarantine"``: list (filtered), show, export, release (delivered, tracked), delete,
expiry."""
from __future__ import annotations

import email
import json
import smtplib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import procs
from support.exmta_proc import ExmtaProcess, exmta_toml
from support.sinks import SmtpSink
from tests.admin.test_commands import events_of, run, tracking
from tests.malware.corpus import EXE, docm, message

pytestmark = pytest.mark.integration

EXTRA = """
[admin]
listen = ["tcp:{admin_port}:interface=127.0.0.1"]
quarantine_expiry = "30d"

[filters.attachments_in]
plugin = "attachments"
action = "quarantine"
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ExmtaProcess, SmtpSink]]:
    with SmtpSink() as sink:
        toml = exmta_toml(smarthost=sink.next_hop, retry="1h", receive_extra='filters = ["attachments_in"]',
                          extra=EXTRA)
        ex = ExmtaProcess(tmp_path / "ex", toml=toml, subst={"admin_port": procs.free_port()})
        ex.start()
        try:
            procs.wait_until(lambda: (ex.data_dir / "admin.token").exists(), 10, "admin token")
            procs.wait_for_port(int(ex.subst["admin_port"]), timeout=10)
            yield ex, sink
        finally:
            ex.stop()
        assert ex.error_lines() == [], ex.log_text()[-4000:]


def send(ex: ExmtaProcess, sender: str, rcpt: str, raw: bytes, message_id: str) -> str:
    raw = raw.replace(b"<corpus@example.test>", f"<{message_id}>".encode())
    with smtplib.SMTP(procs.LOOPBACK, ex.port, timeout=30) as c:
        c.sendmail(sender, [rcpt], raw)
    procs.wait_until(lambda: any(e.get("message_id") == f"<{message_id}>" for e in tracking(ex)), 15, "RECEIVE")
    return next(e["queue_id"] for e in tracking(ex) if e.get("message_id") == f"<{message_id}>")


def api(ex: ExmtaProcess, method: str, path: str) -> dict:
    token = (ex.data_dir / "admin.token").read_text().strip()
    req = urllib.request.Request(f"http://127.0.0.1:{ex.subst['admin_port']}/api/{path}", method=method,
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_quarantine_commands(server: tuple[ExmtaProcess, SmtpSink], tmp_path: Path) -> None:
    ex, sink = server
    q1 = send(ex, "alice@example.org", "one@example.net",
              message([("invoice.pdf.exe", EXE, "application/pdf")]), "q1@example.org")
    q2 = send(ex, "bob@example.org", "two@example.net",
              message([("report.docx", docm(), "application/octet-stream")]), "q2@example.org")

    listed = json.loads(run(ex, "quarantine", "list", "--json").stdout)["messages"]
    assert {m["queue_id"] for m in listed} == {q1, q2}
    r = run(ex, "quarantine", "list")
    assert r.returncode == 0 and "REASON" in r.stdout and q1 in r.stdout and q2 in r.stdout
    by_reason = json.loads(run(ex, "quarantine", "list", "--json", "--reason", "MACRO").stdout)["messages"]
    assert [m["queue_id"] for m in by_reason] == [q2]
    by_sender = json.loads(run(ex, "quarantine", "list", "--json", "--sender", "alice@").stdout)["messages"]
    assert [m["queue_id"] for m in by_sender] == [q1]
    by_rcpt = json.loads(run(ex, "quarantine", "list", "--json", "--recipient", "two@").stdout)["messages"]
    assert [m["queue_id"] for m in by_rcpt] == [q2]
    assert json.loads(run(ex, "quarantine", "list", "--json", "--older-than", "1d").stdout)["messages"] == []
    assert len(json.loads(run(ex, "quarantine", "list", "--json", "--newer-than", "1h").stdout)["messages"]) == 2
    assert run(ex, "quarantine", "list", "--older-than", "soon").returncode == 2

    r = run(ex, "quarantine", "show", q1)
    assert r.returncode == 0 and "Reason:       attachment filter attachments_in: true-type: invoice.pdf.exe" \
        in r.stdout, r.stdout
    out = tmp_path / "q1.eml"
    assert run(ex, "quarantine", "export", q1, "-o", str(out)).returncode == 0
    exported = email.message_from_bytes(out.read_bytes())
    assert exported["X-Receiver"] == "<one@example.net>" and exported["Message-ID"] == "<q1@example.org>"

    r = run(ex, "quarantine", "release", q1)
    assert r.returncode == 0 and r.stdout == f"Message {q1} released to one@example.net.\n", r
    got = sink.wait_for_rcpts(["one@example.net"], timeout=30)
    assert got[0].rcpt_tos == ["one@example.net"]
    procs.wait_until(lambda: "SEND" in events_of(ex, q1), 15, "SEND after release")
    resubmit = [e for e in tracking(ex) if e.get("queue_id") == q1 and e["event_id"] == "RESUBMIT"]
    assert "true-type" in json.dumps(resubmit[0])
    assert run(ex, "quarantine", "show", q1).returncode == 1  # not in quarantine any more

    r = run(ex, "quarantine", "delete", q2)
    assert r.returncode == 0 and r.stdout == f"Message {q2} deleted.\n"
    assert events_of(ex, q2)[-1] == "DROP"
    assert run(ex, "quarantine", "list").stdout == "The quarantine is empty.\n"
    assert run(ex, "quarantine", "release", q2).returncode == 1
    assert [m.rcpt_tos for m in sink.messages] == [["one@example.net"]]  # q2 was never delivered

    # an operator's hold is not quarantine, and expiry leaves it alone
    q3 = send(ex, "carol@example.org", "three@example.net", message(), "q3@example.org")
    procs.wait_until(lambda: "SEND" in events_of(ex, q3), 15, "SEND of q3")
    assert api(ex, "POST", "quarantine/expire") == {"expired": []}


def test_quarantine_expiry(tmp_path: Path) -> None:
    with SmtpSink() as sink:
        toml = exmta_toml(smarthost=sink.next_hop, retry="1h", receive_extra='filters = ["attachments_in"]',
                          extra=EXTRA.replace('"30d"', '"1s"'))
        ex = ExmtaProcess(tmp_path / "ex", toml=toml, subst={"admin_port": procs.free_port()})
        ex.start()
        try:
            procs.wait_for_port(int(ex.subst["admin_port"]), timeout=10)
            q = send(ex, "alice@example.org", "one@example.net",
                     message([("run.exe", EXE, "application/octet-stream")]), "x1@example.org")
            expired: list[str] = []
            procs.wait_until(lambda: expired.extend(api(ex, "POST", "quarantine/expire")["expired"]) or expired,
                             15, "expiry")
            assert expired == [q] and events_of(ex, q)[-1] == "DROP"
            assert sink.messages == []
        finally:
            ex.stop()
        assert ex.error_lines() == [], ex.log_text()[-4000:]


def test_release_to_chosen_recipients(server: tuple[ExmtaProcess, SmtpSink]) -> None:
    """``release --to`` delivers to the chosen recipients only, and the tracking log says who released it
    to whom; a bad address is refused (exit 2) and leaves the message in quarantine."""
    ex, sink = server
    q = send(ex, "alice@example.org", "boss@example.net", message([("run.exe", EXE, "application/pdf")]),
             "to1@example.org")
    r = run(ex, "quarantine", "release", q, "--to", "not an address")
    assert r.returncode == 2 and "not a mail address" in r.stderr
    assert run(ex, "quarantine", "show", q).returncode == 0  # still held
    r = run(ex, "quarantine", "release", q, "--to", "analyst@example.net, soc@example.net")
    assert r.returncode == 0 and r.stdout == f"Message {q} released to analyst@example.net, soc@example.net.\n"
    sink.wait_for_rcpts(["analyst@example.net", "soc@example.net"], timeout=30)
    assert sorted(a for m in sink.messages for a in m.rcpt_tos) == ["analyst@example.net", "soc@example.net"]
    procs.wait_until(lambda: "SEND" in events_of(ex, q), 15, "SEND after release")
    [resubmit] = [e for e in tracking(ex) if e.get("queue_id") == q and e["event_id"] == "RESUBMIT"]
    text = json.dumps(resubmit)
    assert "true-type" in text and "analyst@example.net" in text and "boss@example.net" in text
    details = resubmit.get("details", resubmit)
    assert details["released_to"] == ["analyst@example.net", "soc@example.net"]
    assert details["original_recipients"] == ["boss@example.net"]
    assert "(from 127.0.0.1)" in details["released_by"]
