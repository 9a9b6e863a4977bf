"""Protocol logs: record format, AUTH redaction, message data as a size, on server and client sessions."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from exmta.config.schema import AcceptedDomain, ReceiveConnectorConfig
from exmta.filters.base import FilterChain
from exmta.model import DeliveryRequest, Envelope, Recipient, Reply
from exmta.observe.protocol import ProtocolLog, ProtocolLogs, redact_command
from exmta.observe.rotation import RotatingLog
from exmta.receive.policy import DefaultReceivePolicy
from exmta.smtp.client import SMTPClientProtocol
from exmta.smtp.server import ESMTPServerFactory
from exmta.testing.memstore import MemoryStore


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_redact_command() -> None:
    assert redact_command("AUTH PLAIN AHVzZXIAcHc=") == "AUTH PLAIN <redacted>"
    assert redact_command("auth login dXNlcg==") == "auth login <redacted>"
    assert redact_command("AUTH LOGIN") == "AUTH LOGIN"
    assert redact_command("MAIL FROM:<a@b>") == "MAIL FROM:<a@b>"


def test_off_is_none_and_files_are_per_connector(tmp_path: Path) -> None:
    clock = Clock()
    logs = ProtocolLogs(str(tmp_path), clock)
    assert logs.get("receive", "default", "off") is None
    log = logs.get("receive", "default", "verbose")
    assert log is logs.get("receive", "default", "verbose")
    s = log.open_session("127.0.0.1:25", "[::1]:4000", "abc")
    s.end()
    logs.close()
    got = records(tmp_path / "receive-default.jsonl")
    assert [r["event"] for r in got] == ["connect", "disconnect"]
    assert got[0]["remote"] == "[::1]:4000" and got[0]["session"] == "abc" and got[0]["seq"] == 1


def _server(tmp_path: Path, clock: Clock) -> tuple[Any, StringTransport, MemoryStore]:
    config = ReceiveConnectorConfig(name="inbound", hostname="mx.test")
    accepted = (AcceptedDomain("local.test"),)

    def accepted_domain(d: str) -> Any:
        return next((a for a in accepted if a.matches(d)), None)

    store = MemoryStore(clock)
    factory = ESMTPServerFactory(config, DefaultReceivePolicy(accepted_domain, ()), FilterChain([], clock),
                                 store, clock, local_domain=lambda d: d == "local.test")
    factory.protocol_log = ProtocolLog("inbound", "receive", RotatingLog(str(tmp_path / "p.jsonl"), clock))
    addr = IPv4Address("TCP", "192.0.2.7", 40000)
    proto = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
    proto.makeConnection(transport)
    return proto, transport, store


def test_server_session_transcript(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(1_700_000_000)
    proto, transport, store = _server(tmp_path, clock)
    body = b"Subject: secret words\r\n\r\nthe body must not be logged\r\n"
    for line in (b"EHLO client.test\r\n", b"AUTH PLAIN AHVzZXIAcHc=\r\n", b"MAIL FROM:<a@remote.test>\r\n",
                 b"RCPT TO:<b@local.test>\r\n", b"DATA\r\n", body + b".\r\n", b"QUIT\r\n"):
        clock.advance(0.25)
        proto.dataReceived(line)
    proto.connectionLost(Failure(ConnectionDone()))
    proto.factory.protocol_log.close()
    got = records(tmp_path / "p.jsonl")
    text = (tmp_path / "p.jsonl").read_text()
    assert "AHVzZXIAcHc=" not in text and "secret words" not in text and "must not be logged" not in text
    assert [r["seq"] for r in got] == list(range(1, len(got) + 1))
    assert {r["session"] for r in got} == {proto.session.session_id}
    assert all(r["local"] == "127.0.0.1:25" and r["remote"] == "192.0.2.7:40000" for r in got)
    assert all(r["connector"] == "inbound" and r["direction"] == "receive" for r in got)
    flow = [(r["event"], r.get("line", "")) for r in got]
    assert flow[0] == ("connect", "")
    assert flow[1][0] == "reply" and flow[1][1].startswith("220 mx.test")
    assert ("command", "EHLO client.test") in flow
    assert ("command", "AUTH PLAIN <redacted>") in flow
    assert ("command", "MAIL FROM:<a@remote.test>") in flow
    data = next(r for r in got if r["event"] == "data")
    assert data["line"] == f"<{len(body)} octets>" and data["size"] == len(body)
    queued = got[got.index(data) + 1]
    assert queued["event"] == "reply" and queued["code"] == 250
    assert flow[-1] == ("disconnect", "")
    assert got[-2]["code"] == 221
    assert got[0]["ts"] == 1_700_000_000 and got[-1]["ts"] == 1_700_000_001.75


def test_sasl_exchange_redacted_both_ways(tmp_path: Path) -> None:
    clock = Clock()
    log = ProtocolLog("out", "send", RotatingLog(str(tmp_path / "s.jsonl"), clock))
    s = log.open_session("127.0.0.1:5000", "192.0.2.1:25")
    s.command("AUTH LOGIN")
    s.reply(Reply.make(334, None, "VXNlcm5hbWU6"))
    s.command("dXNlcg==")
    s.reply(Reply.make(334, None, "UGFzc3dvcmQ6"))
    s.command("cHc=")
    s.reply(Reply.make(235, "2.7.0", "Authentication successful"))
    s.command("MAIL FROM:<a@b.test>")
    log.close()
    lines = [r.get("line") for r in records(tmp_path / "s.jsonl")[1:]]
    assert lines == ["AUTH LOGIN", "334 <redacted>", "<redacted>", "334 <redacted>", "<redacted>",
                     "235 2.7.0 Authentication successful", "MAIL FROM:<a@b.test>"]


def test_client_session_transcript(tmp_path: Path) -> None:
    clock = Clock()
    log = ProtocolLog("relay", "send", RotatingLog(str(tmp_path / "c.jsonl"), clock))
    proto = SMTPClientProtocol(clock, "client.test", tls_mode="none", remote_host="mx.test[192.0.2.1]:25",
                               protocol_log=log)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 25),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 5000))
    proto.makeConnection(transport)
    d = proto.establish()
    proto.dataReceived(b"220 mx.test ESMTP\r\n")
    proto.dataReceived(b"250 mx.test\r\n")
    content = b"Subject: hidden\r\n\r\nbody text\r\n"
    env = Envelope(sender="s@example.org", recipients=[Recipient("a@example.net")], queue_id="Q1",
                   size=len(content))
    request = DeliveryRequest("Q1", env, tuple(env.recipients), lambda: io.BytesIO(content))
    results: list[Any] = []
    d.addCallback(lambda _: proto.deliver(request)).addBoth(results.append)
    proto.dataReceived(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n250 2.0.0 queued\r\n")
    assert results and isinstance(results[0], list), results
    proto.connectionLost(Failure(ConnectionDone()))
    log.close()
    got = records(tmp_path / "c.jsonl")
    assert got[0]["event"] == "connect" and got[0]["remote"] == "192.0.2.1:25"
    assert got[0]["remote_name"] == "mx.test[192.0.2.1]:25" and got[0]["direction"] == "send"
    flow = [(r["event"], r.get("line")) for r in got[1:]]
    assert flow[:3] == [("reply", "220 mx.test ESMTP"), ("command", "EHLO client.test"), ("reply", "250 mx.test")]
    assert ("command", "MAIL FROM:<s@example.org>") in flow
    assert ("data", f"<{len(content)} octets>") in flow
    assert flow[-1] == ("disconnect", None)
    assert "hidden" not in (tmp_path / "c.jsonl").read_text()
