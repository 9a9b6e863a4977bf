"""exmta dkim keygen / dns check / psl refresh, against Knot on loopback."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from exmta.cli import main
from exmta.dns import AuthDNS
from exmta.filters.dkim_verify import verify_all
from exmta.filters.psl import org_domain
from exmta.routing.dns import DNSResolver
from exmta.send.dkim_sign import load_key, sign_message
from support import authzones, knot
from support.authzones import message

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def knot_server(tmp_path_factory: pytest.TempPathFactory, keys: authzones.Keys) -> Iterator[knot.KnotServer]:
    zones = authzones.zones(keys)
    zones["weak.test"] = (
        '@ TXT "v=spf1 +all"\n@ TXT "google-site-verification=x"\n'
        '_dmarc TXT "v=DMARC1; p=none; pct=50; rua=https://example.test/r"\n'
        f'short._domainkey TXT {authzones.txt("v=DKIM1; k=rsa; p=" + keys.public["short"].decode())}\n'
        'bad._domainkey TXT "v=DKIM1; k=rsa; p=@@@"\n'
        'test._domainkey TXT "v=DKIM1; t=y; k=ed25519; p=' + keys.public["ed"].decode() + '"\n')
    zones["noauth.test"] = '@ A 127.0.0.9\n'
    zones["nullmx.test"] = '@ MX 0 .\n@ TXT "v=spf1 -all"\n_dmarc TXT "v=DMARC1; p=reject; rua=mailto:d@nullmx.test"\n'
    with knot.KnotServer(tmp_path_factory.mktemp("clidns"), zones) as server:
        yield server


def run(capsys: Any, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_dns_check_good_domain(knot_server: knot.KnotServer, capsys: Any) -> None:
    code, out = run(capsys, "dns", "check", "example.test", "--selector", "sel1", "--selector", "ed",
                    "--dns-server", f"127.0.0.1:{knot_server.port}", "--ip", "192.0.2.10")
    assert code == 0, out
    assert "OK    MX: 10 mx.example.test" in out
    assert "OK    SPF: 'v=spf1 ip4:192.0.2.0/24 -all' (0 of 10 DNS lookups)" in out
    assert "OK    SPF: mail from 192.0.2.10: pass" in out
    assert "OK    DKIM sel1: rsa key of 2048 bits" in out and "OK    DKIM ed: ed25519 key" in out
    assert "OK    DMARC: _dmarc.example.test: p=reject sp=quarantine pct=100 adkim=r aspf=r" in out
    assert out.rstrip().endswith("0 error(s), 0 warning(s)")


def test_dns_check_says_what_is_wrong(knot_server: knot.KnotServer, capsys: Any) -> None:
    code, out = run(capsys, "dns", "check", "weak.test", "--selector", "short", "--selector", "bad",
                    "--selector", "test", "--selector", "missing",
                    "--dns-server", f"127.0.0.1:{knot_server.port}")
    assert code == 1
    for line in (
        "WARN  MX: no MX and no address",
        "ERROR SPF: ends with +all",
        "WARN  DKIM short: RSA key of 1024 bits: use 2048",
        "ERROR DKIM bad: key record unusable",
        "WARN  DKIM test: t=y: testing mode",
        "ERROR DKIM missing: no TXT record at missing._domainkey.weak.test",
        "WARN  DMARC: policy none",
        "WARN  DMARC: pct=50",
        "ERROR DMARC: rua 'https://example.test/r' is not a mailto: URI",
    ):
        assert line in out, (line, out)


@pytest.mark.parametrize("domain,line", [
    ("toomany.spf.test", "ERROR SPF: 'v=spf1 include:l1"),
    ("two.spf.test", "ERROR SPF: 2 SPF records at two.spf.test"),
    ("tempinc.spf.test", "ERROR SPF: 'v=spf1 include:x.broken.test -all': lookups failed"),
    ("noauth.test", "ERROR SPF: no SPF record at noauth.test"),
    ("noauth.test", "ERROR DMARC: no DMARC record at _dmarc.noauth.test"),
    ("baddmarc.test", "ERROR DMARC: _dmarc.baddmarc.test: p='bogus' is not none, quarantine or reject"),
    ("x.broken.test", "ERROR SPF: DNS lookup failed (temperror at receivers)"),
    ("nullmx.test", "OK    MX: null MX (RFC 7505)"),
    ("sub.example.test", "OK    DMARC: _dmarc.example.test (organisational domain): p=reject sp=quarantine"),
])
def test_dns_check_findings(knot_server: knot.KnotServer, capsys: Any, domain: str, line: str) -> None:
    _, out = run(capsys, "dns", "check", domain, "--dns-server", f"127.0.0.1:{knot_server.port}")
    assert line in out, out


def test_dns_check_timeout_is_an_error_not_a_hang(capsys: Any) -> None:
    silent = authzones.SilentUDP()
    try:
        code, out = run(capsys, "dns", "check", "example.test", "--dns-server", f"127.0.0.1:{silent.port}",
                        "--timeout", "0.3")
    finally:
        silent.close()
    assert code == 1 and "ERROR MX: DNS lookup failed" in out and "ERROR DMARC: DNS lookup failed" in out


def test_keygen_record_published_in_knot_verifies(tmp_path: Path, capsys: Any) -> None:
    code, out = run(capsys, "dkim", "keygen", "--domain", "gen.test", "--selector", "k1",
                    "--out", str(tmp_path / "k1.pem"))
    assert code == 0
    assert stat.S_IMODE(os.stat(tmp_path / "k1.pem").st_mode) == 0o600
    record = out.strip().splitlines()[-1]
    assert record.startswith("k1._domainkey.gen.test. IN TXT (")
    code, out = run(capsys, "dkim", "keygen", "--domain", "gen.test", "--selector", "k2",
                    "--algorithm", "ed25519-sha256", "--out", str(tmp_path / "k2.key"))
    record2 = out.strip().splitlines()[-1]
    # publish the printed lines exactly as they are
    with knot.KnotServer(tmp_path, {"gen.test": record + "\n" + record2 + "\n"}) as server:
        dns = AuthDNS(DNSResolver(None, None, server.nameservers, timeout=3.0))
        k1 = load_key("gen.test", "k1", "rsa-sha256", str(tmp_path / "k1.pem"))
        k2 = load_key("gen.test", "k2", "ed25519-sha256", str(tmp_path / "k2.key"))
        results = verify_all(dns, sign_message(message(from_="a@gen.test"), [k1, k2]))
        assert [(r.result, r.selector) for r in results] == [("pass", "k1"), ("pass", "k2")]
        code, out = run(capsys, "dns", "check", "gen.test", "--selector", "k1", "--selector", "k2",
                        "--dns-server", f"127.0.0.1:{server.port}")
        assert "OK    DKIM k1: rsa key of 2048 bits" in out and "OK    DKIM k2: ed25519 key" in out


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "k.pem").write_text("old")
    code = main(["dkim", "keygen", "--domain", "gen.test", "--selector", "k", "--out", str(tmp_path / "k.pem")])
    assert code == 1 and (tmp_path / "k.pem").read_text() == "old"
    assert "exists" in capsys.readouterr().err


def test_exmta_command_has_the_subcommands() -> None:
    out = subprocess.run([sys.executable, "-m", "exmta", "--help"], capture_output=True, text=True, timeout=60)
    assert "dkim" in out.stdout and "dns" in out.stdout and "psl" in out.stdout


def test_psl_refresh_only_when_asked(tmp_path: Path, capsys: Any) -> None:
    from exmta.filters import psl

    source = tmp_path / "list.dat"
    source.write_text("// ===BEGIN ICANN DOMAINS===\ntest\nexample.test\n// ===END ICANN DOMAINS===\n")
    data = tmp_path / "data"
    code, out = run(capsys, "psl", "refresh", "--data", str(data), "--url", source.as_uri())
    assert code == 0 and (data / "public_suffix_list.dat").exists()
    assert org_domain("a.b.example.co.uk") == "example.co.uk"  # the packaged list before use_data_dir
    try:
        psl.use_data_dir(str(data))
        assert org_domain("a.b.example.test") == "b.example.test"  # example.test is a suffix in this list
    finally:
        psl._psl, psl._source = None, None
    bad = tmp_path / "bad.dat"
    bad.write_text("<html>not a list</html>")
    assert main(["psl", "refresh", "--data", str(data), "--url", bad.as_uri()]) == 1
