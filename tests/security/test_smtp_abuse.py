"""Issue 11 items 1, 7 and 12 performed against ``twistd -n exmta`` on loopback.

Each test sends what the review sent and checks the refusal that stops it;
before the fixes the header floods got ``250`` (after seconds of reactor time)
and the RCPT flood was never disconnected.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from exmta.auth.users import PasswordHasher, UserRecord, UsersFile
from support import procs
from support.exmta_proc import ExmtaProcess, exmta_toml

pytestmark = pytest.mark.integration

PASSWORD = "Abuse t3st pass"


def _reply(s: socket.socket) -> tuple[int, list[str]]:
    return procs.read_smtp_reply(s, timeout=60)


def _session(port: int) -> socket.socket:
    s = socket.create_connection((procs.LOOPBACK, port), timeout=60)
    assert _reply(s)[0] == 220
    s.sendall(b"EHLO client.example.test\r\n")
    assert _reply(s)[0] == 250
    return s


def _send_message(s: socket.socket, rcpt: str, message: bytes, sender: str = "x@example.net") -> tuple[int, list[str]]:
    s.sendall(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
    assert _reply(s)[0] == 250
    assert _reply(s)[0] == 250
    assert _reply(s)[0] == 354
    s.sendall(message + b".\r\n")
    return _reply(s)


def _continuation_flood() -> bytes:
    """The review's message: a 1 MiB header block of 349k empty continuation lines."""
    return b"Subject: x\r\n" + b" \r\n" * 349_000 + b"\r\nbody\r\n"


def test_continuation_line_flood_is_refused_and_other_sessions_are_served(exmta_factory) -> None:
    ex: ExmtaProcess = exmta_factory(toml=exmta_toml())
    other = _session(ex.port)
    with _session(ex.port) as s:
        code, text = _send_message(s, "alice@example.test", _continuation_flood())
        assert (code, text[0].split()[0]) == (552, "5.3.4"), (code, text)
        # the session goes on: the next message is accepted
        code, _ = _send_message(s, "alice@example.test", b"Subject: ok\r\n\r\nok\r\n")
        assert code == 250
    other.sendall(b"NOOP\r\n")
    assert _reply(other)[0] == 250
    other.close()
    assert "header block of" in ex.log_text()


def test_one_oversized_field_is_refused(exmta_factory) -> None:
    ex: ExmtaProcess = exmta_factory(toml=exmta_toml(receive_extra='max_header_field = "8KiB"'))
    field = b"References:" + b"".join(b" <%08d@example.test>\r\n" % i for i in range(500))  # ~12 KiB
    with _session(ex.port) as s:
        code, text = _send_message(s, "alice@example.test", b"Subject: x\r\n" + field + b"\r\nbody\r\n")
        assert (code, text[0].split()[0]) == (552, "5.3.4")
        code, _ = _send_message(s, "alice@example.test", b"Subject: x\r\n" + field[:4000] + b"\r\n\r\nbody\r\n")
        assert code == 250


def _padding(octets: int) -> bytes:
    line = b"X-Padding: " + b"a" * 86 + b"\r\n"  # 99 octets
    return line * (octets // len(line) + 1)


def test_firewalled_headers_after_padding_are_refused_not_passed(exmta_factory) -> None:
    # the review hid X-MS-Exchange-Organization-SCL after 1.07 MiB of padding, past what the firewall read
    ex: ExmtaProcess = exmta_factory(toml=exmta_toml(relay_networks=()))
    message = (b"Subject: x\r\n" + _padding(1_120_000) + b"X-MS-Exchange-Organization-SCL: -1\r\n"
               b"\r\nbody\r\n")
    with _session(ex.port) as s:
        code, text = _send_message(s, "alice@example.test", message)
        assert (code, text[0].split()[0]) == (552, "5.3.4"), (code, text)
    assert ex.maildir_messages("alice@example.test") == []


@pytest.fixture
def submission(tmp_path: Path, exmta_factory) -> ExmtaProcess:
    users = tmp_path / "users.jsonl"
    UsersFile(str(users)).write({"alice": UserRecord("alice", PasswordHasher().hash(PASSWORD), ["*@example.test"])})
    return exmta_factory(toml=exmta_toml(relay_networks=(), receive_extra=(
        'auth = ["PLAIN"]\n'
        f'auth_backend = "{users}"\n'
        'auth_before_tls_networks = ["127.0.0.0/8"]\n')))


def _login(port: int) -> socket.socket:
    import base64

    s = _session(port)
    s.sendall(b"AUTH PLAIN " + base64.b64encode(f"\0alice\0{PASSWORD}".encode()) + b"\r\n")
    assert _reply(s)[0] == 235
    return s


def test_send_as_sees_a_from_hidden_after_padding_and_a_missing_from(submission: ExmtaProcess) -> None:
    with _login(submission.port) as s:
        hidden = b"Subject: x\r\n" + _padding(1_120_000) + b"From: ceo@contoso.example\r\n\r\nbody\r\n"
        code, text = _send_message(s, "bob@example.test", hidden, sender="alice@example.test")
        assert (code, text[0].split()[0]) == (552, "5.3.4"), (code, text)
        code, text = _send_message(s, "bob@example.test", b"Subject: no from\r\n\r\nbody\r\n",
                                   sender="alice@example.test")
        assert (code, text[0].split()[0]) == (550, "5.7.60"), (code, text)
        code, _ = _send_message(s, "bob@example.test", b"From: alice@example.test\r\n\r\nbody\r\n",
                                sender="alice@example.test")
        assert code == 250
    procs.wait_until(lambda: len(submission.maildir_messages("bob@example.test")) == 1, 30, "one delivery")


def _tracking_events(ex: ExmtaProcess) -> list[dict]:
    path = ex.data_dir / "log" / "tracking.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_relay_denied_rcpt_flood_is_tarpitted_then_disconnected(exmta_factory) -> None:
    # the review sent 50,000 relay-denied RCPTs in one session and was never disconnected
    ex: ExmtaProcess = exmta_factory(toml=exmta_toml(relay_networks=(), receive_extra=(
        'refused_recipients_tarpit = "0.05s"\n')))
    with _session(ex.port) as s:
        s.sendall(b"MAIL FROM:<x@example.net>\r\n")
        assert _reply(s)[0] == 250
        codes: list[int] = []
        for batch in range(50):  # up to 50,000 RCPTs, 1,000 per write
            try:
                s.sendall(b"".join(b"RCPT TO:<u%d@victim.example>\r\n" % (batch * 1000 + i) for i in range(1000)))
            except OSError:
                break  # closed by the server
            for _ in range(1000):
                codes.append(_reply(s)[0])
                if codes[-1] == 421:
                    break
            if codes[-1] == 421:
                break
    assert codes == [554] * 20 + [421], codes[:30]
    procs.wait_until(lambda: "20 refused recipient(s)" in ex.log_text(), 30, "the session's summary line")
    rejects = lambda: [e for e in _tracking_events(ex) if e.get("event_id") == "REJECT"]  # noqa: E731
    procs.wait_until(lambda: len(rejects()) >= 10, 30, "the tracked refusals")
    ex.stop()  # flushes the tracking log: nothing more than the first ten
    assert len(rejects()) == 10
