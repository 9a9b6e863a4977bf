"""``exmta diagnose`` against a matrix of planted faults, and a correct set-up that passes.

Everything is real and on loopback: Knot serves the signed zone diag.test,
unbound validates it (and answers the PTR of 127.0.0.1 itself), aiosmtpd
hosts answer SMTP with certificates of a test CA (root -> intermediate ->
leaf), a local HTTPS host serves the MTA-STS policies.  The command runs
in a thread (it blocks, as on a terminal) while the reactor serves HTTPS.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import ssl
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import threads

from exmta.cli import main
from exmta.send.dkim_sign import generate_key
from support import dnssec
from support.policyhost import PolicyHost, policy
from support.procs import free_port
from support.sinks import SmtpSink
from support.tlscerts import TestPKI

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not dnssec.available(), reason="knotd, keymgr or unbound not installed")]


def _spki_sha256(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _txt(value: str) -> str:
    return " ".join(f'"{value[i:i + 200]}"' for i in range(0, len(value), 200))


class Lab:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        now = datetime.datetime.now(datetime.timezone.utc)
        root = trustme.CA(organization_name="exmta diagnose root")
        inter = root.create_child_ca()
        self.ca_file = tmp / "root.pem"
        root.cert_pem.write_to_path(str(self.ca_file))
        names = ["mx.good.diag.test", "mx.tlsa.diag.test"]
        good = inter.issue_cert(*names)
        expired = inter.issue_cert("mx.expired.diag.test", not_before=now - datetime.timedelta(days=40),
                                   not_after=now - datetime.timedelta(days=2))
        wrong = inter.issue_cert("wrong.example")
        files = {}
        for label, leaf, with_chain in (("good", good, True), ("leafonly", good, False), ("expired", expired, True),
                                        ("wrong", wrong, True)):
            pems = leaf.cert_chain_pems if with_chain else leaf.cert_chain_pems[:1]
            cert = tmp / f"{label}.pem"
            cert.write_bytes(b"".join(p.bytes() for p in pems))
            key = tmp / f"{label}.key"
            leaf.private_key_pem.write_to_path(str(key))
            files[label] = (cert, key)
        # a chain out of order: leaf, an unrelated CA, then the real intermediate
        disordered = tmp / "disordered.pem"
        disordered.write_bytes(good.cert_chain_pems[0].bytes() + trustme.CA().cert_pem.bytes()
                               + good.cert_chain_pems[1].bytes())
        files["disordered"] = (disordered, files["good"][1])
        self.files = files
        good_pem = good.cert_chain_pems[0].bytes()
        other_pem = wrong.cert_chain_pems[0].bytes()
        # DKIM: our key for good.diag.test and dkim.diag.test; dkim.diag.test publishes another one
        ours_private, ours_public = generate_key("rsa-sha256", 2048)
        _other_private, other_public = generate_key("rsa-sha256", 1024)
        self.dkim_key = tmp / "dkim.pem"
        self.dkim_key.write_bytes(ours_private)
        includes = " ".join(f"include:i{n}.diag.test" for n in range(11))
        records = [
            # the correct set-up
            "good MX 10 mx.good", "mx.good A 127.0.0.2",
            f"_25._tcp.mx.good TLSA 3 1 1 {_spki_sha256(good_pem)}",
            'good TXT "v=spf1 ip4:127.0.0.0/8 -all"',
            '_dmarc.good TXT "v=DMARC1; p=reject; rua=mailto:dmarc@good.diag.test"',
            f"sel1._domainkey.good TXT {_txt('v=DKIM1; k=rsa; p=' + ours_public.decode())}",
            '_mta-sts.good TXT "v=STSv1; id=1"', "mta-sts.good A 127.0.0.1",
            '_smtp._tls.good TXT "v=TLSRPTv1; rua=mailto:tlsrpt@good.diag.test"',
            # a null MX (RFC 7505): no mail, and that is not a fault
            "nullmx MX 0 .", 'nullmx TXT "v=spf1 -all"',
            # wrong MX: a host that does not exist
            "wrongmx MX 10 mail.nowhere", 'wrongmx TXT "v=spf1 -all"',
            # SPF over 10 lookups
            "spf MX 10 mx.good", f'spf TXT "v=spf1 {includes} -all"',
            *[f'i{n} TXT "v=spf1 -all"' for n in range(11)],
            # DKIM key that is not ours
            "dkim MX 10 mx.good", f"sel1._domainkey.dkim TXT {_txt('v=DKIM1; k=rsa; p=' + other_public.decode())}",
            # MTA-STS policy that does not list the MX
            "stsmx MX 10 mx.good", '_mta-sts.stsmx TXT "v=STSv1; id=1"', "mta-sts.stsmx A 127.0.0.1",
            # TLSA that does not match the live certificate
            "tlsa MX 10 mx.tlsa", "mx.tlsa A 127.0.0.2", f"_25._tcp.mx.tlsa TLSA 3 1 1 {_spki_sha256(other_pem)}",
        ]
        self.zone = dnssec.SignedZone(tmp, "diag.test", "\n".join(records) + "\n").start()
        self.unbound = dnssec.Unbound(tmp, self.zone).start()
        self.dns = f"127.0.0.1:{self.unbound.port}"
        self.port = free_port("127.0.0.2")
        self.sinks = [
            SmtpSink(host=f"127.0.0.{i}", port=self.port, tls_context=self._ctx(label)).start()
            for i, label in ((2, "good"), (3, "leafonly"), (4, "expired"), (5, "wrong"), (6, "disordered"))
        ]
        pki = TestPKI(tmp / "https")  # the policy host's certificate, from the root as well
        self.https_ca = pki.ca_file
        self.host = PolicyHost(pki, ["mta-sts.good.diag.test", "mta-sts.stsmx.diag.test"])
        self.host.policies["mta-sts.good.diag.test"] = (200, "text/plain", policy("enforce", "mx.good.diag.test"))
        self.host.policies["mta-sts.stsmx.diag.test"] = (200, "text/plain", policy("enforce", "mx.other.example"))
        self.bundle = tmp / "bundle.pem"
        self.bundle.write_bytes(self.ca_file.read_bytes() + pki.ca_file.read_bytes())

    def _ctx(self, label: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert, key = self.files[label]
        ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def config(self, name: str, **send: str) -> Path:
        cert, key = self.files["good"]
        extra = "".join(f'{k} = "{v}"\n' for k, v in send.items())
        text = f"""
