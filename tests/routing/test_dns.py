"""DNSResolver and MX routing against a real Knot DNS server on loopback."""
from __future__ import annotations

import io
import random
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.python.threadpool import ThreadPool

from exmta.config.schema import SendConnectorConfig
from exmta.model import DeliveryRequest, Envelope, Outcome, Recipient
from exmta.routing.dns import (
    DNSPermanentError, DNSResolver, DNSTemporaryError, NullMXError, parse_nameservers,
)
from exmta.send.smtp import SMTPSendConnector
from exmta.smtp.client import ClientTimeouts
from support import knot
from support.procs import free_port
from support.smtp_peers import ScriptedServer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not knot.available(), reason="knotd not installed"),
]

ZONE = """\
@        MX 20 mx2
@        MX 10 mx1a
@        MX 10 mx1b
mx1a     A 127.0.0.2
mx1b     A 127.0.0.3
mx2      A 127.0.0.4
mx2      AAAA ::1
implicit A 127.0.0.5
nullmx   MX 0 .
cname1   CNAME cname2
cname2   CNAME target
target   A 127.0.0.6
viacname MX 10 cname1
noaddr   MX 10 nohost
noaddr   MX 20 txtonly
txtonly  TXT "no address here"
loop1    CNAME loop2
loop2    CNAME loop1
down     MX 10 dead
down     MX 20 alive
dead     A 127.0.0.7
alive    A 127.0.0.8
v6       MX 10 v6host
v6host   AAAA ::1
"""


@pytest.fixture(scope="module")
def knot_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[knot.KnotServer]:
    with knot.KnotServer(tmp_path_factory.mktemp("dns"), {"example.test": ZONE}) as server:
        yield server


@pytest.fixture
def pool() -> Iterator[ThreadPool]:
    tp = ThreadPool(minthreads=0, maxthreads=4, name="dns-test")
    tp.start()
    yield tp
    tp.stop()


@pytest.fixture
def resolver(knot_server: knot.KnotServer, pool: ThreadPool) -> DNSResolver:
    from twisted.internet import reactor
    return DNSResolver(reactor, pool, knot_server.nameservers, timeout=3.0)


def _failure(d: Any) -> Any:
    """Fires with the Failure (boxed, so the chain does not errback)."""
    from types import SimpleNamespace
    return d.addCallbacks(lambda r: pytest.fail(f"expected a failure, got {r!r}"),
                          lambda f: SimpleNamespace(value=f.value, check=f.check))


@pytest_twisted.inlineCallbacks
def test_mx_preference_order_and_shuffle(knot_server, pool):
    from twisted.internet import reactor
    firsts = set()
    for seed in range(12):
        res = DNSResolver(reactor, pool, knot_server.nameservers, rng=random.Random(seed))
        mxs = yield res.resolve_mx("example.test")
        assert [p for p, _ in mxs] == [10, 10, 20]
        assert {h for _, h in mxs[:2]} == {"mx1a.example.test", "mx1b.example.test"}
        assert mxs[2] == (20, "mx2.example.test")
        firsts.add(mxs[0][1])
    assert firsts == {"mx1a.example.test", "mx1b.example.test"}


@pytest_twisted.inlineCallbacks
def test_addresses_a_then_aaaa(resolver):
    assert (yield resolver.resolve_addresses("mx2.example.test")) == ["127.0.0.4", "::1"]
    assert (yield resolver.resolve_addresses("192.0.2.1")) == ["192.0.2.1"]


@pytest_twisted.inlineCallbacks
def test_implicit_mx(resolver):
    assert (yield resolver.resolve_mx("implicit.example.test")) == [(0, "implicit.example.test")]


@pytest_twisted.inlineCallbacks
def test_null_mx_is_permanent(resolver):
    f = yield _failure(resolver.resolve_mx("nullmx.example.test"))
    assert f.check(NullMXError)
    assert (f.value.reply.code, f.value.reply.status) == (556, "5.1.10")


@pytest_twisted.inlineCallbacks
def test_cname_chain_followed(resolver):
    assert (yield resolver.resolve_addresses("cname1.example.test")) == ["127.0.0.6"]
    assert (yield resolver.resolve_mx("viacname.example.test")) == [(10, "cname1.example.test")]


@pytest_twisted.inlineCallbacks
def test_nxdomain_and_no_address_are_permanent(resolver):
    f = yield _failure(resolver.resolve_mx("nosuch.example.test"))
    assert f.check(DNSPermanentError) and "NXDOMAIN" in f.value.reply.text
    f = yield _failure(resolver.resolve_mx("txtonly.example.test"))
    assert f.check(DNSPermanentError) and "No address" in f.value.reply.text
    assert f.value.reply.status == "5.4.4"


