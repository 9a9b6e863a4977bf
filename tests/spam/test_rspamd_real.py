"""The rspamd client and filter against a real rspamd (Debian's) on loopback, offline, with a local rule
(tests/support/rspamd.py): verdicts over TCP and a Unix socket, SMTP end to end with the SCL and its
thresholds, and rspamd down, hung and killed mid-scan (451, never 5xx; no acknowledged message lost)."""
from __future__ import annotations

import smtplib
import socket
import struct
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from exmta.config.schema import ReceiveConnectorConfig
from exmta.filters.base import FilterChain
from exmta.model import Address, RcptParams, TrackingEventId
from exmta.smtp.server import ESMTPServerFactory
from exmta.spam.rspamd import RspamdClient, request_headers
from exmta.spam.rspamd_filter import HEADER, RspamdFilter
from exmta.testing.memstore import MemoryStore
from support import rspamd as rspamd_support
from support.smtp_stubs import StubPolicy
from tests.spam.fakes import FakeRspamd, http_answer

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not rspamd_support.available(), reason="rspamd is not installed "
                                 "(scripts/deps-rspamd.sh)")]


def message(body: str, subject: str = "hello", extra: str = "") -> bytes:
    return (f"From: Alice <alice@remote.test>\r\nTo: Bob <bob@example.test>\r\nSubject: {subject}\r\n"
            f"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{abs(hash(body + subject))}@remote.test>\r\n"
            f"{extra}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{body}\r\n").encode()


@pytest.fixture
def own_rspamd(tmp_path, hs_cache):
    server = rspamd_support.Rspamd(tmp_path, cache_dir=hs_cache).start()
    yield server
    server.close()


SESSION = SimpleNamespace(peer_ip="198.51.100.7", helo_name="client.remote.test", auth_identity=None, tls=None)
TXN = SimpleNamespace(sender=Address("alice", "remote.test"),
                      recipients=[(Address("bob", "example.test"), RcptParams()),
                                  (Address("carol", "example.test"), RcptParams())])


@pytest_twisted.inlineCallbacks
def test_verdicts_over_tcp_and_unix(rspamd, tmp_path, hs_cache):
    unix = rspamd_support.Rspamd(tmp_path, unix=True, cache_dir=hs_cache).start()
    try:
        for endpoint in (rspamd.endpoint, unix.endpoint):
            client = RspamdClient(reactor, endpoint, timeout=30, max_concurrent=2)
            headers = request_headers(SESSION, TXN, "QTEST1", "mx.example.test")
            clean = yield ensureDeferred(client.check(message("just a note"), headers))
            assert clean.action == "no action" and clean.score < 6 and clean.required_score == 15
            assert "TO_MATCH_ENVRCPT_ALL" in clean.symbol_names()  # rspamd read the Rcpt headers
            assert ("X-Rspamd-Queue-Id", "QTEST1", -1) in clean.add_headers  # and the Queue-Id
            subject = yield ensureDeferred(client.check(message("EXMTA-TEST-SCORE=9"), headers))
            assert subject.action == "rewrite subject" and subject.subject == "*** SPAM *** hello"
            assert "EXMTA_TEST_SCORE" in subject.symbol_names()
            spam = yield ensureDeferred(client.check(message("EXMTA-TEST-SCORE=30"), headers))
            assert spam.action == "reject" and spam.score >= 30
            soft = yield ensureDeferred(client.check(message(rspamd_support.SOFT_REJECT_MARK), headers))
            assert soft.action == "soft reject"
            user = yield ensureDeferred(client.check(message("hello"), {**headers, "User": ["alice"]}))
            assert user.action == "no action"
    finally:
        unix.close()


class Tracker:
    def __init__(self):
        self.events = []

    def track(self, event):
        self.events.append(event)


def serve(store, tracker, flt, name, trusted=False):
    factory = ESMTPServerFactory(ReceiveConnectorConfig(name=name, hostname="mx.example.test"),
                                 StubPolicy(local_domains=("example.test",)),
                                 FilterChain([flt], reactor), store, reactor)
    factory.tracker = tracker
    if trusted:  # e.g. exchange_servers: the connector lets these clients bring organisation headers
        factory.trusted = lambda session: True
    return factory, reactor.listenTCP(0, factory, interface="127.0.0.1")


def stop(factory, port):
    port.stopListening()
    for session in list(factory.sessions):
        session.transport.abortConnection()