[server]
hostname = "mx.good.diag.test"
data_dir = "{self.tmp / 'data'}"

[receive.inbound]
listen = ["tcp:{self.port}:interface=127.0.0.2"]
hostname = "mx.good.diag.test"

[receive.inbound.tls]
cert = "{cert}"
key = "{key}"

[send.relay]
type = "smtp"
smarthosts = ["127.0.0.2:{self.port}"]
tls = "mandatory"
dns_servers = ["{self.dns}"]
{extra}
[dkim]
keys = [{{ domain = "good.diag.test", selector = "sel1", key_file = "{self.dkim_key}" }},
        {{ domain = "dkim.diag.test", selector = "sel1", key_file = "{self.dkim_key}" }}]
"""
        path = self.tmp / f"{name}.toml"
        path.write_text(text)
        return path

    def stop(self) -> None:
        for s in self.sinks:
            s.stop()
        self.unbound.stop()
        self.zone.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("diag"))
    try:
        yield lab
    finally:
        lab.stop()


def run(*argv: str) -> tuple[int, dict[str, Any]]:
    """``exmta diagnose ... --json`` in this thread; (exit status, parsed JSON)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["diagnose", *argv, "--json", "--timeout", "5"])
    return rc, json.loads(out.getvalue())


def codes(report: dict[str, Any], status: str = "error") -> set[str]:
    return {f.get("code", "") for f in report["findings"] if f["status"] == status}


def domain_args(lab: Lab, domain: str, *more: str) -> list[str]:
    return [domain, "--dns-server", lab.dns, "--dane-resolver", lab.dns, "--port", str(lab.port),
            "--https-port", str(lab.host.port_number), "--ca-file", str(lab.bundle), "--no-versions", *more]


