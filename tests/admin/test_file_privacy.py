"""Issue 11 items 15 and 16: file modes, the DKIM key rewrite, and remote text on the operator's terminal.

Against a running ``twistd -n exmta`` started with umask 022 from an old
install's 0755 directories: queued content, the tracking log and
``exmta queue export -o`` output are not readable by others, and the data,
log and pickup directories lose their "other" bits. A next hop whose
reply carries terminal escapes: the tracking log stores it escaped and
``exmta track`` / ``exmta queue`` print no raw control character.
``exmta dkim keygen --force`` writes a new file: a reader holding the old
one keeps reading the old key.
"""
from __future__ import annotations

import json
import os
import smtplib
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from exmta.textsafe import escape_controls, escape_controls_json
from support import procs
from support.exmta_proc import REPO_ROOT, ExmtaProcess, exmta_toml
from support.sinks import SmtpSink

EVIL = "4.7.0 try later \x1b[2J\x1b]0;pwned\x07 \x9b31m red \u202egnp.exe"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cli(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.pop("EXMTA_ADMIN_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "exmta", *argv], capture_output=True, timeout=60, env=env,
                          preexec_fn=lambda: os.umask(0o022))


@pytest.mark.integration
def test_private_modes_and_escaped_remote_text(tmp_path: Path) -> None:
    sink = SmtpSink(data_policy=lambda got: "451 " + EVIL).start()
    extra = '[admin]\nlisten = ["tcp:{admin_port}:interface=127.0.0.1"]\n'
    ex = ExmtaProcess(tmp_path / "ex", toml=exmta_toml(smarthost=sink.next_hop, retry="1h", extra=extra),
                      subst={"admin_port": procs.free_port()})
    for d in (ex.data_dir, ex.data_dir / "pickup", ex.data_dir / "log"):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)  # as an older version left them
    old = os.umask(0o022)
    try:
        ex.start()
    finally:
        os.umask(old)
    try:
        with smtplib.SMTP(procs.LOOPBACK, ex.port, timeout=10) as c:
            c.sendmail("alice@example.test", ["zed@example.net"], b"Subject: private\r\n\r\nsecret body\r\n")
        tracking = ex.data_dir / "log" / "tracking.jsonl"
        procs.wait_until(lambda: tracking.exists() and '"DEFER"' in tracking.read_text(), 30, "the DEFER event")

        content = [p for p in (ex.data_dir / "queue").rglob("*") if p.is_file() and b"secret body" in p.read_bytes()]
        assert content, "the queued content file"
        for p in content:
            assert mode(p) & 0o077 == 0, (p, oct(mode(p)))
        assert mode(tracking) & 0o007 == 0
        for d in (ex.data_dir, ex.data_dir / "pickup", ex.data_dir / "log"):
            assert mode(d) & 0o007 == 0, (d, oct(mode(d)))

        defer = [json.loads(x) for x in tracking.read_text().splitlines() if '"DEFER"' in x][0]
        assert "\x1b" not in defer["reply"] and "\x07" not in defer["reply"] and "\x9b" not in defer["reply"]
        assert "\\x1b[2J" in defer["reply"]

        shown = cli("track", "--log", str(tracking), "--event", "DEFER")
        assert shown.returncode == 0, shown.stderr
        for raw in (b"\x1b", b"\x07", "\x9b".encode(), "\u202e".encode()):
            assert raw not in shown.stdout
        assert b"\\x1b[2J" in shown.stdout

        qid = defer["queue_id"]
        listed = cli("queue", "show", qid, "-c", str(ex.config_path))
        assert listed.returncode == 0, listed.stderr
        assert b"\x1b" not in listed.stdout and b"try later" in listed.stdout
        out = tmp_path / "export.eml"
        exported = cli("queue", "export", qid, "-o", str(out), "-c", str(ex.config_path))
        assert exported.returncode == 0, exported.stderr
        assert b"secret body" in out.read_bytes() and mode(out) == 0o600
    finally:
        ex.stop()
        sink.stop()


def test_track_escapes_old_records(tmp_path: Path) -> None:
    """A record written before replies were escaped at receipt is escaped when printed."""
    log = tmp_path / "tracking.jsonl"
    log.write_text(json.dumps({"timestamp": 1.7e9, "event_id": "DEFER", "queue_id": "ABC", "reply": "451 " + EVIL,
                               "sender": "a\x1b[31m@example.test", "recipients": ["b@example.test"]}) + "\n")
    for fmt in ("table", "csv", "json"):
        shown = cli("track", "--log", str(log), "--format", fmt)
        assert shown.returncode == 0, shown.stderr
        assert b"\x1b" not in shown.stdout and b"\x07" not in shown.stdout and "\x9b".encode() not in shown.stdout
        assert shown.stdout.endswith(b"\n")
        if fmt == "json":
            assert json.loads(shown.stdout)["reply"] == "451 " + EVIL  # still JSON, the same value


def test_escape_controls() -> None:
    assert escape_controls("plain text, caf\u00e9 \u00fc") == "plain text, caf\u00e9 \u00fc"
    assert escape_controls("a\x1b[2Jb\x07\x9b\x7f\u202e") == "a\\x1b[2Jb\\x07\\x9b\\x7f\\u202e"
    assert escape_controls("line\nnext\r\n", keep="\n") == "line\nnext\\x0d\n"
    text = json.dumps({"r": "a\x1b\x9b\u202e"}, ensure_ascii=False) + "\n"
    assert escape_controls_json(text) == '{"r": "a\\u001b\\u009b\\u202e"}\n'
    assert json.loads(escape_controls_json(text)) == json.loads(text)


def test_dkim_keygen_force_writes_a_new_private_file(tmp_path: Path) -> None:
    key = tmp_path / "example.test.s1.pem"
    first = cli("dkim", "keygen", "--domain", "example.test", "--selector", "s1", "--out", str(key))
    assert first.returncode == 0, first.stderr
    old_key = key.read_bytes()
    key.chmod(0o644)  # as an older version, or an operator, left it
    with open(key, "rb") as reader:  # someone holding the old file open
        second = cli("dkim", "keygen", "--domain", "example.test", "--selector", "s1", "--out", str(key), "--force")
        assert second.returncode == 0, second.stderr
        assert reader.read() == old_key  # not the new private key
    assert key.read_bytes() != old_key and mode(key) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [key.name]  # no temporary file left behind
