"""docs/exchange-online.rst as written: every TOML block checked, the worked example run both directions.

The worked example runs with test certificates (a trustme CA stands in for the
public CA), loopback addresses for the Exchange servers (127.0.0.2), the
scanners (127.0.0.1, where the start-up check connects from) and Exchange Online (127.0.0.3), and aiosmtpd sinks for
the Exchange servers and for Exchange Online (STARTTLS with a certificate for
mail.protection.outlook.com that requires our client certificate). Nothing
else is changed.
"""
from __future__ import annotations

import json
import re
import shlex
import smtplib
import ssl
import textwrap
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from exmta.cli import main
from exmta.config.load import load_config, parse_config
from support import procs
from support.tlscerts import TestPKI

DOC = Path(__file__).resolve().parents[2] / "docs" / "exchange-online.rst"
FIXTURES = Path(__file__).parent / "fixtures"
ORG = "X-MS-Exchange-Organization-AuthAs: Internal"
DIRECT_SEND_REJECTED = ("550 5.7.68 TenantInboundAttribution; Direct Send not allowed for this organization "
                        "from unauthorized sources")


def blocks(kind: str) -> list[str]:
    text = DOC.read_text()
    return [textwrap.dedent(m.group(1)) for m in
            re.finditer(rf"\.\. code-block:: {kind}\n\n((?:    .*\n|\n)+)", text)]


def literal_after(phrase: str) -> str:
    text = DOC.read_text()
    start = text.index(phrase)
    m = re.compile(r"::\n\n((?:    .*\n|\n)+)").search(text, start)
    assert m, phrase
    return textwrap.dedent(m.group(1))


@pytest.fixture
def example(tmp_path: Path) -> tuple[str, TestPKI]:
    """The worked example with the certificate paths pointing at test certificates."""
    pki = TestPKI(tmp_path / "pki")
    cert = pki.server("mail.contoso.com")
    text = blocks("toml")[0]
    text = text.replace("/etc/exmta/tls/mail.contoso.com.pem", str(cert.cert))
    text = text.replace("/etc/exmta/tls/mail.contoso.com.key", str(cert.key))
    return text.replace("/var/lib/exmta", str(tmp_path / "data")), pki


def test_every_toml_block_is_a_valid_configuration(example: tuple[str, TestPKI]) -> None:
    text, _ = example
    config = parse_config(tomllib.loads(text))
    assert [r.name for r in config.receive] == ["from-exchange", "scanners", "from-exo"]
    assert [s.name for s in config.send] == ["to-exo", "exchange", "internet"]
    base = '[accepted_domains]\n"contoso.com" = "authoritative"\n[receive.in]\n[send.internet]\n'
    fragments = blocks("toml")[1:]
    assert len(fragments) == 3
    for fragment in fragments:
        try:  # on top of the worked example, or on a minimal base where it redefines a connector
            merged = tomllib.loads(text + "\n" + fragment)
        except tomllib.TOMLDecodeError:
            merged = tomllib.loads(base + fragment)
        parse_config(merged)


