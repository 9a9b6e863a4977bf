"""Issue 10 item 12: ARC validation that raises is logged; a bug or a DNS timeout is temperror, not fail."""
from __future__ import annotations

from typing import Any

import dkim
import pytest
from twisted.internet.defer import maybeDeferred
from twisted.logger import LogLevel, globalLogPublisher

from exmta.filters import bodyhash
from exmta.filters.arc import ARCVerifyFilter
from exmta.filters.authres import auth_state
from exmta.testing import FilterHarness, MessageView

SEALED = (b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=example.test; s=sel1; t=1; b=AAAA\r\n"
          b"From: a@example.test\r\nSubject: s\r\n\r\nbody\r\n")


class NoDNS:
    """AuthDNS stand-in: checks run inline; arc_verify is replaced, so no lookup happens."""

    run = staticmethod(maybeDeferred)

    def dkim_txt(self, name: Any, timeout: float = 5) -> None:
        return None


@pytest.fixture
def log_events():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def arc_result(monkeypatch: pytest.MonkeyPatch, error: Exception) -> Any:
    def raising(*args: Any, **kw: Any) -> Any:
        raise error

    class Raising:
        def verify(self, **kw: Any) -> Any:
            raise error

    monkeypatch.setattr(dkim, "arc_verify", raising)  # a message read whole
    monkeypatch.setattr(bodyhash, "streamed_arc", lambda *a, **kw: Raising())  # the streamed body hashes
    h = FilterHarness(ARCVerifyFilter("arc", NoDNS()))
    session = h.session()
    h.run("data", session, h.transaction("a@example.test", "b@dest.test"), MessageView(SEALED))
    return auth_state(session).arc


def test_a_bug_is_logged_with_its_traceback_and_is_temperror(monkeypatch, log_events) -> None:
    result = arc_result(monkeypatch, KeyError("a bug"))
    assert result.result == "temperror" and "internal error: KeyError" in result.reason
    failures = [e for e in log_events if e.get("log_level") is LogLevel.critical and "log_failure" in e]
    assert len(failures) == 1 and failures[0]["log_failure"].check(KeyError)


def test_a_dns_timeout_is_temperror(monkeypatch, log_events) -> None:
    result = arc_result(monkeypatch, dkim.DnsTimeoutError("timed out"))
    assert result.result == "temperror"


def test_a_broken_chain_fails(monkeypatch, log_events) -> None:
    result = arc_result(monkeypatch, dkim.ValidationError("bad seal"))
    assert result.result == "fail" and "ValidationError: bad seal" in result.reason
    assert not [e for e in log_events if e.get("log_level") is LogLevel.critical]
