"""Issue 10 item 5: a next hop that answers 4xx to every RCPT makes exmta try the next address
(RFC 5321 5.1), as a connection failure does; real aiosmtpd sinks on loopback."""
from __future__ import annotations

import io

import pytest
import pytest_twisted

from exmta.config.schema import SendConnectorConfig, SmartHost
from exmta.model import DeliveryRequest, Envelope, MailParams, Outcome, Recipient
from exmta.send.smtp import SMTPSendConnector
from exmta.smtp.client import ClientTimeouts
from support.smtp_peers import start_sink, stop_sink

pytestmark = pytest.mark.integration

BODY = b"From: s@example.org\r\nSubject: next address\r\n\r\nHello\r\n"
TEMPFAIL = "451 4.3.0 try again later"


def request(*rcpts: str) -> DeliveryRequest:
    recipients = tuple(Recipient(r) for r in rcpts)
    env = Envelope("s@example.org", list(recipients), params=MailParams(), queue_id="Q1", size=len(BODY))
    return DeliveryRequest("Q1", env, recipients, lambda: io.BytesIO(BODY))


def connector(*ports: int) -> SMTPSendConnector:
    from twisted.internet import reactor
    cfg = SendConnectorConfig(name="out", smarthosts=tuple(SmartHost("127.0.0.1", p) for p in ports),
                              tls="none", connect_timeout=5.0)
    return SMTPSendConnector(cfg, reactor, reactor, None, "exmta.test", timeouts=ClientTimeouts.uniform(5.0))


@pytest_twisted.inlineCallbacks
def test_every_rcpt_4xx_moves_on_to_the_next_smarthost():
    busy = yield start_sink(rcpt_policy=lambda addr: TEMPFAIL)
    good = yield start_sink()
    try:
        conn = connector(busy.port, good.port)
        first = yield conn.deliver(request("a@example.net", "b@example.net"))
        # the next message too: the tempfailing host's connection was not kept for reuse
        second = yield conn.deliver(request("c@example.net"))
        yield conn.close()
    finally:
        yield stop_sink(busy)
        yield stop_sink(good)
    assert [r.outcome for r in first] == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert first[0].remote_host.endswith(f":{good.port}")
    assert [m.rcpt_tos for m in good.messages] == [["a@example.net", "b@example.net"], ["c@example.net"]]
    assert second[0].outcome is Outcome.DELIVERED
    assert busy.messages == []


@pytest_twisted.inlineCallbacks
def test_every_host_4xx_defers_with_the_hosts_own_reply():
    busy1 = yield start_sink(rcpt_policy=lambda addr: TEMPFAIL)
    busy2 = yield start_sink(rcpt_policy=lambda addr: "452 4.2.2 mailbox full")
    try:
        conn = connector(busy1.port, busy2.port)
        results = yield conn.deliver(request("a@example.net"))
        yield conn.close()
    finally:
        yield stop_sink(busy1)
        yield stop_sink(busy2)
    [r] = results
    assert r.outcome is Outcome.DEFERRED
    assert (r.reply.code, r.reply.status) == (452, "4.2.2")  # the last host that answered
    assert r.remote_host.endswith(f":{busy2.port}")


@pytest_twisted.inlineCallbacks
def test_a_partly_accepted_recipient_list_is_not_sent_twice():
    """One RCPT accepted: the host took the message, the 4xx recipient waits for the retry."""
    mixed = yield start_sink(rcpt_policy=lambda addr: TEMPFAIL if addr.startswith("b@") else None)
    other = yield start_sink()
    try:
        conn = connector(mixed.port, other.port)
        results = yield conn.deliver(request("a@example.net", "b@example.net"))
        yield conn.close()
    finally:
        yield stop_sink(mixed)
        yield stop_sink(other)
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DEFERRED]
    assert other.messages == []
