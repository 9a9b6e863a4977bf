"""The outbound header firewall: organisation headers leave only through trusted send connectors."""
from __future__ import annotations

import io
import smtplib
from collections.abc import Callable

import pytest
from twisted.internet.defer import Deferred, ensureDeferred

from exmta.config.load import parse_config
from exmta.model import DeliveryRequest, Envelope, Recipient
from exmta.send.header_firewall import OutboundHeaderFirewall, attach_header_firewalls, strip_header_section
from exmta.send.smtp import SMTPSendConnector

ORG = (b"X-MS-Exchange-Organization-AuthAs: Internal\r\n"
       b"X-MS-Exchange-Organization-SCL: -1\r\n"
       b"x-ms-exchange-forest-rulesexecuted: contoso\r\n"
       b"X-MS-Exchange-CrossPremises-AuthSource: ex1.contoso.example\r\n"
       b"X-MS-Exchange-Organization-Network-Message-Id:\r\n"
       b"\t6a3f0c2e-0000-4000-8000-000000000001\r\n")
MESSAGE = (b"Received: from ex1 by mx; Mon, 7 Dec 2026 08:00:00 +0000\r\n" + ORG
           + b"From: a@contoso.example\r\nSubject: hi\r\n"
           + b"X-MS-Exchange-Transport-EndToEndLatency: kept\r\n\r\n"
           + b"X-MS-Exchange-Organization-AuthAs: body text, not a header\r\n" + b"x" * 200_000 + b"\r\n")


def result_of(d: Deferred) -> object:
    out: list[object] = []
    d.addBoth(out.append)
    assert out, "the Deferred did not fire"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()  # type: ignore[attr-defined]
    return out[0]


def request(content: bytes) -> DeliveryRequest:
    env = Envelope(sender="a@contoso.example", recipients=[Recipient("b@fabrikam.example")], queue_id="Q1")
    return DeliveryRequest("Q1", env, tuple(env.recipients), lambda: io.BytesIO(content))


def test_strip_removes_the_three_families_with_their_continuation_lines() -> None:
    head, removed = strip_header_section(MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    assert removed == 5
    assert b"organization" not in head.lower() and b"crosspremises" not in head.lower()
    assert b"forest" not in head.lower() and b"6a3f0c2e" not in head
    assert head.startswith(b"Received: from ex1") and head.endswith(b"EndToEndLatency: kept\r\n\r\n")


def test_prepare_rewrites_only_the_header_section() -> None:
    fw = OutboundHeaderFirewall("internet")
    out = result_of(ensureDeferred(fw.prepare(request(MESSAGE))))
    with out.open_content() as f:  # type: ignore[attr-defined]
        got = f.read()
    head, body = MESSAGE.split(b"\r\n\r\n", 1)
    assert got == strip_header_section(head + b"\r\n\r\n")[0] + body
    assert b"X-MS-Exchange-Organization-AuthAs: body text" in got  # the body is never touched
    with out.open_content() as f:  # type: ignore[attr-defined]
        assert b"".join(iter(lambda: f.read(7), b"")) == got  # small reads too


@pytest.mark.parametrize("content", [
    b"From: a@contoso.example\r\nSubject: hi\r\n\r\nbody\r\n",
    b"\r\nno header section\r\n\r\nX-MS-Exchange-Organization-AuthAs: Internal\r\n",  # body text stays
    b"X-MS-Exchange-Organization-AuthAs: Internal\r\nSubject: all header, no body\r\n",
    b"",
])
def test_messages_without_organisation_headers_in_the_header_section_are_unchanged(content: bytes) -> None:
    req = result_of(ensureDeferred(OutboundHeaderFirewall("internet").prepare(request(content))))
    with req.open_content() as f:  # type: ignore[attr-defined]
        got = f.read()
    if content.startswith(b"X-MS"):
        assert got == b"Subject: all header, no body\r\n"
    else:
        assert got == content


def test_one_read_gives_the_whole_message_as_the_dkim_signer_reads_it() -> None:
    req = result_of(ensureDeferred(OutboundHeaderFirewall("internet").prepare(request(MESSAGE))))
    with req.open_content() as f:  # type: ignore[attr-defined]
        whole = f.read(len(MESSAGE) + 1)
        assert f.read(10) == b""
    assert whole.endswith(b"x" * 200_000 + b"\r\n") and b"AuthAs: Internal" not in whole


def test_only_untrusted_smtp_connectors_get_a_firewall() -> None:
    config = parse_config({
        "receive": {"in": {"listen": ["tcp:2525:interface=127.0.0.1"]}},
        "send": {"internet": {}, "hybrid": {"smarthosts": ["ex1.contoso.example"],
                                            "send_organization_headers": True},
                 "mailbox": {"type": "lmtp", "lmtp": "127.0.0.1:24"}},
    })
    connectors = {sc.name: SMTPSendConnector(sc, None, None, None, "mx") for sc in config.send}
    attach_header_firewalls(config, connectors)
    assert isinstance(connectors["internet"].header_firewall, OutboundHeaderFirewall)
    assert connectors["hybrid"].header_firewall is None
    assert connectors["mailbox"].header_firewall is None  # mailbox delivery keeps them, as Exchange does


def test_the_setting_must_be_a_boolean() -> None:
    from exmta.config.load import ConfigError

    with pytest.raises(ConfigError, match="send.hybrid.send_organization_headers: expected true or false"):
        parse_config({"receive": {"in": {}}, "send": {"hybrid": {"send_organization_headers": "yes"}}})


TOML = """
[server]
hostname = "mx.contoso.example"
data_dir = "{data_dir}"

[accepted_domains]
"contoso.example" = "authoritative"

[receive.exchange]
listen = ["tcp:{port}:interface=127.0.0.1"]
remote_ranges = ["127.0.0.1/32"]
externally_secured = true
permission_groups = ["exchange_servers"]

[send.internet]
smarthosts = ["{internet}"]
tls = "none"

[send.hybrid]
smarthosts = ["{hybrid}"]
tls = "none"
send_organization_headers = true

[[route]]
domains = ["contoso.example"]
connector = "hybrid"

[[route]]
domains = ["*"]
connector = "internet"

[queue]
retry_schedule = ["1s"]
"""


@pytest.mark.integration
def test_delivery_keeps_headers_toward_the_hybrid_hop_and_strips_them_toward_the_internet(
        smtp_sink_factory: Callable[..., object], exmta_factory: Callable[..., object]) -> None:
    internet, hybrid = smtp_sink_factory(), smtp_sink_factory()
    exmta = exmta_factory(toml=TOML, subst={"internet": internet.next_hop, "hybrid": hybrid.next_hop})
    message = (b"From: ex1@contoso.example\r\n" + ORG + b"Subject: both ways\r\n\r\nhello\r\n")
    with smtplib.SMTP(exmta.host, exmta.port, timeout=30) as s:
        s.sendmail("ex1@contoso.example", ["alice@contoso.example", "bob@fabrikam.example"], message)
    (to_internet,) = internet.wait_for_rcpts(["bob@fabrikam.example"])
    (to_hybrid,) = hybrid.wait_for_rcpts(["alice@contoso.example"])
    assert b"x-ms-exchange-" not in to_internet.content.lower()
    assert b"Subject: both ways" in to_internet.content
    for line in ORG.split(b"\r\n")[:4]:
        assert line in to_hybrid.content
    assert b"\t6a3f0c2e-0000-4000-8000-000000000001" in to_hybrid.content
