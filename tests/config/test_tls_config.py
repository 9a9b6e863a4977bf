"""TLS settings of receive and send connectors: parsed, validated, certificates checked at load time."""
from __future__ import annotations

import pytest
from support.tlscerts import TestPKI

from exmta.cli import main as exmta_cli
from exmta.config.load import ConfigError, load_config

BASE = """
[receive.in]
listen = ["tcp:2600:interface=127.0.0.1"]
{receive_extra}

[send.out]
smarthosts = ["[127.0.0.1]:2601"]
{send_extra}

[[route]]
domains = ["*"]
connector = "out"
"""


def write(tmp_path, receive_extra="", send_extra=""):
    path = tmp_path / "exmta.toml"
    path.write_text(BASE.format(receive_extra=receive_extra, send_extra=send_extra))
    return str(path)


@pytest.fixture
def pki(tmp_path):
    return TestPKI(tmp_path / "pki")


def problems_of(path):
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_no_tls_table_means_no_tls(tmp_path):
    config = load_config(write(tmp_path))
    rc = config.receive[0]
    assert rc.tls is None and rc.require_tls is False
    sc = config.send[0]
    assert (sc.tls, sc.tls_auth_level, sc.tls_domain, sc.tls_certificate) == ("opportunistic", "encryption_only",
                                                                              None, None)


def test_every_receive_tls_key(tmp_path, pki):
    main = pki.server("mx.example.test")
    other = pki.server("mail.fabrikam.test", "*.fabrikam.test")
    extra = f"""
require_tls = true
[receive.in.tls]
cert = "{main.cert}"
key = "{main.key}"
implicit = true
min_version = "1.3"
ciphers = "ECDHE+AESGCM"
legacy_networks = ["192.0.2.0/24"]
plaintext_networks = ["198.51.100.7"]
client_certificate = "require"
client_ca = "{pki.ca_file}"
client_names = ["mail.protection.outlook.com", "*.partner.test"]
reload_interval = "5m"
[[receive.in.tls.sni]]
names = ["mail.fabrikam.test"]
cert = "{other.cert}"
key = "{other.key}"
"""
    rc = load_config(write(tmp_path, receive_extra=extra)).receive[0]
    assert rc.require_tls is True
    tls = rc.tls
    assert tls.certificate.cert == str(main.cert) and tls.certificate.key == str(main.key)
    assert tls.implicit and tls.min_version == "1.3" and tls.ciphers == "ECDHE+AESGCM"
    assert tls.legacy_networks == ("192.0.2.0/24",)
    assert tls.plaintext_networks == ("198.51.100.7/32",)
    assert tls.client_certificate == "require" and tls.client_ca == str(pki.ca_file)
    assert tls.client_names == ("mail.protection.outlook.com", "*.partner.test")
    assert tls.reload_interval == 300.0
    assert [(s.cert, s.names) for s in tls.sni] == [(str(other.cert), ("mail.fabrikam.test",))]


def test_key_may_live_in_the_certificate_file(tmp_path, pki):
    files = pki.server("mx.example.test")
    combined = tmp_path / "combined.pem"
    combined.write_bytes(files.combined)
    rc = load_config(write(tmp_path, receive_extra=f'[receive.in.tls]\ncert = "{combined}"')).receive[0]
    assert rc.tls.certificate.key is None


def test_expired_certificate_is_refused_naming_the_file(tmp_path, pki):
    files = pki.server("old.example.test", expired=True)
    problems = problems_of(write(tmp_path, receive_extra=f'[receive.in.tls]\ncert = "{files.cert}"\n'
                                                           f'key = "{files.key}"'))
    assert len(problems) == 1
    assert problems[0].startswith(f"receive.in.tls.cert: {files.cert}: certificate ")
    assert "expired on" in problems[0]


def test_not_yet_valid_certificate_is_refused(tmp_path, pki):
    files = pki.server("new.example.test", future=True)
    [problem] = problems_of(write(tmp_path, receive_extra=f'[receive.in.tls]\ncert = "{files.cert}"\n'
                                                            f'key = "{files.key}"'))
    assert problem.startswith(f"receive.in.tls.cert: {files.cert}:") and "is not valid before" in problem


def test_key_that_does_not_match_is_refused(tmp_path, pki):
    a = pki.server("a.example.test")
    b = pki.server("b.example.test")
    [problem] = problems_of(write(tmp_path, receive_extra=f'[receive.in.tls]\ncert = "{a.cert}"\nkey = "{b.key}"'))
    assert problem.startswith(f"receive.in.tls.cert: {b.key}: the private key does not match the certificate")
    assert str(a.cert) in problem


def test_missing_and_garbage_files(tmp_path, pki):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    files = pki.server("mx.example.test")
    extra = f"""[receive.in.tls]
cert = "{tmp_path / 'missing.pem'}"
[[receive.in.tls.sni]]
cert = "{garbage}"
[[receive.in.tls.sni]]
cert = "{files.cert}"
"""
    problems = problems_of(write(tmp_path, receive_extra=extra))
    assert f"receive.in.tls.cert: {tmp_path / 'missing.pem'}: certificate file does not exist (relative paths are " \
        f"relative to the configuration file's directory {tmp_path})" in problems
    assert any(p.startswith(f"receive.in.tls.sni[1].cert: {garbage}: no PEM certificate") for p in problems)
    assert any(p.startswith(f"receive.in.tls.sni[2].cert: {files.cert}: no PEM private key") for p in problems)