@pytest_twisted.inlineCallbacks
def test_domain_matrix(lab: Lab) -> None:
    from twisted.internet import reactor

    lab.host.listen(reactor)
    try:
        cfg = str(lab.config("domains"))
        good = yield threads.deferToThread(run, *domain_args(lab, "good.diag.test", "--config", cfg,
                                                              "--ip", "127.0.0.1"))
        faults = {}
        for domain, extra in (("wrongmx", ()), ("spf", ()), ("dkim", ("--config", cfg)), ("stsmx", ()),
                              ("tlsa", ()), ("nullmx", ())):
            faults[domain] = yield threads.deferToThread(run, *domain_args(lab, f"{domain}.diag.test", *extra))
        # --config alone: the validating resolver and the roots of its [tls_policy]
        with_policy = lab.tmp / "with-policy.toml"
        with_policy.write_text(Path(cfg).read_text() + f'\n[tls_policy]\ndane = true\ndane_resolvers = ["{lab.dns}"]\n'
                               f'ca_file = "{lab.bundle}"\n')
        argv = domain_args(lab, "tlsa.diag.test", "--config", str(with_policy))
        for flag in ("--dane-resolver", "--ca-file"):
            del argv[argv.index(flag):argv.index(flag) + 2]
        from_config = yield threads.deferToThread(run, *argv)
    finally:
        yield lab.host.stop()
    rc, report = good
    assert report["verdict"] == "ok" and rc == 0, json.dumps(report, indent=1)
    checks = {f["check"] for f in report["findings"]}
    for needed in ("MX", "SPF", "DKIM sel1", "DMARC", "MTA-STS", "MTA-STS MX", "TLS-RPT", "reverse DNS",
                   "mx.good.diag.test: DANE", "mx.good.diag.test: chain", "mx.good.diag.test: name"):
        assert needed in checks, needed
    assert any("published key is our signing key" in f["detail"] for f in report["findings"])
    assert any("forward-confirmed" in f["detail"] for f in report["findings"])
    expected = {"wrongmx": "mx-no-address", "spf": "spf-lookup-limit", "dkim": "dkim-key-mismatch",
                "stsmx": "sts-mx-mismatch", "tlsa": "tlsa-mismatch"}
    for domain, code in expected.items():
        rc, report = faults[domain]
        assert rc == 2 and code in codes(report), (domain, json.dumps(report, indent=1))
    rc, report = from_config
    assert rc == 2 and "tlsa-mismatch" in codes(report), json.dumps(report, indent=1)
    _rc, report = faults["nullmx"]
    assert "null-mx" in codes(report, "ok") and not {"no-mx", "mx-no-address"} & codes(report)


def test_host_matrix(lab: Lab) -> None:
    ca = ["--ca-file", str(lab.ca_file), "--name", "mx.good.diag.test"]
    rc, good = run(f"127.0.0.2:{lab.port}", *ca)
    assert rc == 0 and good["verdict"] == "ok", json.dumps(good, indent=1)
    details = " ".join(f["detail"] for f in good["findings"])
    assert "TLS 1.2" in details and "trusted (2 certificate(s) sent)" in details
    planted = {
        "missing-intermediate": (f"127.0.0.3:{lab.port}", ca),
        "cert-expired": (f"127.0.0.4:{lab.port}", ["--ca-file", str(lab.ca_file), "--name", "mx.expired.diag.test",
                                                   "--no-versions"]),
        "san-mismatch": (f"127.0.0.5:{lab.port}", [*ca, "--no-versions"]),
        "port-closed": (f"127.0.0.1:{free_port()}", ca),
    }
    for code, (target, extra) in planted.items():
        rc, report = run(target, *extra)
        assert rc == 2 and code in codes(report), (code, json.dumps(report, indent=1))
    # a chain in the wrong order still verifies here, but is worth a warning
    rc, report = run(f"127.0.0.6:{lab.port}", *ca, "--no-versions")
    assert rc == 1 and codes(report, "warning") == {"chain-order"}, json.dumps(report, indent=1)
    # expiry within --warn-days is a warning (exit 1), not an error
    rc, report = run(f"127.0.0.2:{lab.port}", *ca, "--no-versions", "--warn-days", "400000")
    assert rc == 1 and "cert-expiring" in codes(report, "warning")
    # a trusted chain from a CA the system does not know: not trusted without --ca-file
    rc, report = run(f"127.0.0.2:{lab.port}", "--name", "mx.good.diag.test", "--no-versions")
    assert "untrusted" in codes(report)