def test_the_console_commands(example: tuple[str, TestPKI], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    text, pki = example
    path = tmp_path / "exmta.toml"
    path.write_text(text)
    (console,) = blocks("console")
    commands = [line.split() for line in console.splitlines() if line.strip()]
    assert commands == [["exmta", "check-config", "/etc/exmta/exmta.toml"],
                        ["exmta", "exo", "check", "/etc/exmta/exmta.toml"]]
    assert main(["check-config", str(path)]) == 0
    # the test CA stands in for the public CA that signs the real certificate
    assert main(["exo", "check", str(path), "--ca-file", str(pki.ca_file)]) == 0
    out = capsys.readouterr().out
    assert "OK      send.to-exo [domain] certificate name mail.contoso.com is under accepted domain contoso.com" in out
    assert "0 error(s), 0 warning(s)" in out


def test_the_import_command_as_documented(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = TestPKI(tmp_path / "pki")
    cert = pki.server("mail.contoso.com")
    from exmta.auth.users import UsersFile

    UsersFile(str(tmp_path / "users.jsonl")).write({})
    command = literal_after("then, with the certificate exported to PEM").replace("\\\n", " ")
    assert shlex.split(command.splitlines()[0])[:3] == ["exmta", "import", "exchange"]
    files = {"receive.json": "receive-connectors.json", "send.json": "send-connectors.json",
             "domains.json": "accepted-domains.json"}
    args: list[str] = []
    argv = shlex.split(command.splitlines()[0])[3:]
    for a in argv:
        args.append(str(FIXTURES / files[a]) if a in files else
                    str(tmp_path / a) if a in ("exmta.toml", "users.jsonl") else
                    str(cert.cert) if a == "mail.contoso.com.pem" else
                    str(cert.key) if a == "mail.contoso.com.key" else a)
    assert main(["import", "exchange", *args, "--data-dir", str(tmp_path / "data")]) == 0
    assert "not mapped" in capsys.readouterr().err
    assert main(["check-config", str(tmp_path / "exmta.toml")]) == 0
    assert load_config(str(tmp_path / "exmta.toml")).send[-1].smarthosts[0].host == "ex1.contoso.com"


def tls_server_context(pki: TestPKI, *names: str) -> ssl.SSLContext:
    c = pki.server(*names)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(c.cert), str(c.key))
    ctx.load_verify_locations(str(pki.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED  # Exchange Online's inbound connector: our certificate or nothing
    return ctx


@pytest.mark.integration
def test_the_worked_example_both_directions(example: tuple[str, TestPKI], smtp_sink_factory: Callable[..., object],
                                            exmta_factory: Callable[..., object]) -> None:
    text, pki = example
    def exo_policy(rcpt: str) -> str | None:  # a tenant that rejects Direct Send, for one recipient
        return DIRECT_SEND_REJECTED if rcpt.startswith("dave@") else None

    exo = smtp_sink_factory(tls_context=tls_server_context(pki, "mail.protection.outlook.com",
                                                           "*.mail.protection.outlook.com"),
                            require_starttls=True, rcpt_policy=exo_policy)
    exchange = smtp_sink_factory()
    ca = str(pki.ca_file)
    text = (text.replace('"tcp:25"', '"tcp:{port}:interface=127.0.0.1"')
            .replace('remote_ranges = ["10.0.5.10/32", "10.0.5.11/32"]', 'remote_ranges = ["127.0.0.2/32"]')
            .replace('"192.168.5.0/24"', '"127.0.0.1/32"')
            .replace('["40.92.0.0/15", "40.107.0.0/16", "52.100.0.0/14", "104.47.0.0/17"]', '["127.0.0.3/32"]')
            .replace('client_names = ["mail.protection.outlook.com"]',
                     f'client_names = ["mail.protection.outlook.com"]\nclient_ca = "{ca}"')
            .replace('smarthosts = ["contoso-com.mail.protection.outlook.com"]',
                     f'smarthosts = ["{exo.next_hop}"]\ntls_ca_file = "{ca}"')
            .replace('smarthosts = ["ex1.contoso.com", "ex2.contoso.com"]', f'smarthosts = ["{exchange.next_hop}"]')
            .replace(str(Path(text.split('data_dir = "')[1].split('"')[0])), "{data_dir}"))
    text += "\n[admin]\nenabled = false\n[queue]\nretry_schedule = [\"1s\"]\n"
    ex = exmta_factory(toml=text)

    def send(source: str, rcpt: str, body: str, client_cert: object = None) -> None:
        with smtplib.SMTP(ex.host, ex.port, timeout=30, source_address=(source, 0)) as s:
            if client_cert is not None:
                ctx = ssl.create_default_context(cafile=ca)
                ctx.load_cert_chain(str(client_cert.cert), str(client_cert.key))  # type: ignore[attr-defined]
                s._host = "mail.contoso.com"  # type: ignore[attr-defined]
                s.starttls(context=ctx)
            s.sendmail("app@contoso.com", [rcpt], f"{ORG}\r\nSubject: {body}\r\n\r\n{body}\r\n".encode())

    # (1) + (2): an Exchange server -> exmta -> Exchange Online, headers kept, our certificate presented
    send("127.0.0.2", "alice@contoso.mail.onmicrosoft.com", "to the cloud")
    (to_cloud,) = exo.wait_for_rcpts(["alice@contoso.mail.onmicrosoft.com"])
    assert ORG.encode() in to_cloud.content
    # (4) + (5): Exchange Online (its client certificate) -> exmta -> the Exchange servers, headers kept
    send("127.0.0.3", "bob@contoso.com", "to on-premises", client_cert=pki.client("mail.protection.outlook.com"))
    # (3): a scanner relays anonymously; a forged organisation header does not survive
    send("127.0.0.1", "carol@contoso.com", "from a scanner")
    got = {m.rcpt_tos[0]: m for m in exchange.wait_for_rcpts(["bob@contoso.com", "carol@contoso.com"])}
    assert ORG.encode() in got["bob@contoso.com"].content
    assert b"X-MS-Exchange" not in got["carol@contoso.com"].content
    # a next hop that answers 5.7.68: the message fails with that reply, and the FAIL event carries it
    # (the bounce goes to app@contoso.com, on the Exchange servers: no DNS is asked)
    send("127.0.0.1", "dave@contoso.mail.onmicrosoft.com", "direct send")
    log = ex.data_dir / "log" / "tracking.jsonl"

    def fail_events() -> list[dict]:
        lines = log.read_text().splitlines() if log.exists() else []
        return [e for e in map(json.loads, lines)
                if e["event_id"] == "FAIL" and e["recipients"] == ["dave@contoso.mail.onmicrosoft.com"]]

    procs.wait_until(lambda: fail_events(), 15, "a FAIL event")
    (bounce,) = [m for m in exchange.wait_for_rcpts(["app@contoso.com"]) if m.rcpt_tos == ["app@contoso.com"]]
    assert b"5.7.68" in bounce.content
    (fail,) = fail_events()
    assert DIRECT_SEND_REJECTED in DOC.read_text().replace("\n    ", " ")  # the reply the page quotes
    assert fail["reply"].startswith("550 5.7.68 TenantInboundAttribution")
    # exmta refuses a partner that shows no certificate
    with smtplib.SMTP(ex.host, ex.port, timeout=30, source_address=("127.0.0.3", 0)) as s:
        s.ehlo()
        code, _ = s.mail("x@exo.example")
        assert code == 530
