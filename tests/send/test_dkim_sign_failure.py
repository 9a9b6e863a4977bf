"""Issue 10 item 3: a DKIM signing failure defers the message (logged) unless the key says
on_failure = "send_unsigned"; through the real SMTP send connector to an aiosmtpd sink."""
from __future__ import annotations

import io
import tomllib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from exmta.config.load import ConfigError, parse_config
from exmta.config.schema import SendConnectorConfig, SmartHost
from exmta.model import DeliveryRequest, Envelope, Outcome, Recipient
from exmta.send.dkim_sign import DKIMKey, DKIMSigner, generate_key, signer_from_config
from exmta.send.smtp import SMTPSendConnector
from exmta.smtp.client import ClientTimeouts

pytestmark = pytest.mark.integration

MESSAGE = b"From: a@example.test\r\nTo: b@example.net\r\nSubject: s\r\n\r\nbody\r\n"


def request() -> DeliveryRequest:
    rcpt = Recipient("b@example.net")
    env = Envelope("a@example.test", [rcpt], queue_id="Q1", size=len(MESSAGE))
    return DeliveryRequest("Q1", env, (rcpt,), lambda: io.BytesIO(MESSAGE))


def broken_key(on_failure: str = "defer") -> DKIMKey:
    """A key that dkimpy cannot use: signing raises (as a corrupted or rotated-away key file would)."""
    return DKIMKey("example.test", "s1", "rsa-sha256", b"-----BEGIN RSA PRIVATE KEY-----\nbroken\n", on_failure)


def connector(port: int, signer: DKIMSigner) -> SMTPSendConnector:
    from twisted.internet import reactor
    cfg = SendConnectorConfig(name="out", smarthosts=(SmartHost("127.0.0.1", port),), tls="none",
                              connect_timeout=5.0)
    conn = SMTPSendConnector(cfg, reactor, reactor, None, "exmta.test", timeouts=ClientTimeouts.uniform(5.0))
    conn.signer = signer
    return conn


@pytest_twisted.inlineCallbacks
def test_signing_failure_defers_by_default(smtp_sink: Any) -> None:
    conn = connector(smtp_sink.port, DKIMSigner([broken_key()]))
    [result] = yield conn.deliver(request())
    yield conn.close()
    assert result.outcome is Outcome.DEFERRED
    assert (result.reply.code, result.reply.status) == (451, "4.7.5")
    assert "DKIM signing for example.test failed" in result.reply.text
    assert smtp_sink.messages == []  # nothing left unsigned


@pytest_twisted.inlineCallbacks
def test_signing_failure_sends_unsigned_when_the_key_says_so(smtp_sink: Any) -> None:
    conn = connector(smtp_sink.port, DKIMSigner([broken_key("send_unsigned")]))
    [result] = yield conn.deliver(request())
    yield conn.close()
    assert result.outcome is Outcome.DELIVERED
    [got] = smtp_sink.messages
    assert got.content == MESSAGE and b"DKIM-Signature" not in got.content


def test_on_failure_is_read_from_the_config_and_checked(tmp_path: Path) -> None:
    rsa, _ = generate_key("rsa-sha256", 1024)
    (tmp_path / "s1.pem").write_bytes(rsa)
    base = f"""
[server]
hostname = "mx.example.test"
data_dir = "{tmp_path}"
[receive.in]
listen = ["tcp:2525:interface=127.0.0.1"]
[send.out]
type = "smtp"
smarthosts = ["127.0.0.1:2526"]
dkim_sign = true
[dkim]
"""
    config = parse_config(tomllib.loads(base + 'keys = [{ domain = "example.test", selector = "s1", '
                                               'key_file = "s1.pem" }]\n'))
    assert config.dkim_keys[0].on_failure == "defer"
    assert signer_from_config(config).keys["example.test"][0].on_failure == "defer"
    config = parse_config(tomllib.loads(base + 'keys = [{ domain = "example.test", selector = "s1", '
                                               'key_file = "s1.pem", on_failure = "send_unsigned" }]\n'))
    assert signer_from_config(config).keys["example.test"][0].on_failure == "send_unsigned"
    with pytest.raises(ConfigError) as e:
        parse_config(tomllib.loads(base + 'keys = [{ domain = "example.test", selector = "s1", '
                                          'key_file = "s1.pem", on_failure = "bounce" }]\n'))
    assert "dkim.keys[1].on_failure" in str(e.value)