def test_from_connector_uses_its_tls_settings(lab: Lab) -> None:
    good = lab.config("conn-good", tls_auth_level="domain", tls_domain="mx.good.diag.test",
                      tls_ca_file=str(lab.ca_file))
    rc, report = run("--config", str(good), "--from-connector", "relay", "--no-versions")
    assert rc == 0, json.dumps(report, indent=1)
    wrong = lab.config("conn-wrong", tls_auth_level="domain", tls_domain="smtp.other.example",
                       tls_ca_file=str(lab.ca_file))
    rc, report = run("--config", str(wrong), "--from-connector", "relay", "--no-versions")
    assert rc == 2 and "san-mismatch" in codes(report)
    rc = main(["diagnose", "--config", str(good), "--from-connector", "nope"])
    assert rc == 3


def test_config_mode(lab: Lab, tmp_path: Path) -> None:
    rc, report = run("--config", str(lab.config("cfg-good")), "--ca-file", str(lab.ca_file))
    assert rc == 0, json.dumps(report, indent=1)
    broken = lab.config("cfg-broken").read_text()
    cert, key = lab.files["leafonly"]
    broken = broken.replace(str(lab.files["good"][0]), str(cert)).replace(
        f"127.0.0.2:{lab.port}\"]\ntls", f"127.0.0.1:{free_port()}\"]\ntls").replace(
        f"tcp:{lab.port}:interface=127.0.0.2", f"tcp:{free_port()}:interface=127.0.0.1")
    path = tmp_path / "broken.toml"
    path.write_text(broken)
    rc, report = run("--config", str(path), "--ca-file", str(lab.ca_file))
    assert rc == 2
    assert {"missing-intermediate", "next-hop-unreachable"} <= codes(report), json.dumps(report, indent=1)
    assert "port-closed" in codes(report, "warning")


def test_table_output(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["diagnose", f"127.0.0.5:{lab.port}", "--ca-file", str(lab.ca_file), "--name", "mx.good.diag.test",
               "--no-versions", "--timeout", "5"])
    out = capsys.readouterr().out
    assert rc == 2
    assert "ERROR   name" in out and "fix: add mx.good.diag.test to the certificate's subjectAltName" in out
    assert out.rstrip().endswith("warning(s)") and "ERROR: " in out




def test_docs_examples(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/diagnose.rst: the monitoring command line, and the missing-intermediate output."""
    import re
    import shlex

    doc = (Path(__file__).resolve().parents[2] / "docs" / "diagnose.rst").read_text()
    command = doc.split("A check for Icinga or Nagios is just::\n\n", 1)[1].split("\n\n", 1)[0].strip()
    argv = shlex.split(command)[1:]
    argv[1] = f"127.0.0.2:{lab.port}"  # the documented host, here: the lab's correct one
    assert main([*argv, "--ca-file", str(lab.ca_file), "--name", "mx.good.diag.test"]) == 0
    capsys.readouterr()
    block = doc.split("test servers)::\n\n", 1)[1].split("\n\n", 1)[0]
    expected = [line[4:] for line in block.splitlines()]
    assert main(["diagnose", f"127.0.0.3:{lab.port}", "--ca-file", str(lab.ca_file), "--name",
                 "mx.good.diag.test", "--no-versions"]) == 2
    out = [" ".join(got.split()) for got in capsys.readouterr().out.replace(str(lab.port), "PORT").splitlines()]
    for line in expected:
        pattern = re.escape(" ".join(line.split())).replace(r"\.\.\.", ".*")
        assert any(re.fullmatch(pattern, got) for got in out), (line, out)
