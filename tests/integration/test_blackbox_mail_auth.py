"""Black box: ``twistd -n exmta`` with the mail authentication filters (their entry points, the real
thread pool) and DKIM signing, Knot as the DNS server, smtplib as the client, aiosmtpd as the next hop."""
from __future__ import annotations

import json
import smtplib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from exmta.dns import AuthDNS
from exmta.filters.dkim_verify import verify_all
from exmta.routing.dns import DNSResolver
from exmta.send.dkim_sign import generate_key, record_text
from support import authzones, exmta_proc, knot
from support.authzones import message

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_key() -> tuple[bytes, bytes]:
    return generate_key("rsa-sha256", 2048)


@pytest.fixture(scope="module")
def knot_server(tmp_path_factory: pytest.TempPathFactory, keys: authzones.Keys,
                local_key: tuple[bytes, bytes]) -> Iterator[knot.KnotServer]:
    zones = authzones.zones(keys)
    zones["local.test"] = (
        '@ TXT "v=spf1 ip4:127.0.0.0/8 -all"\n_dmarc TXT "v=DMARC1; p=reject"\n'
        f'out._domainkey TXT {authzones.txt(record_text("rsa-sha256", local_key[1]))}\n')
    with knot.KnotServer(tmp_path_factory.mktemp("bbdns"), zones) as server:
        yield server


def config(knot_port: int) -> str:
    dns = f'dns_servers = ["127.0.0.1:{knot_port}"]'
    filters = "".join(f'[filters.{n}]\nplugin = "{n}"\n{dns if n != "authres" else ""}\n'
                      for n in ("spf", "dkim", "arc", "dmarc", "authres"))
    return filters + """
[dkim]
keys = [{ domain = "local.test", selector = "out", key_file = "{workdir}/out.pem" }]
"""


@pytest.fixture
def server(tmp_path: Path, knot_server: knot.KnotServer, local_key: tuple[bytes, bytes], smtp_sink: Any,
           exmta_factory: Callable[..., exmta_proc.ExmtaProcess]) -> exmta_proc.ExmtaProcess:
    workdir = tmp_path / "exmta0"
    workdir.mkdir()
    (workdir / "out.pem").write_bytes(local_key[0])
    toml = exmta_proc.exmta_toml(
        smarthost=smtp_sink.next_hop,
        receive_extra='filters = ["spf", "dkim", "arc", "dmarc", "authres"]',
        extra=config(knot_server.port),
    ).replace('tls = "none"', 'tls = "none"\ndkim_sign = true')
    return exmta_factory(toml=toml, workdir=workdir)


def send(port: int, sender: str, rcpt: str, msg: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.local.test")
        code, text = c.mail(sender)
        if code != 250:
            return code, text
        code, text = c.rcpt(rcpt)
        if code != 250:
            return code, text
        return c.data(msg)


def wait_files(directory: Path, pattern: str, timeout: float = 20.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(directory.glob(pattern))
        if found:
            return found
        time.sleep(0.05)
    return []


def test_pass_reject_quarantine_and_signing(server: exmta_proc.ExmtaProcess, smtp_sink: Any,
                                            knot_server: knot.KnotServer) -> None:
    # SPF and DMARC pass: delivered with our Authentication-Results on top
    code, _ = send(server.port, "a@local.test", "bob@example.test", message(from_="a@local.test"))
    assert code == 250
    [stored] = wait_files(server.data_dir / "mail", "example.test/bob/new/*")
    head = stored.read_bytes().split(b"\n\n", 1)[0].replace(b"\r\n", b"\n")
    # the Maildir connector adds Return-Path and Delivered-To above it
    assert b"\nAuthentication-Results: mx.example.test;\n\tspf=pass" in head
    assert b"dmarc=pass (p=reject dis=none) header.from=local.test" in head

    # example.test publishes p=reject and 127.0.0.1 is not in its SPF: refused at end of data
    code, text = send(server.port, "alice@example.test", "bob@example.test", message())
    assert code == 550 and text.startswith(b"5.7.1 DMARC policy of example.test rejects this message")

    # quar.test: accepted, but held with the reason
    code, text = send(server.port, "a@quar.test", "bob@example.test", message(from_="a@quar.test"))
    assert code == 250
    [held] = wait_files(server.data_dir, "**/hold/*.json")
    assert json.loads(held.read_text())["held_reason"].startswith("DMARC policy of quar.test is quarantine")

    # outbound: relayed mail from local.test leaves DKIM-signed, and the signature verifies
    code, _ = send(server.port, "a@local.test", "carol@remote.test", message(from_="a@local.test"))
    assert code == 250
    deadline = time.monotonic() + 30
    while not smtp_sink.messages and time.monotonic() < deadline:
        time.sleep(0.05)
    [out] = smtp_sink.messages
    data = out.content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    dns = AuthDNS(DNSResolver(None, None, knot_server.nameservers, timeout=3.0))
    assert [(r.result, r.domain, r.selector) for r in verify_all(dns, data)] == [("pass", "local.test", "out")]
    log = server.log_text()
    assert "DMARC header.from=example.test: fail" in log and "SPF mailfrom=<a@local.test>" in log