def make_filter(endpoint, timeout=30.0, **config):
    options = RspamdFilter.parse("rspamd", {"socket": endpoint, **config})
    client = RspamdClient(reactor, options.pop("socket"), timeout=timeout, max_concurrent=4)
    options.pop("timeout")
    options.pop("max_concurrent")
    return RspamdFilter("rspamd", client, hostname="mx.example.test", **options)


def send(port: int, raw: bytes):
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo("client.remote.test")
        try:
            client.sendmail("alice@remote.test", ["bob@example.test"], raw)
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
    return 250, ""


def fields(content: bytes, name: str) -> list[str]:
    head = content.split(b"\r\n\r\n", 1)[0].decode().replace("\r\n\t", " ").replace("\r\n ", " ")
    return [line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith(name.lower() + ":")]


@pytest.fixture(scope="module")
def servers(rspamd):
    store, tracker = MemoryStore(reactor), Tracker()
    inbound = serve(store, tracker, make_filter(rspamd.endpoint, scl_quarantine=6, scl_reject=7), "inbound")
    internal = serve(store, tracker, make_filter(rspamd.endpoint), "internal", trusted=True)
    yield SimpleNamespace(store=store, tracker=tracker, inbound=inbound[1].getHost().port,
                          internal=internal[1].getHost().port)
    for factory, port in (inbound, internal):
        stop(factory, port)


def received(servers, before):
    [event] = [e for e in servers.tracker.events[before:] if e.event_id is TrackingEventId.RECEIVE]
    return event.queue_id


@pytest_twisted.inlineCallbacks
def test_smtp_clean_message_gets_scl_and_spam_headers_forged_scl_dropped(servers):
    before = len(servers.tracker.events)
    forged = "X-MS-Exchange-Organization-SCL: -1\r\nX-Spam-Status: No, score=-50\r\n"
    code, text = yield deferToThread(send, servers.inbound, message("a clean note", extra=forged))
    assert code == 250, text
    queue_id = received(servers, before)
    content = servers.store.content(queue_id)
    [scl] = fields(content, "X-MS-Exchange-Organization-SCL")
    assert 0 <= int(scl) <= 4                       # rspamd's score, not the client's -1
    [status] = fields(content, "X-Spam-Status")
    assert status.startswith("No, score=") and "required=15.00" in status
    assert fields(content, "X-Rspamd-Queue-Id") == [queue_id]   # rspamd's milter header, through the journal
    assert servers.store.queue_of(queue_id) != "hold"
    [agent] = [e for e in servers.tracker.events[before:] if e.event_id is TrackingEventId.AGENTINFO]
    assert agent.details["filter"] == "rspamd" and agent.details["check"].startswith("spam-verdict: no action")


@pytest_twisted.inlineCallbacks
def test_smtp_reject_at_r_and_quarantine_at_q(servers):
    before = len(servers.tracker.events)
    code, text = yield deferToThread(send, servers.inbound, message("EXMTA-TEST-SCORE=30"))
    assert code == 550 and text.startswith("5.7.1 Message rejected as spam")
    [refusal] = [e for e in servers.tracker.events[before:] if e.event_id is TrackingEventId.REJECT]
    assert refusal.details["filter"] == "rspamd"
    before = len(servers.tracker.events)
    code, text = yield deferToThread(send, servers.inbound, message("EXMTA-TEST-SCORE=11"))
    assert code == 250, text
    queue_id = received(servers, before)
    assert servers.store.queue_of(queue_id) == "hold"
    assert servers.store.envelope(queue_id).held_reason.startswith("rspamd rspamd: SCL 6: rewrite subject")
    content = servers.store.content(queue_id)
    assert fields(content, "X-MS-Exchange-Organization-SCL") == ["6"]
    assert fields(content, "Subject") == ["*** SPAM *** hello"]
    assert "EXMTA_TEST_SCORE(11.00)" in fields(content, "X-Spam-Symbols")[0]


@pytest_twisted.inlineCallbacks
def test_smtp_trusted_source_gets_scl_minus_one_or_keeps_its_own(servers):
    before = len(servers.tracker.events)
    code, _ = yield deferToThread(send, servers.internal, message("EXMTA-TEST-SCORE=30"))
    assert code == 250  # trusted = "skip": not scanned, never refused as spam
    assert fields(servers.store.content(received(servers, before)), "X-MS-Exchange-Organization-SCL") == ["-1"]
    before = len(servers.tracker.events)
    code, _ = yield deferToThread(send, servers.internal, message("x", extra="X-MS-Exchange-Organization-SCL: 5\r\n"))
    assert code == 250
    assert fields(servers.store.content(received(servers, before)), "X-MS-Exchange-Organization-SCL") == ["5"]


