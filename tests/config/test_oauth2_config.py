"""auth = "xoauth2" on send connectors: parsed, and refused by check-config when a token could leak."""
from __future__ import annotations

import pytest

from exmta.cli import main as exmta_cli
from exmta.config.load import ConfigError, load_config

BASE = """
[receive.in]
listen = ["tcp:2600:interface=127.0.0.1"]

[send.exo]
smarthosts = ["smtp.office365.com:587"]
{send}

[[route]]
domains = ["*"]
connector = "exo"
"""

GOOD_SEND = """
tls = "mandatory"
tls_auth_level = "domain"
auth = "xoauth2"

[send.exo.oauth2]
tenant = "contoso.onmicrosoft.com"
client_id = "00000000-1111-2222-3333-444444444444"
client_secret_file = "{secret}"
mailbox = "relay@contoso.com"
"""


def write(tmp_path, send: str) -> str:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    path = tmp_path / "exmta.toml"
    path.write_text(BASE.format(send=send.replace("{secret}", str(secret))))
    return str(path)


def problems_of(path: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_entra_defaults(tmp_path) -> None:
    sc = load_config(write(tmp_path, GOOD_SEND)).send[0]
    assert sc.auth == "xoauth2"
    o = sc.oauth2
    assert o.token_endpoint == "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    assert o.scope == "https://outlook.office365.com/.default"
    assert (o.send_as, o.mailbox, o.refresh_before, o.timeout) == ("mailbox", "relay@contoso.com", 300.0, 30.0)


def test_check_config_accepts_it(tmp_path, capsys) -> None:
    assert exmta_cli(["check-config", write(tmp_path, GOOD_SEND)]) == 0


@pytest.mark.parametrize("tls", [
    'tls = "opportunistic"\ntls_auth_level = "encryption_only"',
    'tls = "mandatory"\ntls_auth_level = "encryption_only"',
    'tls = "none"',
])
def test_refused_without_validated_tls(tmp_path, capsys, tls: str) -> None:
    send = GOOD_SEND.replace('tls = "mandatory"\ntls_auth_level = "domain"', tls)
    problems = problems_of(write(tmp_path, send))
    assert any(p.startswith("send.exo.auth: \"xoauth2\" needs tls = \"mandatory\" and tls_auth_level = \"domain\"")
               for p in problems), problems
    assert exmta_cli(["check-config", write(tmp_path, send)]) != 0
    assert "never be sent in clear" in capsys.readouterr().err


@pytest.mark.parametrize("change, expected", [
    (('tenant = "contoso.onmicrosoft.com"', 'token_endpoint = "http://login.example.com/token"'),
     "send.exo.oauth2.token_endpoint: 'http://login.example.com/token': the client secret and the token would "
     "cross the network in clear; use https://"),
    (('client_secret_file = "{secret}"', 'client_secret = "a"\ncertificate = "/nonexistent.pem"'),
     "send.exo.oauth2: give exactly one of client_secret, client_secret_file or certificate "
     "(given: client_secret, certificate)"),
    (('client_secret_file = "{secret}"', ''),
     "send.exo.oauth2: give exactly one of client_secret, client_secret_file or certificate (given: none)"),
    (('client_secret_file = "{secret}"', 'certificate = "/nonexistent.pem"'),
     "send.exo.oauth2.certificate: /nonexistent.pem: cannot read: No such file or directory"),
    (('mailbox = "relay@contoso.com"', ''), "send.exo.oauth2.mailbox: is required: the mailbox to send as"),
    (('mailbox = "relay@contoso.com"', 'mailbox = "relay"'),
     "send.exo.oauth2.mailbox: 'relay' is not a mailbox address such as relay@contoso.com"),
    (('client_id = "00000000-1111-2222-3333-444444444444"', ''),
     "send.exo.oauth2.client_id: is required: the application (client) id of the app registration"),
    (('tenant = "contoso.onmicrosoft.com"', ''),
     "send.exo.oauth2.token_endpoint: give token_endpoint or tenant"),
    (('mailbox = "relay@contoso.com"', 'mailbox = "relay@contoso.com"\nsend_as = "anyone"'),
     "send.exo.oauth2.send_as: must be one of 'mailbox', 'sender'"),
    (('mailbox = "relay@contoso.com"', 'mailbox = "relay@contoso.com"\npasword = "x"'),
     "send.exo.oauth2.pasword: unknown setting"),
    (('auth = "xoauth2"', 'auth = "xoauth2"\nauth_username = "u"\nauth_password = "p"'),
     "send.exo.auth_username: cannot be used with auth = \"xoauth2\""),
])
def test_problems_name_the_key(tmp_path, change: tuple[str, str], expected: str) -> None:
    old, new = change
    assert old in GOOD_SEND
    problems = problems_of(write(tmp_path, GOOD_SEND.replace(old, new)))
    assert any(p.startswith(expected) for p in problems), problems


def test_oauth2_table_without_auth(tmp_path) -> None:
    problems = problems_of(write(tmp_path, GOOD_SEND.replace('auth = "xoauth2"', "")))
    assert 'send.exo.oauth2: is only used with auth = "xoauth2"' in problems


def test_xoauth2_without_table(tmp_path) -> None:
    send = GOOD_SEND.split("[send.exo.oauth2]")[0]
    problems = problems_of(write(tmp_path, send))
    assert any(p.startswith('send.exo.auth: "xoauth2" needs a [send.exo.oauth2] table') for p in problems)


def test_loopback_http_endpoint_is_allowed(tmp_path) -> None:
    send = GOOD_SEND.replace('tenant = "contoso.onmicrosoft.com"', 'token_endpoint = "http://127.0.0.1:8080/token"')
    assert load_config(write(tmp_path, send)).send[0].oauth2.token_endpoint == "http://127.0.0.1:8080/token"


def test_the_annotated_example_xoauth2_connector_loads(tmp_path) -> None:
    """etc/exmta.toml's commented [send.exo] XOAUTH2 connector, uncommented (one credential), is valid."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "etc" / "exmta.toml").read_text()
    start, end = text.index("# [send.exo]\n"), text.index("[send.local]")
    block = text[start:end]
    uncommented = re.sub(r"^# ([\[a-z_]+.*)$", r"\1", block, flags=re.M)
    secret = tmp_path / "exo-client-secret"
    secret.write_text("s3cret\n")
    uncommented = re.sub(r"^(certificate|private_key) = .*$", "", uncommented, flags=re.M)
    uncommented = uncommented.replace("/etc/exmta/exo-client-secret", str(secret))
    path = tmp_path / "example.toml"
    path.write_text(text.replace(block, uncommented))
    config = load_config(str(path))
    (sc,) = [s for s in config.send if s.name == "exo"]
    assert sc.auth == "xoauth2" and sc.tls == "mandatory" and sc.tls_auth_level == "domain"
    assert sc.oauth2.tenant == "contoso.onmicrosoft.com" and sc.oauth2.mailbox == "relay@contoso.example"
    assert sc.oauth2.token_endpoint.endswith("/contoso.onmicrosoft.com/oauth2/v2.0/token")
    assert (sc.oauth2.timeout, sc.oauth2.refresh_before) == (30.0, 300.0)
