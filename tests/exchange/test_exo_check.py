"""``exmta exo check``: each MC1226222 misconfiguration is reported, a correct connector passes."""
from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from exmta.cli import main
from exmta.exchange.exo_check import check_config_file
from support.tlscerts import TestPKI

GOOD = """
[server]
hostname = "mail.contoso.example"

[accepted_domains]
"contoso.example" = "authoritative"
"fabrikam.example" = "internal_relay"

[receive.in]
listen = ["tcp:2525:interface=127.0.0.1"]

[send.to-exo]
smarthosts = ["contoso-example.mail.protection.outlook.com"]
tls = "mandatory"
tls_auth_level = "domain"
tls_domain = "mail.protection.outlook.com"
tls_certificate = "{cert}"
tls_key = "{key}"

[send.internet]

[[route]]
domains = ["*"]
connector = "internet"
"""


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    return TestPKI(tmp_path / "pki")


def write(tmp_path: Path, text: str, **values: object) -> str:
    path = tmp_path / "exmta.toml"
    for k, v in values.items():
        text = text.replace("{" + k + "}", str(v))
    path.write_text(text)
    return str(path)


def run(path: str, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["exo", "check", path, *extra])
    return code, capsys.readouterr().out


def errors(path: str, pki: TestPKI, **kw: object) -> dict[str, list[str]]:
    report = check_config_file(path, ca_files=(str(pki.ca_file),), **kw)  # type: ignore[arg-type]
    out: dict[str, list[str]] = {}
    for f in report.findings:
        if f.severity == "error":
            out.setdefault(f.check, []).append(f.message)
            assert f.fix and "MC1226222" in f.reference or f.check == "config"
    return out


def test_a_correct_connector_passes(tmp_path: Path, pki: TestPKI, capsys: pytest.CaptureFixture[str]) -> None:
    c = pki.client("mail.contoso.example")
    path = write(tmp_path, GOOD, cert=c.cert, key=c.key)
    code, out = run(path, "--ca-file", str(pki.ca_file), capsys=capsys)
    assert code == 0, out
    assert "1 connector(s) toward Exchange Online, 0 error(s), 0 warning(s)" in out
    assert "certificate name mail.contoso.example is under accepted domain contoso.example" in out
    assert "ERROR" not in out and "WARNING" not in out


def test_wrong_san(tmp_path: Path, pki: TestPKI, capsys: pytest.CaptureFixture[str]) -> None:
    c = pki.client("relay.thirdparty.example", "smtp.thirdparty.example")
    path = write(tmp_path, GOOD, cert=c.cert, key=c.key)
    code, out = run(path, "--ca-file", str(pki.ca_file), capsys=capsys)
    assert code == 2
    assert "ERROR   send.to-exo [domain] none of the certificate's names (relay.thirdparty.example, " \
           "smtp.thirdparty.example) is an accepted domain (contoso.example, fabrikam.example)" in out
    assert "see: MC1226222" in out
    assert set(errors(path, pki)) == {"domain"}
    # the tenant's domain given on the command line makes it pass
    assert errors(path, pki, extra_domains=("thirdparty.example",)) == {}


def test_expired(tmp_path: Path, pki: TestPKI, capsys: pytest.CaptureFixture[str]) -> None:
    c = pki.client("mail.contoso.example", expired=True)
    path = write(tmp_path, GOOD, cert=c.cert, key=c.key)
    code, out = run(path, "--ca-file", str(pki.ca_file), capsys=capsys)
    assert code == 2
    found = errors(path, pki)
    assert set(found) == {"validity", "config"}  # check-config refuses it too
    assert "expired on" in found["validity"][0]
    assert "OK      send.to-exo [chain] chains to a trusted root" in out  # reported once, as expiry


def test_expiring_soon_is_a_warning(tmp_path: Path, pki: TestPKI, capsys: pytest.CaptureFixture[str]) -> None:
    c = pki.client("mail.contoso.example")
    path = write(tmp_path, GOOD, cert=c.cert, key=c.key)
    leaf = x509.load_pem_x509_certificates(c.cert.read_bytes())[0]
    later = leaf.not_valid_after_utc + datetime.timedelta(days=1)
    soon = leaf.not_valid_after_utc - datetime.timedelta(days=5)
    report = check_config_file(path, ca_files=(str(pki.ca_file),), now=soon)
    assert report.status == 1
    (warning,) = [f for f in report.findings if f.severity == "warning"]
    assert warning.check == "validity" and "expires in 5 day(s)" in warning.message
    assert check_config_file(path, ca_files=(str(pki.ca_file),), now=later).status == 2