def test_encrypted_key_is_refused_with_a_reason(tmp_path, pki):
    from cryptography.hazmat.primitives import serialization

    files = pki.server("mx.example.test")
    key = serialization.load_pem_private_key(files.key.read_bytes(), None)
    enc = tmp_path / "enc.key"
    enc.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(b"secret")))
    [problem] = problems_of(write(tmp_path, receive_extra=f'[receive.in.tls]\ncert = "{files.cert}"\nkey = "{enc}"'))
    assert problem == f"receive.in.tls.cert: {enc}: the private key is encrypted; exmta needs it unencrypted " \
                      "(protect it with file permissions)"


def test_receive_tls_value_errors_all_reported(tmp_path, pki):
    files = pki.server("mx.example.test")
    extra = f"""[receive.in.tls]
cert = "{files.cert}"
key = "{files.key}"
min_version = "1.0"
ciphers = "NOTACIPHER"
legacy_networks = ["not-a-net"]
client_certificate = "maybe"
reload_interval = "soon"
colour = "blue"
"""
    problems = problems_of(write(tmp_path, receive_extra=extra))
    prefixes = ["receive.in.tls.min_version: must be one of", "receive.in.tls.ciphers: 'NOTACIPHER' is not",
                "receive.in.tls.legacy_networks:", "receive.in.tls.client_certificate: must be one of",
                "receive.in.tls.reload_interval:", "receive.in.tls.colour: unknown setting"]
    for prefix in prefixes:
        assert any(p.startswith(prefix) for p in problems), (prefix, problems)
    assert len(problems) == len(prefixes)


def test_require_tls_needs_a_certificate(tmp_path):
    [problem] = problems_of(write(tmp_path, receive_extra="require_tls = true"))
    assert problem.startswith("receive.in.require_tls: needs a [receive.NAME.tls] section")


def test_partner_connector_needs_names_or_private_ca(tmp_path, pki):
    files = pki.server("mx.example.test")
    [problem] = problems_of(write(tmp_path, receive_extra=f'[receive.in.tls]\ncert = "{files.cert}"\n'
                                                            f'key = "{files.key}"\nclient_certificate = "require"'))
    assert problem.startswith("receive.in.tls.client_names: client_certificate = \"require\" needs client_names")
    [problem] = problems_of(write(tmp_path, receive_extra=f'[receive.in.tls]\ncert = "{files.cert}"\n'
                                                            f'key = "{files.key}"\nclient_certificate = "request"'))
    assert problem.startswith("receive.in.tls.client_names: client_certificate = \"request\" needs client_names")


def test_send_tls_keys(tmp_path, pki):
    client = pki.client("relay.example.test")
    extra = f"""tls = "mandatory"
tls_auth_level = "domain"
tls_domain = "mail.protection.outlook.com"
tls_ca_file = "{pki.ca_file}"
tls_certificate = "{client.cert}"
tls_key = "{client.key}"
"""
    sc = load_config(write(tmp_path, send_extra=extra)).send[0]
    assert (sc.tls, sc.tls_auth_level, sc.tls_domain) == ("mandatory", "domain", "mail.protection.outlook.com")
    assert (sc.tls_ca_file, sc.tls_certificate, sc.tls_key) == (str(pki.ca_file), str(client.cert),
                                                                 str(client.key))


def test_send_tls_validation_needs_mandatory_and_good_files(tmp_path, pki):
    expired = pki.client("relay.example.test", expired=True)
    extra = f"""tls = "opportunistic"
tls_auth_level = "certificate"
tls_domain = "x.example.test"
tls_ca_file = "{tmp_path / 'nope.pem'}"
tls_certificate = "{expired.cert}"
tls_key = "{expired.key}"
"""
    problems = problems_of(write(tmp_path, send_extra=extra))
    assert any(p.startswith("send.out.tls_auth_level: 'certificate' needs tls = \"mandatory\"") for p in problems)
    assert any(p.startswith("send.out.tls_domain: is only used with tls_auth_level = \"domain\"") for p in problems)
    assert any(p.startswith(f"send.out.tls_ca_file: {tmp_path / 'nope.pem'}: the CA file does not exist "
                            "(relative paths") for p in problems)
    assert any(p.startswith(f"send.out.tls_certificate: {expired.cert}: certificate") and "expired" in p
               for p in problems)
    assert len(problems) == 4


def test_check_config_command_names_the_bad_certificate(tmp_path, pki, capsys):
    files = pki.server("old.example.test", expired=True)
    path = write(tmp_path, receive_extra=f'[receive.in.tls]\ncert = "{files.cert}"\nkey = "{files.key}"')
    assert exmta_cli(["check-config", path]) == 2
    err = capsys.readouterr().err
    assert f"receive.in.tls.cert: {files.cert}: certificate" in err and "expired on" in err


def test_example_file_documents_every_tls_key():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "etc" / "exmta.toml").read_text()
    for key in ("require_tls", "implicit", "min_version", "legacy_networks", "plaintext_networks",
                "client_certificate", "client_ca", "client_names", "reload_interval", "[[receive.",
                "tls_auth_level", "tls_domain", "tls_ca_file", "tls_certificate", "tls_key"):
        assert key in text, key
