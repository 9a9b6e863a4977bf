"""MTA-STS end to end on loopback: Knot DNS zones, an HTTPS policy host of a test CA, aiosmtpd MX hosts.

Three MX hosts share one port on different loopback addresses:
127.0.0.2 offers STARTTLS with a certificate for every ``mx.<d>.sts.test``,
127.0.0.3 offers STARTTLS with a certificate for ``wrong.example``,
127.0.0.4 offers no STARTTLS at all.  Each policy domain ``<d>.sts.test``
points its MX at one of them and publishes (or not) a policy.
"""
from __future__ import annotations

import io
import json
import ssl
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.python.threadpool import ThreadPool

from exmta.config.schema import SendConnectorConfig
from exmta.model import DeliveryRequest, Envelope, MailParams, Outcome, Recipient
from exmta.routing.dns import DNSResolver
from exmta.send.smtp import SMTPSendConnector
from exmta.smtp.client import ClientTimeouts
from exmta.tlspolicy.config import TLSPolicyConfig
from exmta.tlspolicy.engine import TLSPolicyEngine
from exmta.tlspolicy.mtasts import STSPolicy
from support import knot
from support.policyhost import PolicyHost, policy
from support.procs import free_port
from support.sinks import SmtpSink
from support.tlscerts import TestPKI

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not knot.available(), reason="knotd is not installed")]

DOMAINS = ["enforce", "badcert", "notls", "mismatch", "wild", "testing", "none", "down", "big", "malformed",
           "expired", "cached"]
#: zone and certificates only: client.sts.test's MX (127.0.0.5) requires a client certificate
EXTRA = ["client"]
MX_OF = {"client": 5, "enforce": 2, "badcert": 3, "notls": 4, "mismatch": 2, "wild": 2, "testing": 3, "none": 4, "down": 4,
         "big": 4, "malformed": 4, "expired": 2, "cached": 3}
TXT_ID = {d: "20261207a" for d in DOMAINS + EXTRA} | {"cached": "new2"}


def zone() -> str:
    lines = []
    for d in DOMAINS + EXTRA:
        lines.append(f"{d} MX 10 mx.{d}")
        lines.append(f"mx.{d} A 127.0.0.{MX_OF[d]}")
        lines.append(f'_mta-sts.{d} TXT "v=STSv1; id={TXT_ID[d]}"')
        lines.append(f"mta-sts.{d} A {'127.0.0.9' if d == 'down' else '127.0.0.1'}")
    return "\n".join(lines) + "\n"


