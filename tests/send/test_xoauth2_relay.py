"""The XOAUTH2 relay end to end, with real parts on loopback.

An anonymous LAN device (by IP range) -> exmta -> STARTTLS + AUTH XOAUTH2 ->
Dovecot submission (checks the token by introspection at npm oidc-provider)
-> an aiosmtpd sink.  Between exmta and Dovecot a wiretap records every byte:
no token, no ``AUTH`` crosses the wire in clear.  Token refresh, a token the
server stops accepting, the endpoint down and back, a refused and a revoked
client, each against the real token endpoint.
"""
from __future__ import annotations

import json
import smtplib
from pathlib import Path
from typing import Any

import pytest

from support.procs import LOOPBACK, wait_until
from support.xoauth2_parts import MAILBOX, Parts

pytestmark = pytest.mark.integration

SENDER = "scanner@example.test"


@pytest.fixture
def parts(tmp_path: Path) -> Any:
    p = Parts(tmp_path)
    yield p
    p.stop()


def tracking(ex: Any) -> list[dict[str, Any]]:
    path = ex.data_dir / "log" / "tracking.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def send(ex: Any, subject: str, rcpt: str = "bob@fabrikam.test") -> None:
    """The LAN device: anonymous SMTP, no TLS, no AUTH, as printers do."""
    with smtplib.SMTP(LOOPBACK, ex.port, local_hostname="printer.lan", timeout=10) as c:
        c.sendmail(SENDER, [rcpt], f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nscan\r\n".encode())


@pytest.mark.parametrize("client", ["secret", "certificate"])
def test_lan_device_to_dovecot_over_xoauth2(parts: Parts, exmta_factory: Any, client: str) -> None:
    ex = parts.exmta(exmta_factory, client)
    for i in range(3):
        send(ex, f"scan {i}")
    got = parts.sink.wait_for(3, timeout=60)
    assert sorted(m.message()["Subject"] for m in got) == ["scan 0", "scan 1", "scan 2"]
    assert {m.mail_from for m in got} == {SENDER}
    # three sessions (max_messages_per_connection = 1), each logged in with XOAUTH2 over TLS, one token
    logins = [line for line in parts.dovecot.log_text().splitlines()
              if f"Login: user=<{MAILBOX}>, method=XOAUTH2" in line]
    assert len(logins) == 3 and all(", TLS," in line for line in logins)
    assert len(parts.oidc.issued()) == 1
    wait_until(lambda: sum(e["event_id"] == "SEND" for e in tracking(ex)) == 3, 20, "three SEND events")
    assert parts.metric("exmta_oauth2_token_requests_total", result="ok") == 1
    assert parts.metric("exmta_oauth2_token_cache_hits_total") >= 2
    parts.no_secret_anywhere(ex)


def test_token_renewed_before_expiry_and_after_the_server_refuses_it(tmp_path: Path, exmta_factory: Any) -> None:
    parts = Parts(tmp_path, ttl=20)  # renewed after 10 s, never sent in its last 5 s
    try:
        ex = parts.exmta(exmta_factory)
        send(ex, "first")
        parts.sink.wait_for(1, timeout=60)
        sent = 1

        def renewed() -> bool:
            nonlocal sent
            send(ex, f"more {sent}")
            sent += 1
            return len(parts.oidc.issued()) >= 2
        wait_until(renewed, 60, "a renewed token", interval=0.5)
        parts.sink.wait_for(sent, timeout=60)
        assert "Authentication failed" not in parts.dovecot.log_text()  # never sent an expired token

        # the provider restarts: every token it issued is gone, Dovecot's introspection says inactive
        before = len(parts.oidc.issued())
        parts.oidc.restart()
        send(ex, "after restart")
        got = parts.sink.wait_for(sent + 1, timeout=60)
        assert "after restart" in {m.message()["Subject"] for m in got}
        assert len(parts.oidc.issued()) == before + 1
        assert "refused by the server; fetching a new one" in ex.log_text()
        assert "Introspection" in parts.dovecot.log_text() or "Authentication failed" in parts.dovecot.log_text()
        parts.no_secret_anywhere(ex)
    finally:
        parts.stop()


def test_token_endpoint_down_defers_then_delivers(parts: Parts, exmta_factory: Any) -> None:
    parts.oidc.stop()
    ex = parts.exmta(exmta_factory)
    send(ex, "while down")

    def deferred() -> list[dict[str, Any]]:
        return [e for e in tracking(ex) if e["event_id"] == "DEFER"]
    wait_until(lambda: deferred(), 30, "a DEFER event")
    reply = deferred()[0]["reply"]
    assert reply.startswith("451 4.7.0 XOAUTH2 token not available: token endpoint "
                            f"{parts.oidc.token_url} unreachable"), reply
    assert parts.metric("exmta_oauth2_token_requests_total", result="unreachable") >= 1
    assert parts.metric("exmta_messages_deferred_total", connector="exo") >= 1
    assert parts.tap.sessions == []  # no token, no session with the next hop

    parts.oidc.start()
    (got,) = parts.sink.wait_for(1, timeout=60)
    assert got.message()["Subject"] == "while down"
    assert not [e for e in tracking(ex) if e["event_id"] in ("FAIL", "EXPIRE", "DSN")]
    parts.no_secret_anywhere(ex)


def test_refused_client_defers_with_the_reason(parts: Parts, exmta_factory: Any) -> None:
    ex = parts.exmta(exmta_factory, secret="not-the-secret")
    send(ex, "wrong secret")
    wait_until(lambda: any(e["event_id"] == "DEFER" for e in tracking(ex)), 30, "a DEFER event")
    (defer_event, *_) = [e for e in tracking(ex) if e["event_id"] == "DEFER"]
    assert defer_event["reply"] == (f"451 4.7.0 XOAUTH2 token not available: token endpoint {parts.oidc.token_url} "
                                    "refused client exmta-app: HTTP 401 invalid_client: client authentication "
                                    "failed"), defer_event["reply"]
    assert parts.metric("exmta_oauth2_token_requests_total", result="refused") >= 1
    assert parts.tap.sessions == [] and "not-the-secret" not in ex.log_text()
    assert not [e for e in tracking(ex) if e["event_id"] in ("FAIL", "EXPIRE")]


def test_revoked_client_defers_then_expires_with_a_dsn(parts: Parts, exmta_factory: Any) -> None:
    ex = parts.exmta(exmta_factory, lifetime="20s")
    send(ex, "before revocation")
    parts.sink.wait_for(1, timeout=60)
    # the app registration is deleted: the provider forgets the client and its tokens
    parts.oidc.restart([c for c in parts.clients if c["client_id"] != "exmta-app"])
    send(ex, "after revocation")

    def expired() -> bool:
        return any(e["event_id"] == "EXPIRE" for e in tracking(ex))
    wait_until(expired, 90, "the message to expire")
    events = tracking(ex)
    defers = [e for e in events if e["event_id"] == "DEFER"]
    assert defers and all("refused client exmta-app: HTTP 401 invalid_client" in e["reply"] for e in defers), defers
    wait_until(lambda: ex.maildir_messages(SENDER), 30, "the DSN to the device's sender")
    (dsn,) = ex.maildir_messages(SENDER)
    text = dsn.decode("utf-8", "replace").replace("\r\n", "\n")
    assert "Action: failed" in text and "bob@fabrikam.test" in text
    assert "refused client exmta-app" in text
    assert [m.message()["Subject"] for m in parts.sink.messages] == ["before revocation"]
    parts.no_secret_anywhere(ex)
