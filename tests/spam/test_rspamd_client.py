"""The rspamd HTTP client on a task.Clock against a fake responder: the request it sends, the verdict it
reads, and every failure shape (down, slow, garbage, HTTP 500, not JSON, too long, cut short) as one
RspamdUnavailable, never anything else."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from exmta.model import Address, RcptParams
from exmta.spam.rspamd import RspamdClient, RspamdUnavailable, parse_verdict, request_headers
from tests.spam.fakes import FakeEndpoint, FakeRspamd, http_answer, verdict_answer

MESSAGE = b"From: a@example.test\r\nSubject: hello\r\n\r\nbody\r\n" * 3000  # several upload chunks


def client_for(endpoint: FakeEndpoint, clock: Clock, **kw) -> RspamdClient:
    return RspamdClient(clock, endpoint, timeout=10, clock=clock, **kw)


def run(client: RspamdClient, endpoint: FakeEndpoint, data: bytes = MESSAGE, headers=None) -> Deferred:
    d = Deferred.fromCoroutine(client.check(data, headers or {"IP": ["192.0.2.7"]}))
    endpoint.pump()
    return d


def failure_text(d: Deferred) -> str:
    results: list = []
    d.addBoth(results.append)
    [f] = results
    assert f.check(RspamdUnavailable), f
    return f.getErrorMessage()


def test_request_and_verdict():
    clock = Clock()
    endpoint = FakeEndpoint(lambda: FakeRspamd(verdict_answer()))
    client = client_for(endpoint, clock)
    session = SimpleNamespace(peer_ip="192.0.2.7", helo_name="client.example.test", auth_identity="alice",
                              tls=SimpleNamespace(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384"))
    txn = SimpleNamespace(sender=Address("a", "example.test"),
                          recipients=[(Address("b", "example.test"), RcptParams()),
                                      (Address("c", "example.test"), RcptParams())])
    headers = request_headers(session, txn, "Q1234", "mx.example.test", settings_id="inbound")
    d = run(client, endpoint, headers=headers)
    verdict = d.result if not isinstance(d.result, Exception) else None
    assert verdict is not None and verdict.action == "rewrite subject"
    assert verdict.score == 11.1 and verdict.required_score == 15.0
    assert verdict.symbol_names()[:2] == ["EXMTA_TEST_SCORE", "RDNS_NONE"]
    assert verdict.subject == "*** SPAM *** hello"
    assert ("Authentication-Results", "mx.example.test;\r\n\tdkim=none", 1) in verdict.add_headers
    assert ("X-Spam-Level", 0) in verdict.remove_headers
    [server] = endpoint.servers
    assert server.request.startswith(b"POST /checkv2 HTTP/1.1\r\n")
    sent = [(k.lower(), v) for k, v in server.headers()]  # HTTP header names are case-insensitive
    for pair in [("IP", "192.0.2.7"), ("Helo", "client.example.test"), ("From", "a@example.test"),
                 ("Rcpt", "b@example.test"), ("Rcpt", "c@example.test"), ("Queue-Id", "Q1234"), ("User", "alice"),
                 ("MTA-Name", "mx.example.test"), ("TLS-Version", "TLSv1.3"), ("Settings-ID", "inbound"),
                 ("Content-Length", str(len(MESSAGE)))]:
        assert (pair[0].lower(), pair[1]) in sent
    assert server.body() == MESSAGE


def test_null_sender_and_anonymous_session_headers():
    session = SimpleNamespace(peer_ip="2001:db8::1", helo_name=None, auth_identity=None, tls=None)
    txn = SimpleNamespace(sender=Address("", ""), recipients=[])
    headers = request_headers(session, txn, None, "mx")
    assert headers["From"] == ["<>"] and "User" not in headers and "Helo" not in headers
    assert "Hostname" not in headers  # never a name this server did not verify


def test_down():
    clock = Clock()
    endpoint = FakeEndpoint(lambda: None)
    d = run(client_for(endpoint, clock), endpoint)
    assert "rspamd request failed" in failure_text(d)


def test_slow_times_out_on_the_clock_and_closes():
    clock = Clock()
    endpoint = FakeEndpoint(lambda: FakeRspamd(None))
    d = run(client_for(endpoint, clock), endpoint)
    assert not d.called
    clock.advance(9.9)
    assert not d.called
    clock.advance(0.2)
    assert "did not answer within 10 s" in failure_text(d)
    endpoint.pump()
    assert endpoint.pumps[0].clientIO.disconnecting or endpoint.pumps[0].clientIO.disconnected
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize("answer, why", [
    (b"garbage garbage\r\n\r\n", "rspamd request failed"),
    (http_answer(b'{"error": "oops"}', 500, b"Internal Server Error"), "HTTP 500"),
    (http_answer(b"<html>not json</html>"), "not JSON"),
    (http_answer(b"[1, 2]"), "not an object"),
    (http_answer(json.dumps({"action": "explode", "score": 1}).encode()), "unknown action"),
    (http_answer(json.dumps({"action": "reject", "score": "high"}).encode()), "not a number"),
    (http_answer(json.dumps({"error": "Message has invalid headers"}).encode()), "reported an error"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"action\"", "cut short"),
])
def test_garbage_and_errors(answer, why):
    clock = Clock()
    endpoint = FakeEndpoint(lambda: FakeRspamd(answer))
    d = run(client_for(endpoint, clock), endpoint)
    assert why in failure_text(d)


def test_answer_too_long():
    clock = Clock()
    endpoint = FakeEndpoint(lambda: FakeRspamd(http_answer(b" " * 5000 + b"{}"), close=False))
    d = run(client_for(endpoint, clock, max_answer=4096), endpoint)
    assert "passed 4096 octets" in failure_text(d)


def test_slots_bound_scans_in_flight():
    clock = Clock()
    endpoint = FakeEndpoint(lambda: FakeRspamd(None))
    client = RspamdClient(clock, endpoint, timeout=10, max_concurrent=1, clock=clock)
    first = run(client, endpoint)
    second = run(client, endpoint)
    assert len(endpoint.servers) == 1  # the second waits for a slot
    clock.advance(10.5)
    assert "did not answer" in failure_text(first)
    endpoint.pump()
    assert len(endpoint.servers) == 2 and not second.called
    clock.advance(10.5)
    assert "did not answer" in failure_text(second)


def test_parse_verdict_shapes():
    v = parse_verdict(json.dumps({"is_skipped": True, "score": 0, "required_score": 0, "action": None}).encode())
    assert v.skipped and v.action == "no action"
    v = parse_verdict(json.dumps({
        "action": "add header", "score": 7, "required_score": 15, "dkim-signature": "v=1; a=rsa-sha256",
        "messages": {"smtp_message": "go away"},
        "milter": {"add_headers": {"X-A": "1", "X-B": [{"value": "2", "order": 0}, {"value": "3"}]},
                   "remove_headers": {"X-C": 2, "X-D": True}},
    }).encode())
    assert v.add_headers == (("X-A", "1", -1), ("X-B", "2", 0), ("X-B", "3", -1))
    assert v.remove_headers == (("X-C", 2), ("X-D", 0))
    assert v.dkim_signatures == ("v=1; a=rsa-sha256",) and v.message == "go away"


def test_answer_stalled_mid_body_times_out_and_drops_the_connection():
    clock = Clock()
    endpoint = FakeEndpoint(lambda: FakeRspamd(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"act", close=False))
    d = run(client_for(endpoint, clock), endpoint)
    assert not d.called
    clock.advance(10.5)
    assert "did not answer within 10 s" in failure_text(d)
    endpoint.pump()
    transport = endpoint.pumps[0].clientIO
    assert transport.disconnecting or transport.disconnected
