"""Real milters from Debian on loopback through the real SMTP server and the milter filter:
OpenDKIM signs (verified by exmta's own DKIM verifier against a local Knot), clamav-milter
refuses EICAR (in front of a test clamd with a hand-made database)."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread

from exmta.dns import AuthDNS
from exmta.routing.dns import DNSResolver
from exmta.filters.dkim_verify import verify_all
from support import clamd as clamd_support
from support import knot
from support import milters
from tests.milter.harness import make_server, send

pytestmark = pytest.mark.integration

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: u@example.test\r\nSubject: signed through a milter\r\n"
           b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\nMessage-ID: <m1@example.test>\r\n\r\n"
           b"Hello,\r\nthis body is signed by OpenDKIM.\r\n")


@pytest.mark.skipif(not milters.opendkim_available(), reason="opendkim is not installed (scripts/deps-milter.sh)")
@pytest_twisted.inlineCallbacks
def test_opendkim_signs_through_the_milter(tmp_path):
    signer = milters.OpenDKIM(tmp_path / "dkim")
    yield deferToThread(signer.start)
    try:
        factory, store = make_server(reactor, [{"name": "opendkim", "socket": signer.socket,
                                                "default_action": "tempfail"}])
        line = yield ensureDeferred(send(reactor, factory, MESSAGE))
    finally:
        yield deferToThread(signer.stop)
    assert line.startswith(b"250 "), line + signer.process.log_tail().encode()
    [queue_id] = store.queue_ids()
    with store.open_content(queue_id) as f:
        stored = f.read()
    assert stored.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test;")
    assert b"\r\n\ts=sel1;" in stored.split(b"\r\n\r\n")[0]  # opendkim folds with LF: stored as CRLF
    record = f'sel1._domainkey IN TXT "{signer.txt}"\n'
    server = yield deferToThread(lambda: knot.KnotServer(tmp_path, {"example.test": record}).start())
    try:
        dns = AuthDNS(DNSResolver(None, None, server.nameservers, timeout=3.0))
        results = yield deferToThread(verify_all, dns, stored)
        tampered = stored.replace(b"signed by OpenDKIM", b"signed by someone")
        bad = yield deferToThread(verify_all, dns, tampered)
    finally:
        yield deferToThread(server.stop)
    assert [(r.result, r.domain, r.selector) for r in results] == [("pass", "example.test", "sel1")]
    assert [r.result for r in bad] == ["fail"]


@pytest.mark.skipif(not (milters.clamav_milter_available() and clamd_support.available()),
                    reason="clamav-milter or clamd is not installed (scripts/deps-milter.sh, scripts/deps-clamav.sh)")
@pytest_twisted.inlineCallbacks
def test_clamav_milter_refuses_eicar(tmp_path):
    clamd = clamd_support.Clamd(tmp_path / "clamd")
    (tmp_path / "clamd").mkdir()
    yield deferToThread(clamd.start)
    cm = milters.ClamavMilter(tmp_path / "cm", clamd.endpoint)
    (tmp_path / "cm").mkdir()
    try:
        yield deferToThread(cm.start)
        factory, store = make_server(reactor, [{"name": "clamav", "socket": cm.socket}])
        eicar = (b"From: a@example.test\r\nTo: u@example.test\r\nSubject: eicar\r\n\r\n"
                 + clamd_support.EICAR + b"\r\n")
        line = yield ensureDeferred(send(reactor, factory, eicar))
        assert line.startswith(b"5"), line
        assert store.queue_ids() == []
        clean = b"From: a@example.test\r\nTo: u@example.test\r\nSubject: clean\r\n\r\nnothing here\r\n"
        line = yield ensureDeferred(send(reactor, factory, clean))
        assert line.startswith(b"250 "), line
        [queue_id] = store.queue_ids()
        with store.open_content(queue_id) as f:
            stored = f.read()
        assert b"X-Virus-Status: Clean" in stored and stored.endswith(b"\r\n\r\nnothing here\r\n")
        # clamd gone: clamav-milter defers (OnFail Defer), which is a 4xx, never a 5xx
        yield deferToThread(clamd.stop)
        line = yield ensureDeferred(send(reactor, factory, clean))
        assert line.startswith(b"4"), line
    finally:
        yield deferToThread(cm.stop)
        yield deferToThread(clamd.close)
