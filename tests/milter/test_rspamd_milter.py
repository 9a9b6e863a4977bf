"""rspamd 3.4 from Debian as a milter (its proxy worker in milter mode) through exmta's milter client:
the same rspamd the `rspamd` HTTP filter uses, seen the way Postfix's smtpd_milters see it.

The test rule of support.rspamd picks the verdict: ``EXMTA-TEST-SCORE=N`` adds N (reject at 15), and
``EXMTA-TEST-SOFT-REJECT`` is rspamd's soft reject.
"""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread

from support import rspamd as rspamd_support
from tests.milter.harness import make_server, send

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not rspamd_support.available(), reason="rspamd is not installed "
                                 "(scripts/deps-rspamd.sh)")]


def message(marker: str) -> bytes:
    return (b"From: Alice <alice@example.test>\r\nTo: u@example.test\r\nSubject: through rspamd's milter\r\n"
            b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\nMessage-ID: <rm1@example.test>\r\n\r\n"
            + marker.encode() + b"\r\n")


@pytest_twisted.inlineCallbacks
def test_rspamd_proxy_in_milter_mode(tmp_path, request):
    cache = getattr(request.config, "cache", None)
    hs_cache = cache.mkdir("rspamd-hs") if cache is not None else None  # shared with tests/spam
    server = rspamd_support.Rspamd(tmp_path / "rspamd", milter=True, cache_dir=hs_cache)
    yield deferToThread(server.start)
    try:
        factory, store = make_server(reactor, [{"name": "rspamd", "socket": server.milter_endpoint,
                                                "default_action": "tempfail"}])
        clean = yield ensureDeferred(send(reactor, factory, message("nothing to see")))
        spam = yield ensureDeferred(send(reactor, factory, message(rspamd_support.SPAM_MARK.format(score=20))))
        soft = yield ensureDeferred(send(reactor, factory, message(rspamd_support.SOFT_REJECT_MARK)))
        log = server.log()
    finally:
        yield deferToThread(server.close)
    assert clean.startswith(b"250 "), clean + log[-2000:].encode()
    [queue_id] = store.queue_ids()  # only the clean message was queued
    with store.open_content(queue_id) as f:
        stored = f.read()
    head = stored.split(b"\r\n\r\n")[0]
    assert b"\r\nX-Spam-Status: No, score=" in b"\r\n" + head, head  # milter_headers, added through the milter
    assert stored.endswith(b"\r\n\r\nnothing to see\r\n")
    assert spam.startswith(b"5"), spam  # rspamd's reject action, as the milter's own reply
    assert soft.startswith(b"4"), soft  # soft reject is a tempfail, never a 5xx
    assert "accepted milter connection" in log