def self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "self.pem", tmp_path / "self.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_self_signed_without_ca(tmp_path: Path, pki: TestPKI, capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = self_signed(tmp_path, "mail.contoso.example")
    path = write(tmp_path, GOOD, cert=cert, key=key)
    code, out = run(path, "--ca-file", str(pki.ca_file), capsys=capsys)
    assert code == 2
    found = errors(path, pki)
    assert set(found) == {"chain"}
    assert "is self-signed and" in found["chain"][0] and "public CA" in found["chain"][0]
    # the same certificate given as its own CA: trusted, so it passes
    assert check_config_file(path, ca_files=(str(cert),)).status == 0


def test_shared_certificate_between_tenants(tmp_path: Path, pki: TestPKI,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    c = pki.client("mail.contoso.example")
    second = GOOD.replace("[send.internet]", """[send.to-exo-fabrikam]
smarthosts = ["fabrikam-example.mail.protection.outlook.com"]
tls = "mandatory"
tls_auth_level = "domain"
tls_domain = "mail.protection.outlook.com"
tls_certificate = "{cert}"
tls_key = "{key}"

[send.internet]""")
    path = write(tmp_path, second, cert=c.cert, key=c.key)
    code, out = run(path, "--ca-file", str(pki.ca_file), capsys=capsys)
    assert code == 2
    found = errors(path, pki)
    assert set(found) == {"shared"}
    assert found["shared"] == [
        "the same certificate is used toward tenants contoso-example, fabrikam-example (also by send.to-exo-fabrikam)",
        "the same certificate is used toward tenants contoso-example, fabrikam-example (also by send.to-exo)"]
    # one connector serving both tenants is the same mistake
    both = GOOD.replace('"contoso-example.mail.protection.outlook.com"',
                        '"contoso-example.mail.protection.outlook.com", "fabrikam-example.mail.protection.outlook.com"')
    assert set(errors(write(tmp_path, both, cert=c.cert, key=c.key), pki)) == {"shared"}


def test_tls_not_mandatory(tmp_path: Path, pki: TestPKI, capsys: pytest.CaptureFixture[str]) -> None:
    c = pki.client("mail.contoso.example")
    text = GOOD.replace('tls = "mandatory"\ntls_auth_level = "domain"\ntls_domain = "mail.protection.outlook.com"\n',
                        'tls = "opportunistic"\n')
    path = write(tmp_path, text, cert=c.cert, key=c.key)
    code, out = run(path, "--ca-file", str(pki.ca_file), capsys=capsys)
    assert code == 2
    found = errors(path, pki)
    assert set(found) == {"tls"} and len(found["tls"]) == 2
    assert "tls = 'opportunistic'" in found["tls"][0]
    assert 'fix: set tls_auth_level = "domain" and tls_domain = "mail.protection.outlook.com"' in out
    # certificate validation without the domain is not enough either
    text = GOOD.replace('tls_auth_level = "domain"\ntls_domain = "mail.protection.outlook.com"',
                        'tls_auth_level = "certificate"')
    assert set(errors(write(tmp_path, text, cert=c.cert, key=c.key), pki)) == {"tls"}


def test_no_certificate_and_other_connectors_ignored(tmp_path: Path, pki: TestPKI,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    text = GOOD.replace('tls_certificate = "{cert}"\ntls_key = "{key}"\n', "")
    path = write(tmp_path, text)
    code, out = run(path, "--json", capsys=capsys)
    assert code == 2
    data = json.loads(out)
    assert data["connectors"] == ["to-exo"] and data["status"] == 2
    (missing,) = [f for f in data["findings"] if f["check"] == "certificate"]
    assert missing["severity"] == "error" and "TlsSenderCertificateName" in missing["fix"]
    nothing = write(tmp_path, GOOD.split("[send.to-exo]")[0] + "[send.internet]\n")
    assert run(nothing, capsys=capsys) == (0, f"{nothing}: no send connector has a smart host under "
                                              "*.mail.protection.outlook.com; nothing to check\n")


def test_exit_status_from_the_command_line(tmp_path: Path, pki: TestPKI) -> None:
    """What a monitoring system runs: the console entry point and its exit status."""
    c = pki.client("mail.contoso.example")
    path = write(tmp_path, GOOD, cert=c.cert, key=c.key)
    cmd = [sys.executable, "-c", "import sys; from exmta.cli import main; sys.exit(main())", "exo", "check", path]
    ok = subprocess.run([*cmd, "--ca-file", str(pki.ca_file)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # the test CA is not a public root
    assert bad.returncode == 2 and "[chain]" in bad.stdout
    missing = subprocess.run([*cmd[:-1], str(tmp_path / "nope.toml")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 3 and "UNKNOWN" in missing.stderr
