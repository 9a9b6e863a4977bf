"""LMTPSendConnector: scripted peers (TCP and unix socket) and a real Dovecot LMTP."""
from __future__ import annotations

import io
import shutil
import socket
from pathlib import Path
from typing import Iterator

import pytest
import pytest_twisted

from exmta.config.schema import SendConnectorConfig
from exmta.model import DeliveryRequest, Envelope, Outcome, Recipient
from exmta.send.lmtp import LMTPSendConnector
from exmta.smtp.client import ClientTimeouts
from support.procs import ManagedProcess, free_port, make_traversable, wait_for_smtp, wait_until
from support.smtp_peers import ScriptedServer, Session

pytestmark = pytest.mark.integration

BODY = b"Subject: lmtp test\r\n\r\nline one\r\n.dotted\r\n"


def request(*rcpts: str) -> DeliveryRequest:
    rs = tuple(Recipient(r) for r in rcpts)
    return DeliveryRequest("Q", Envelope("s@example.org", list(rs), size=len(BODY)), rs,
                           lambda: io.BytesIO(BODY))


def connector(target: str) -> LMTPSendConnector:
    from twisted.internet import reactor
    cfg = SendConnectorConfig(name="mailbox", kind="lmtp", lmtp=target, connect_timeout=5.0)
    return LMTPSendConnector(cfg, reactor, reactor, "exmta.test", timeouts=ClientTimeouts.uniform(5.0))


def per_recipient(verb: str, session: Session) -> str | None:
    if verb != "EOD":
        return None
    accepted = [c for c in session.commands if c.startswith("RCPT") and "bad" not in c]
    return "\r\n".join("452 4.2.2 over quota" if "full" in c else "250 2.0.0 saved" for c in accepted)


def test_needs_target():
    from twisted.internet import reactor
    with pytest.raises(ValueError):
        LMTPSendConnector(SendConnectorConfig(name="x", kind="lmtp"), reactor, reactor, "h")


@pytest_twisted.inlineCallbacks
def test_lmtp_tcp_per_recipient_results():
    from twisted.internet import reactor
    server = ScriptedServer(replies={"RCPT": None}, responder=lambda v, s: (
        per_recipient(v, s) or ("550 5.1.1 unknown" if v == "RCPT" and "bad" in s.commands[-1]
                                else "250 2.1.5 ok" if v == "RCPT" else None)))
    port = server.listen(reactor)
    try:
        conn = connector(f"127.0.0.1:{port}")
        results = yield conn.deliver(request("a@example.test", "bad@example.test", "full@example.test"))
        yield conn.close()
    finally:
        yield server.stop()
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.FAILED, Outcome.DEFERRED]
    assert results[2].reply.status == "4.2.2"
    [session] = server.sessions
    assert session.commands[0] == "LHLO exmta.test"
    assert session.data == BODY.replace(b"\r\n.", b"\r\n..")


@pytest_twisted.inlineCallbacks
def test_lmtp_unix_socket(tmp_path):
    from twisted.internet import reactor
    server = ScriptedServer(responder=per_recipient)
    path = server.listen_unix(reactor, str(tmp_path / "lmtp.sock"))
    try:
        conn = connector(f"unix:{path}")
        results = yield conn.deliver(request("a@example.test", "b@example.test"))
        yield conn.close()
    finally:
        yield server.stop()
    assert {r.outcome for r in results} == {Outcome.DELIVERED}
    assert results[0].remote_host == f"unix:{path}"


# ---------------------------------------------------------------- real Dovecot


DOVECOT_CONF = """\
base_dir = {d}/run
state_dir = {d}/state
log_path = /dev/stderr
protocols = lmtp
listen = 127.0.0.1
ssl = no
mail_location = maildir:~/Maildir
first_valid_uid = 1
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = passwd-file
  args = {d}/users
  default_fields = uid=nobody gid=nogroup
}}
"""


class Dovecot:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.proc: ManagedProcess | None = None

    def start(self) -> "Dovecot":
        d = self.dir
        for sub in ("run", "state", "home"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "home").chmod(0o1777)
        make_traversable(d)
        (d / "users").write_text(f"alice@example.test:::::{d}/home/alice::\n")
        (d / "dovecot.conf").write_text(DOVECOT_CONF.format(d=d, port=self.port))
        self.proc = ManagedProcess([shutil.which("dovecot") or "/usr/sbin/dovecot", "-F", "-c",
                                    str(d / "dovecot.conf")], log_path=d / "dovecot.log",
                                   name="dovecot", stop_timeout=5.0).start()
        wait_for_smtp(self.port, timeout=10.0, proc=self.proc.proc)
        # ready means the userdb answers too (the auth process starts after the listener)
        wait_until(self._rcpt_ok, 10.0, "dovecot userdb lookup", interval=0.05, proc=self.proc.proc)
        return self

    def _rcpt_ok(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as sock:
            f = sock.makefile("rwb")

            def reply() -> bytes:
                line = f.readline()
                while line[3:4] == b"-":
                    line = f.readline()
                return line

            reply()
            for command in (b"LHLO probe", b"MAIL FROM:<>", b"RCPT TO:<alice@example.test>"):
                f.write(command + b"\r\n")
                f.flush()
                last = reply()
            f.write(b"QUIT\r\n")
            f.flush()
            return last.startswith(b"250")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def maildir_new(self, user: str) -> list[Path]:
        return sorted((self.dir / "home" / user / "Maildir" / "new").glob("*"))


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    if shutil.which("dovecot") is None:
        pytest.fail("dovecot is not installed (run scripts/install-test-deps.sh)")
    server = Dovecot(tmp_path / "dovecot").start()
    try:
        yield server
    finally:
        server.stop()


@pytest_twisted.inlineCallbacks
def test_dovecot_lmtp_delivers_to_maildir(dovecot):
    conn = connector(f"127.0.0.1:{dovecot.port}")
    results = yield conn.deliver(request("alice@example.test", "bob@example.test"))
    yield conn.close()
    alice, bob = results
    assert alice.outcome is Outcome.DELIVERED and "Saved" in alice.reply.text, dovecot.proc.log_tail()
    assert bob.outcome is Outcome.FAILED and bob.reply.status == "5.1.1"
    [stored] = dovecot.maildir_new("alice")
    data = stored.read_bytes().replace(b"\n", b"\r\n")
    assert data.endswith(BODY)  # Dovecot adds Return-Path/Delivered-To above; BDAT, so no stuffing
