"""exmta's own client against exmta's server, in memory (twisted.test.iosim): both ends of the wire agree."""
from __future__ import annotations

import io

import pytest
from twisted.internet.task import Clock
from twisted.test.iosim import connectedServerAndClient

from exmta.config.schema import AcceptedDomain, Config, ReceiveConnectorConfig
from exmta.filters import FilterChain
from exmta.model import DeliveryRequest, Envelope, MailParams, Outcome, Recipient
from exmta.receive.policy import DefaultReceivePolicy
from exmta.smtp.client import SMTPClientProtocol
from exmta.smtp.server import ESMTPServerFactory
from exmta.testing.memstore import MemoryStore


def run_delivery(content: bytes, recipients: list[str], chunking: bool = True):
    clock = Clock()
    config = Config(hostname="mx.test", accepted_domains=(AcceptedDomain("local.test"),))
    rc = ReceiveConnectorConfig(name="default", hostname="mx.test", max_text_line=0)
    store = MemoryStore(clock)
    factory = ESMTPServerFactory(rc, DefaultReceivePolicy(config.accepted_domain, ()), FilterChain([], clock),
                                 store, clock)
    if not chunking:
        factory.disabled_extensions |= {"CHUNKING", "BINARYMIME"}
    client = SMTPClientProtocol(clock, "client.test", tls_mode="none")
    client, server, pump = connectedServerAndClient(lambda: factory.buildProtocol(None), lambda: client,
                                                    greet=False)
    established = client.establish()
    pump.flush()
    assert established.called
    envelope = Envelope(sender="a@sender.test", recipients=[Recipient(r) for r in recipients],
                        params=MailParams())
    request = DeliveryRequest("X1", envelope, tuple(envelope.recipients), lambda: io.BytesIO(content))
    results: list = []
    client.deliver(request).addBoth(results.append)
    for _ in range(200):
        if results:
            break
        pump.flush()
    assert results, "delivery did not finish"
    return results[0], store


@pytest.mark.parametrize("chunking", [True, False], ids=["BDAT", "DATA"])
@pytest.mark.parametrize("size", [10, 16_383, 16_384, 16_385, 100_000])
def test_client_to_server_content_is_identical(size, chunking):
    # dot lines placed around the client's 16 KiB read size (probe 8), CRLF only
    n = 2 ** 14
    lines = [b"Subject: t", b"", b".", b"A" * (n - 22), b".", b"..", b"RSET"]
    content = b"\r\n".join(lines) + b"\r\n"
    while len(content) < size:
        content += b"x" * 70 + b"\r\n"
    if size < len(content):
        content = content[:size].rsplit(b"\r\n", 1)[0] + b"\r\n"
    results, store = run_delivery(content, ["u@local.test", "v@elsewhere.test"], chunking)
    by_rcpt = {r.recipient: r for r in results}
    assert by_rcpt["u@local.test"].outcome is Outcome.DELIVERED
    assert by_rcpt["v@elsewhere.test"].outcome is Outcome.FAILED
    assert str(by_rcpt["v@elsewhere.test"].reply) == "554 5.7.1 Relay access denied"
    [queue_id] = store.queue_ids()
    stored = store.content(queue_id)
    assert stored.endswith(content)
    assert stored[: -len(content)].startswith(b"Received: from client.test")
