"""Interop: the SMTP send connector against a real Postfix smtpd (PIPELINING, CHUNKING, DSN).

Postfix is an independent implementation that offers everything our client
uses. One instance offers CHUNKING (BDAT path), the other has it switched
off (DATA path with dot-stuffing); both deliver to Maildirs we read back.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import pytest
import pytest_twisted
from twisted.internet import threads

from exmta.config.schema import SendConnectorConfig, SmartHost
from exmta.model import Body, DeliveryRequest, Envelope, MailParams, Outcome, Recipient
from exmta.send.smtp import SMTPSendConnector
from exmta.smtp.client import ClientTimeouts
from support import postfix

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not postfix.available(), reason="postfix not installed"),
]

BOUNDARY = 16 * 1024


def tricky_message(tag: str) -> bytes:
    head = f"From: s@example.org\r\nTo: a@example.test\r\nSubject: {tag}\r\n" \
           "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n" \
           "Content-Transfer-Encoding: 8bit\r\n\r\n".encode()
    filler = b"".join(b"line %05d ..........................................\r\n" % i for i in range(400))
    body = head + filler
    # a line holding only "." right after a 16 KiB boundary
    pad = BOUNDARY - (len(body) % BOUNDARY) - 2
    body += b"p" * pad + b"\r\n" if pad > 0 else b""
    assert len(body) % BOUNDARY == 0
    body += b".\r\nRSET\r\nMAIL FROM:<smuggled@evil.test>\r\n..\r\n.x\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    return body


def request(content: bytes, *rcpts: str) -> DeliveryRequest:
    rs = tuple(Recipient(r, notify=("FAILURE",), orcpt=f"rfc822;{r}") for r in rcpts)
    env = Envelope("s@example.org", list(rs), params=MailParams(body=Body.EIGHT_BIT, ret="HDRS", envid="E1"),
                   size=len(content))
    return DeliveryRequest("Q", env, rs, lambda: io.BytesIO(content))


def _instance(root: Path, chunking: bool) -> postfix.PostfixInstance:
    extra = {
        # leave our headers alone (127.0.0.1 is an inet interface: Postfix would add Date/Message-ID)
        "local_header_rewrite_clients": "",
        "smtpd_recipient_restrictions": "check_recipient_access inline:{ "
                                        "{ bad@example.test = 550 5.1.1 no such user }, "
                                        "{ soft@example.test = 450 4.2.1 mailbox busy } }",
    }
    if not chunking:
        extra["smtpd_discard_ehlo_keywords"] = "chunking"
    return postfix.PostfixInstance(root, maildir_domains=["example.test"],
                                   maildir_users=["a@example.test", "b@example.test"], main_cf=extra)


@pytest.fixture(scope="module", params=[True, False], ids=["bdat", "data"])
def pf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[postfix.PostfixInstance]:
    with _instance(tmp_path_factory.mktemp("postfix"), request.param) as inst:
        yield inst


def connector(port: int) -> SMTPSendConnector:
    from twisted.internet import reactor
    cfg = SendConnectorConfig(name="pf", smarthosts=(SmartHost("127.0.0.1", port),), tls="none")
    return SMTPSendConnector(cfg, reactor, reactor, None, "exmta.test", timeouts=ClientTimeouts.uniform(10.0))


@pytest_twisted.inlineCallbacks
def test_postfix_receives_exact_content(pf):
    content = tricky_message(f"interop {pf.port}")
    conn = connector(pf.port)
    results = yield conn.deliver(request(content, "a@example.test", "b@example.test"))
    yield conn.close()
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]
    for addr in ("a@example.test", "b@example.test"):
        [stored] = yield threads.deferToThread(pf.wait_maildir, addr, 1, 30.0)
        # Postfix stores LF line endings and adds Return-Path/Delivered-To/Received on top
        assert stored.replace(b"\n", b"\r\n").endswith(content)
    log = pf.log_text()
    assert "smuggled@evil.test" not in log


@pytest_twisted.inlineCallbacks
def test_postfix_per_recipient_replies(pf):
    conn = connector(pf.port)
    results = yield conn.deliver(request(b"Subject: t\r\n\r\nhi\r\n",
                                         "bad@example.test", "soft@example.test", "a@example.test"))
    yield conn.close()
    bad, soft, ok = results
    assert (bad.outcome, bad.reply.code, bad.reply.status) == (Outcome.FAILED, 550, "5.1.1")
    assert (soft.outcome, soft.reply.code, soft.reply.status) == (Outcome.DEFERRED, 450, "4.2.1")
    assert ok.outcome is Outcome.DELIVERED and "queued as" in ok.reply.text


@pytest_twisted.inlineCallbacks
def test_postfix_all_recipients_refused(pf):
    conn = connector(pf.port)
    results = yield conn.deliver(request(b"Subject: t\r\n\r\nhi\r\n", "bad@example.test"))
    assert results[0].outcome is Outcome.FAILED
    # the connection survived the refusal and is reused for the next message
    assert conn.idle_connections == 1
    again = yield conn.deliver(request(b"Subject: t2\r\n\r\nhi\r\n", "a@example.test"))
    yield conn.close()
    assert again[0].outcome is Outcome.DELIVERED