def server_context(files: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


class World:
    """The DNS, the policy host, the three MX hosts and a reporter that remembers."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pki = TestPKI(tmp / "pki")
        self.knot = knot.KnotServer(tmp, {"sts.test": zone()}).start()
        self.port = free_port("127.0.0.2")
        good = self.pki.server(*[f"mx.{d}.sts.test" for d in DOMAINS + EXTRA], file="mx-good")
        needs_client = server_context(good)
        needs_client.verify_mode = ssl.CERT_REQUIRED
        needs_client.load_verify_locations(str(self.pki.ca_file))
        wrong = self.pki.server("wrong.example", file="mx-wrong")
        self.sinks = {
            2: SmtpSink(host="127.0.0.2", port=self.port, tls_context=server_context(good)).start(),
            3: SmtpSink(host="127.0.0.3", port=self.port, tls_context=server_context(wrong)).start(),
            4: SmtpSink(host="127.0.0.4", port=self.port).start(),
            5: SmtpSink(host="127.0.0.5", port=self.port, tls_context=needs_client).start(),
        }
        self.host = PolicyHost(self.pki, [f"mta-sts.{d}.sts.test" for d in DOMAINS + EXTRA + ["change"]])
        self.pool = ThreadPool(minthreads=0, maxthreads=4, name="sts-test")
        self.pool.start()
        self.reports: list[tuple[str, str, str | None, str]] = []

    def record(self, domain: str, kind: str, strings: Any, host: str, failure: str | None, text: str,
               **kw: Any) -> None:
        self.reports.append((domain, host, failure, text))

    def stop(self) -> None:
        for sink in self.sinks.values():
            sink.stop()
        self.knot.stop()
        self.pool.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("sts"))
    try:
        yield w
    finally:
        w.stop()


def engine_and_connector(world: World, **overrides: Any) -> tuple[TLSPolicyEngine, SMTPSendConnector]:
    from twisted.internet import reactor

    resolver = DNSResolver(reactor, world.pool, world.knot.nameservers, timeout=3.0)
    cfg = TLSPolicyConfig(ca_file=str(world.pki.ca_file), cache_dir=str(world.tmp / "cache"),
                          https_port=world.host.port_number, fetch_timeout=5.0,
                          max_policy_size=16 * 1024, txt_recheck=0.0, **overrides)
    engine = TLSPolicyEngine(cfg, reactor, reactor, world.pool, resolver, reporter=world)
    sc = SendConnectorConfig(name="internet", port=world.port, tls="opportunistic", connect_timeout=5.0)
    conn = SMTPSendConnector(sc, reactor, reactor, resolver, "exmta.test", timeouts=ClientTimeouts.uniform(5.0))
    conn.tls_policy = engine
    return engine, conn


def request(domain: str) -> DeliveryRequest:
    body = f"From: a@exmta.test\r\nTo: b@{domain}\r\nSubject: sts {domain}\r\n\r\nhello\r\n".encode()
    rcpt = Recipient(f"b@{domain}")
    env = Envelope("a@exmta.test", [rcpt], params=MailParams(), queue_id="Q", size=len(body))
    return DeliveryRequest("Q", env, (rcpt,), lambda: io.BytesIO(body))


def serve_policies(world: World) -> None:
    p = world.host.policies
    for d in DOMAINS:
        p[f"mta-sts.{d}.sts.test"] = (200, "text/plain", policy("enforce", f"mx.{d}.sts.test"))
    p["mta-sts.client.sts.test"] = (200, "text/plain", policy("enforce", "mx.client.sts.test"))
    p["mta-sts.mismatch.sts.test"] = (200, "text/plain", policy("enforce", "other.mismatch.sts.test"))
    p["mta-sts.wild.sts.test"] = (200, "text/plain", policy("enforce", "*.wild.sts.test"))
    p["mta-sts.testing.sts.test"] = (200, "text/plain", policy("testing", "mx.testing.sts.test"))
    p["mta-sts.none.sts.test"] = (200, "text/plain", policy("none"))
    p["mta-sts.big.sts.test"] = (200, "text/plain", policy("enforce", "mx.big.sts.test") + "# x\r\n" * 5000)
    p["mta-sts.malformed.sts.test"] = (200, "text/plain", "version: STSv2\r\nmode: enforce\r\n")
    del p["mta-sts.cached.sts.test"]  # the policy host lost it: the cached policy stays in force


def count(world: World, sink: int, domain: str) -> int:
    return sum(1 for m in world.sinks[sink].messages if any(r.endswith("@" + domain) for r in m.rcpt_tos))


@pytest_twisted.inlineCallbacks
def test_each_mode_delivers_defers_or_reports(world: World) -> None:
    from twisted.internet import reactor

    world.host.listen(reactor)
    try:
        serve_policies(world)
        cache = world.tmp / "cache" / "mta-sts"
        cache.mkdir(parents=True, exist_ok=True)
        stale = STSPolicy("expired.sts.test", "enforce", ("nothing.example",), 60, "old1", time.time() - 3600)
        (cache / "expired.sts.test.json").write_text(json.dumps(stale.to_json()))
        valid = STSPolicy("cached.sts.test", "enforce", ("mx.cached.sts.test",), 86400, "old2", time.time())
        (cache / "cached.sts.test.json").write_text(json.dumps(valid.to_json()))
        engine, conn = engine_and_connector(world)
        results = {}
        for d in DOMAINS:
            [results[d]] = yield conn.deliver(request(f"{d}.sts.test"))
        yield defer.gatherResults(list(engine.sts.refreshing.values()))  # the cached domain's refresh
        yield conn.close()
    finally:
        yield world.host.stop()

    outcome = {d: r.outcome for d, r in results.items()}
    delivered = {d for d, o in outcome.items() if o is Outcome.DELIVERED}
    assert delivered == {"enforce", "wild", "testing", "none", "down", "big", "malformed", "expired"}, results
    # enforce: TLS with a verified certificate
    assert results["enforce"].tls and results["enforce"].tls.startswith("TLSv1.")
    assert results["wild"].tls and results["expired"].tls
    # refused under enforce: deferred with the reason, nothing sent anywhere (never in clear)
    for d in ("badcert", "notls", "mismatch", "cached"):
        assert outcome[d] is Outcome.DEFERRED and results[d].reply.code == 451, results[d]
        assert results[d].reply.status == "4.7.5", results[d]
        assert count(world, MX_OF[d], f"{d}.sts.test") == 0
    assert "MTA-STS policy of badcert.sts.test" in results["badcert"].reply.text
    assert "do not match mx.badcert.sts.test" in results["badcert"].reply.text
    assert "STARTTLS" in results["notls"].reply.text
    assert "matches none of mx: other.mismatch.sts.test" in results["mismatch"].reply.text
    assert "MTA-STS policy of cached.sts.test" in results["cached"].reply.text
    # testing: delivered over TLS to the host with the wrong certificate, and reported
    assert count(world, 3, "testing.sts.test") == 1
    by = {(d, f) for d, _h, f, _t in world.reports}
    assert ("testing.sts.test", "certificate-host-mismatch") in by
    assert ("badcert.sts.test", "certificate-host-mismatch") in by
    assert ("notls.sts.test", "starttls-not-supported") in by
    assert ("enforce.sts.test", None) in by
    # policies that cannot be had: no policy (delivered as before), the failure reported
    assert ("down.sts.test", "sts-policy-fetch-error") in by
    assert ("big.sts.test", "sts-policy-invalid") in by
    assert ("malformed.sts.test", "sts-policy-invalid") in by
    # the expired cache entry was replaced by the fetched policy; the cached one survived a failed refresh
    assert json.loads((cache / "expired.sts.test.json").read_text())["policy_id"] == "20261207a"
    assert json.loads((cache / "cached.sts.test.json").read_text())["policy_id"] == "old2"
    assert ("mta-sts.cached.sts.test", "/.well-known/mta-sts.txt") in world.host.requests


@pytest_twisted.inlineCallbacks
def test_overrides_ship_mail_anyway_and_cache_survives_restart(world: World) -> None:
    from twisted.internet import reactor

    world.host.listen(reactor)
    try:
        serve_policies(world)
        engine, conn = engine_and_connector(world, overrides={"badcert.sts.test": "testing",
                                                              "notls.sts.test": "none"})
        # the connector's client certificate is still presented under a policy
        client = world.pki.client("relay.exmta.test", file="relay-client")
        with_cert = TLSPolicyEngine(engine.config, reactor, reactor, world.pool, engine.resolver,
                                    client_certificate=(str(client.cert), str(client.key)))
        conn.tls_policy = with_cert
        [good] = yield conn.deliver(request("client.sts.test"))
        yield conn.close()  # no reuse of that session below
        conn.tls_policy = engine
        [refused] = yield conn.deliver(request("client.sts.test"))  # the same without the certificate
        [bad] = yield conn.deliver(request("badcert.sts.test"))
        [plain] = yield conn.deliver(request("notls.sts.test"))
        yield conn.close()
        # a new engine (a restart) reads enforce.sts.test's policy from disk, without fetching
        yield engine_and_connector(world)[0].sts.policy_for("enforce.sts.test")
        world.host.policies.clear()
        before = len(world.host.requests)
        fresh, _ = engine_and_connector(world)
        got = yield defer.Deferred.fromCoroutine(fresh.sts.policy_for("enforce.sts.test"))
    finally:
        yield world.host.stop()
    assert good.outcome is Outcome.DELIVERED and good.tls and count(world, 5, "client.sts.test") == 1
    assert refused.outcome is Outcome.DEFERRED and refused.reply.status == "4.7.5"
    assert bad.outcome is Outcome.DELIVERED and bad.tls
    assert plain.outcome is Outcome.DELIVERED and plain.tls is None
    assert got is not None and got.mode == "enforce" and got.mx == ("mx.enforce.sts.test",)
    assert len(world.host.requests) == before


@pytest_twisted.inlineCallbacks
def test_scheduler_defers_then_bounces_after_the_lifetime(world: World) -> None:
    """No mail lost: a refused domain is deferred with the reason, then expires with a DSN."""
    from twisted.internet import reactor

    from exmta.config.schema import QueueConfig, RouteConfig
    from exmta.model import TrackingEventId
    from exmta.queue.scheduler import DeliveryScheduler
    from exmta.routing import StaticRouter
    from exmta.testing.memstore import MemoryStore

    clock = task.Clock()
    clock.advance(1_700_000_000)
    store = MemoryStore(clock)
    events: list[Any] = []
    world.host.listen(reactor)
    engine, conn = engine_and_connector(world)
    send = {"internet": conn.config}
    config = QueueConfig(retry_schedule=(300.0,), max_lifetime=600.0, delay_warning=0.0, max_active=10)
    tracker = type("T", (), {"track": lambda self, e: events.append(e)})()
    sched = DeliveryScheduler(store, StaticRouter([RouteConfig(("*",), "internet")], send), {"internet": conn},
                              config, clock, tracker, hostname="exmta.test", postmaster="postmaster",
                              send_configs=send)
    serve_policies(world)

    def seen(event_id: TrackingEventId) -> Any:
        return next((e for e in events if e.event_id is event_id), None)

    @defer.inlineCallbacks
    def wait_for(event_id: TrackingEventId) -> Any:
        deadline = time.monotonic() + 30
        while seen(event_id) is None:
            assert time.monotonic() < deadline, f"no {event_id} event: {events}"
            clock.advance(0)
            yield task.deferLater(reactor, 0.02, lambda: None)

    try:
        sched.startService()
        rcpt = Recipient("b@mismatch.sts.test")
        env = Envelope("a@exmta.test", [rcpt], params=MailParams(), message_id="<m@exmta.test>")
        yield store.submit(b"Subject: x\r\n\r\nbody\r\n", env)
        yield wait_for(TrackingEventId.DEFER)
        first = seen(TrackingEventId.DEFER)
        assert first.reply.startswith("451 4.7.5") and "MTA-STS" in first.reply
        assert "TLS policy" in first.details["explanation"]
        clock.advance(601)
        yield wait_for(TrackingEventId.EXPIRE)
        yield wait_for(TrackingEventId.DSN)
        assert "MTA-STS" in seen(TrackingEventId.EXPIRE).details["last_reply"]
        assert count(world, 2, "mismatch.sts.test") == 0
    finally:
        yield sched.stopService()
        yield conn.close()
        yield world.host.stop()


@pytest_twisted.inlineCallbacks
def test_a_policy_that_changes_is_refreshed_in_the_background(world: World, tmp_path: Path) -> None:
    """The TXT id changes: the cached policy serves this delivery, the new one the next."""
    from twisted.internet import reactor

    records = ("change MX 10 mx.change\nmx.change A 127.0.0.2\nmta-sts.change A 127.0.0.1\n"
               '_mta-sts.change TXT "v=STSv1; id={id}"\n')
    own = knot.KnotServer(tmp_path, {"sts.test": records.format(id="one")}).start()
    world.host.listen(reactor)
    try:
        world.host.policies["mta-sts.change.sts.test"] = (200, "text/plain", policy("enforce", "mx.enforce.sts.test"))
        resolver = DNSResolver(reactor, world.pool, own.nameservers, timeout=3.0)
        cfg = TLSPolicyConfig(ca_file=str(world.pki.ca_file), cache_dir=str(tmp_path / "cache"),
                              https_port=world.host.port_number, txt_recheck=0.0)
        engine = TLSPolicyEngine(cfg, reactor, reactor, world.pool, resolver)
        first = yield defer.Deferred.fromCoroutine(engine.sts.policy_for("change.sts.test"))
        assert first.policy_id == "one" and not first.matches("mx.change.sts.test")
        # the domain fixes its policy and announces it with a new id
        world.host.policies["mta-sts.change.sts.test"] = (200, "text/plain", policy("enforce", "mx.change.sts.test"))
        own.stop()
        own = knot.KnotServer(tmp_path / "2", {"sts.test": records.format(id="two")}, port=own.port).start()
        during = yield defer.Deferred.fromCoroutine(engine.sts.policy_for("change.sts.test"))
        assert during.policy_id == "one"  # not waiting for the fetch
        yield engine.sts.refreshing.get("change.sts.test", defer.succeed(None))
        after = yield defer.Deferred.fromCoroutine(engine.sts.policy_for("change.sts.test"))
        assert after.policy_id == "two" and after.matches("mx.change.sts.test")
        stored = json.loads((tmp_path / "cache" / "mta-sts" / "change.sts.test.json").read_text())
        assert stored["policy_id"] == "two"
    finally:
        own.stop()
        yield world.host.stop()


@pytest_twisted.inlineCallbacks
def test_a_policy_host_that_never_answers_is_given_up_after_the_time_limit(world: World) -> None:
    """TCP accepted, no TLS handshake, no HTTP: the fetch stops at fetch_timeout, and there is no policy."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from exmta.tlspolicy.mtasts import MTASTS, PolicyCache, PolicyFetcher

    silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        resolver = DNSResolver(reactor, world.pool, world.knot.nameservers, timeout=3.0)
        fetcher = PolicyFetcher(reactor, resolver.resolve_addresses, port=silent.getHost().port,
                                ca_file=str(world.pki.ca_file), timeout=0.5)
        reports: list[tuple[str, str, str]] = []
        sts = MTASTS(reactor, world.pool, reactor, PolicyCache(None), fetcher,
                     engine_and_connector(world)[0]._txt, txt_recheck=0.0,
                     report=lambda *a: reports.append(a))
        got = yield defer.Deferred.fromCoroutine(sts.policy_for("enforce.sts.test"))
    finally:
        yield silent.stopListening()
    assert got is None
    [(domain, kind, text)] = reports
    assert domain == "enforce.sts.test" and kind == "sts-policy-fetch-error" and "timed out" in text


@pytest_twisted.inlineCallbacks
def test_a_policy_that_trickles_in_is_cut_at_the_time_limit(world: World) -> None:
    """Headers at once, then the body one byte at a time: the fetch stops at fetch_timeout."""
    from twisted.internet import reactor
    from twisted.web import resource, server

    from exmta.tlspolicy.mtasts import PolicyError, PolicyFetcher

    lost: list[Any] = []

    class Trickle(resource.Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> Any:
            request.setHeader(b"content-type", b"text/plain")
            request.write(b"v")
            call = reactor.callLater(30, request.finish)  # never within the limit
            request.notifyFinish().addErrback(lost.append)  # the client hung up
            request.notifyFinish().addBoth(lambda _: call.cancel() if call.active() else None)
            return server.NOT_DONE_YET

    from twisted.internet import ssl as tssl

    files = world.pki.server("mta-sts.enforce.sts.test", file="trickle")
    cert = tssl.PrivateCertificate.loadPEM(files.cert.read_bytes() + files.key.read_bytes())
    port = reactor.listenSSL(0, server.Site(Trickle()), cert.options(), interface="127.0.0.1")
    try:
        resolver = DNSResolver(reactor, world.pool, world.knot.nameservers, timeout=3.0)
        fetcher = PolicyFetcher(reactor, resolver.resolve_addresses, port=port.getHost().port,
                                ca_file=str(world.pki.ca_file), timeout=0.5)
        [failure] = yield fetcher.fetch("enforce.sts.test").addCallbacks(lambda r: [r], lambda f: [f])
        deadline = time.monotonic() + 10
        while not lost and time.monotonic() < deadline:  # the fetcher closed the connection
            yield task.deferLater(reactor, 0.02, lambda: None)
        assert lost, "the connection stayed open after the time limit"
    finally:
        yield port.stopListening()
    assert isinstance(failure.value, PolicyError) and "timed out" in str(failure.value)