@pytest_twisted.inlineCallbacks
def test_rspamd_down_hung_and_killed_mid_scan_is_451_never_5xx(own_rspamd):
    store, tracker = MemoryStore(reactor), Tracker()
    strict = serve(store, tracker, make_filter(own_rspamd.endpoint, timeout=3.0), "strict")
    lenient = serve(store, tracker, make_filter(own_rspamd.endpoint, timeout=3.0, on_failure="accept"), "lenient")
    try:
        code, _ = yield deferToThread(send, strict[1].getHost().port, message("EXMTA-TEST-SCORE=30"))
        assert code == 550  # up: a verdict
        own_rspamd.pause()   # hung: accepts connections, never answers
        code, text = yield deferToThread(send, strict[1].getHost().port, message("slow"))
        assert code == 451 and text.startswith("4.7.1")
        # killed in the middle of the scan of the next message (the scan holds a slot while it runs)
        flt = strict[0].filters.filters[0]
        pending = deferToThread(send, strict[1].getHost().port, message("killed mid-scan"))
        for _ in range(2000):  # bounded: at most ~20 s
            if flt.client.semaphore.tokens < flt.client.semaphore.limit:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        assert flt.client.semaphore.tokens < flt.client.semaphore.limit
        own_rspamd.kill()
        code, text = yield pending
        assert code == 451 and text.startswith("4.7.1")
        code, text = yield deferToThread(send, strict[1].getHost().port, message("down"))
        assert code == 451 and text.startswith("4.7.1")
        before = len(tracker.events)
        code, text = yield deferToThread(send, lenient[1].getHost().port, message("down, accepted"))
        assert code == 250, text
        [event] = [e for e in tracker.events[before:] if e.event_id is TrackingEventId.RECEIVE]
        content = store.content(event.queue_id)
        assert fields(content, HEADER)[0].startswith("not scanned (scanner failed: ")
        assert fields(content, "X-MS-Exchange-Organization-SCL") == []
        assert [e.event_id for e in tracker.events].count(TrackingEventId.RECEIVE) == 1  # only the 250 one queued
    finally:
        own_rspamd.resume()
        for factory, port in (strict, lenient):
            stop(factory, port)


def test_fixture_runs_rspamd_as_a_milter_too(tmp_path, hs_cache):
    server = rspamd_support.Rspamd(tmp_path, milter=True, cache_dir=hs_cache).start()
    try:
        host, port = server.milter_endpoint.split(":")[1:]
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(struct.pack(">IcIII", 13, b"O", 6, 0x1FF, 0))  # SMFIC_OPTNEG, version 6
            length, command = struct.unpack(">Ic", s.recv(5))
            assert command == b"O" and length >= 13  # the proxy worker negotiates as a milter
    finally:
        server.close()


@pytest.mark.parametrize("answer", [
    b"SPAMD/1.1 0 EX_OK\r\n\r\n",                                                       # not HTTP
    http_answer(b'{"error": "internal"}', 500, b"Internal Server Error"),                 # an HTTP error
    http_answer(b'{"action": "deliver it", "score": 1}'),                                 # JSON, not rspamd's
    b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"action\": \"no action\", ",     # cut short
])
@pytest_twisted.inlineCallbacks
def test_a_lying_scanner_on_loopback_is_451_never_5xx(answer):
    liar = reactor.listenTCP(0, Factory.forProtocol(lambda: FakeRspamd(answer)), interface="127.0.0.1")
    store, tracker = MemoryStore(reactor), Tracker()
    server = serve(store, tracker, make_filter(f"tcp:127.0.0.1:{liar.getHost().port}", timeout=10.0), "liar")
    try:
        code, text = yield deferToThread(send, server[1].getHost().port, message("EXMTA-TEST-SCORE=30"))
        assert code == 451 and text.startswith("4.7.1 Spam scanner unavailable")
        assert not [e for e in tracker.events if e.event_id is TrackingEventId.RECEIVE]  # nothing queued
    finally:
        stop(*server)
        yield liar.stopListening()