@pytest_twisted.inlineCallbacks
def test_cname_loop_is_temporary(resolver):
    f = yield _failure(resolver.resolve_addresses("loop1.example.test"))
    assert f.check(DNSTemporaryError) and "CNAME" in f.value.reply.text
    assert f.value.reply.status == "4.4.3"


@pytest_twisted.inlineCallbacks
def test_refused_zone_and_timeout_are_temporary(resolver, pool):
    from twisted.internet import reactor
    f = yield _failure(resolver.resolve_mx("other.invalid"))
    assert f.check(DNSTemporaryError) and "SERVFAIL" in f.value.reply.text
    silent = DNSResolver(reactor, pool, [("127.0.0.1", free_port())], timeout=0.5)
    f = yield _failure(silent.resolve_mx("example.test"))
    assert f.check(DNSTemporaryError) and "timeout" in f.value.reply.text.lower()


def test_parse_nameservers():
    assert parse_nameservers(("127.0.0.1", "127.0.0.1:5353", "[::1]:53", "::1")) == [
        ("127.0.0.1", 53), ("127.0.0.1", 5353), ("::1", 53), ("::1", 53)]
    with pytest.raises(ValueError):
        parse_nameservers(("dns.example",))


# ---------------------------------------------------------------- MX routing in the connector


def _request(rcpt: str) -> DeliveryRequest:
    r = Recipient(rcpt)
    return DeliveryRequest("Q", Envelope("s@example.org", [r], size=10), (r,),
                           lambda: io.BytesIO(b"Subject: x\r\n\r\nhi\r\n"))


def _connector(resolver: DNSResolver, port: int) -> SMTPSendConnector:
    from twisted.internet import reactor
    cfg = SendConnectorConfig(name="internet", port=port, tls="none", connect_timeout=3.0)
    return SMTPSendConnector(cfg, reactor, reactor, resolver, "exmta.test",
                             timeouts=ClientTimeouts.uniform(3.0), idle_timeout=0)


@pytest_twisted.inlineCallbacks
def test_mx_walk_in_preference_order(resolver):
    from twisted.internet import reactor
    port = free_port()
    servers = {ip: ScriptedServer() for ip in ("127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.8")}
    for ip, s in servers.items():
        s.listen(reactor, ip, port)
    try:
        conn = _connector(resolver, port)
        # mx1a (127.0.0.2) is down, mx1b (127.0.0.3) is up: it takes the mail, mx2 never sees it;
        # over 6 runs the shuffle sometimes tries mx1a first and fails over
        for _ in range(6):
            [r] = yield conn.deliver(_request("a@example.test"))
            assert r.outcome is Outcome.DELIVERED
            assert r.remote_host == f"mx1b.example.test[127.0.0.3]:{port}"
        assert servers["127.0.0.4"].sessions == []
        # lower preference dead (127.0.0.7): the backup MX takes it
        [r] = yield conn.deliver(_request("a@down.example.test"))
        assert r.outcome is Outcome.DELIVERED and r.remote_host.startswith("alive.example.test[127.0.0.8]")
        # implicit MX: the A record of the domain
        [r] = yield conn.deliver(_request("a@implicit.example.test"))
        assert r.remote_host == f"implicit.example.test[127.0.0.5]:{port}"
        # MX through a CNAME chain
        [r] = yield conn.deliver(_request("a@viacname.example.test"))
        assert r.remote_host == f"cname1.example.test[127.0.0.6]:{port}"
        # an IPv6-only MX host
        v6 = ScriptedServer()
        v6.listen(reactor, "::1", port)
        servers["::1"] = v6
        [r] = yield conn.deliver(_request("a@v6.example.test"))
        assert r.outcome is Outcome.DELIVERED and r.remote_host == f"v6host.example.test[::1]:{port}"
        yield conn.close()
    finally:
        for s in servers.values():
            yield s.stop()
    assert len(servers["127.0.0.3"].sessions) == 6


@pytest_twisted.inlineCallbacks
def test_mx_failures_become_results(resolver):
    conn = _connector(resolver, free_port())
    [r] = yield conn.deliver(_request("a@nullmx.example.test"))
    assert (r.outcome, r.reply.code, r.reply.status) == (Outcome.FAILED, 556, "5.1.10")
    [r] = yield conn.deliver(_request("a@nosuch.example.test"))
    assert r.outcome is Outcome.FAILED and r.reply.status == "5.4.4"
    [r] = yield conn.deliver(_request("a@noaddr.example.test"))
    assert r.outcome is Outcome.FAILED and r.reply.status == "5.4.4"
    [r] = yield conn.deliver(_request("a@loop1.example.test"))
    assert r.outcome is Outcome.DEFERRED and r.reply.status == "4.4.3"
    # all MX hosts refuse connections: deferred
    [r] = yield conn.deliver(_request("a@example.test"))
    assert r.outcome is Outcome.DEFERRED and r.reply.status == "4.4.1"
