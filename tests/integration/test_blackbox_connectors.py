"""Black-box connector security: ``twistd -n exmta`` with two receive connectors on one port.

127.0.0.1 and 127.0.0.2 are both loopback addresses, so a client bound to
one or the other is a different source address to exmta: the "internet"
connector serves 127.0.0.1 only, the "apps" connector 127.0.0.2 (and may
relay), anything else (127.0.0.3) is refused at connect.
"""
from __future__ import annotations

import os
import smtplib
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from support import procs
from support.exmta_proc import ExmtaProcess, exmta_toml
from support.sinks import SmtpSink

pytestmark = pytest.mark.integration

INTERNET = """
remote_ranges = ["127.0.0.1/32"]
banner = "internet connector"
max_connections_per_ip = 2
"""
APPS = """
[receive.apps]
listen = ["tcp:{port}:interface=127.0.0.1"]
remote_ranges = ["127.0.0.2/32"]
relay_networks = ["127.0.0.2/32"]
banner = "apps connector"
"""


def two_connectors(sink: SmtpSink, workers: int = 0) -> str:
    return exmta_toml(relay_networks=[], smarthost=sink.next_hop, receive_extra=INTERNET, extra=APPS,
                      receive_workers=workers)


def connect_from(source: str, port: int) -> socket.socket:
    sock = socket.create_connection((procs.LOOPBACK, port), timeout=10, source_address=(source, 0))
    return sock


def banner_from(source: str, port: int) -> tuple[int, list[str]]:
    with connect_from(source, port) as sock:
        return procs.read_smtp_reply(sock, timeout=10)


def swaks_from(source: str, port: int, to: str) -> subprocess.CompletedProcess[str]:
    return procs.swaks(port, "app@example.test", to, "--local-interface", source,
                       "--header", "Subject: connector test", "--body", "hello", check=False, timeout=20)


@pytest.mark.parametrize("workers", [0, 1])
def test_two_connectors_on_one_port(exmta_factory: Callable[..., ExmtaProcess], smtp_sink: SmtpSink,
                                    workers: int) -> None:
    exmta = exmta_factory(toml=two_connectors(smtp_sink, workers))
    code, text = banner_from("127.0.0.1", exmta.port)
    assert code == 220 and text[0].endswith("internet connector")
    code, text = banner_from("127.0.0.2", exmta.port)
    assert code == 220 and text[0].endswith("apps connector")

    # the internet connector refuses to relay for 127.0.0.1 (swaks), the apps connector relays
    refused = swaks_from("127.0.0.1", exmta.port, "someone@example.net")
    assert refused.returncode != 0
    assert "554 5.7.1 Relay access denied" in refused.stdout
    relayed = swaks_from("127.0.0.2", exmta.port, "someone@example.net")
    assert relayed.returncode == 0, relayed.stdout
    got = smtp_sink.wait_for_rcpts(["someone@example.net"], timeout=30)
    assert got[0].mail_from == "app@example.test"

    # both may send to the accepted domain (smtplib from each source address)
    for source in ("127.0.0.1", "127.0.0.2"):
        with smtplib.SMTP(procs.LOOPBACK, exmta.port, timeout=10, source_address=(source, 0)) as c:
            assert c.sendmail("x@example.net", ["alice@example.test"], f"Subject: from {source}\r\n\r\nx\r\n") == {}
    procs.wait_until(lambda: len(exmta.maildir_messages("alice@example.test")) == 2, 30, "two local deliveries")

    # an address no connector admits: 554 5.7.1 and the connection closed, and it is logged
    with connect_from("127.0.0.3", exmta.port) as sock:
        code, text = procs.read_smtp_reply(sock, timeout=10)
        assert (code, text) == (554, ["5.7.1 Your address is not allowed to connect to this server"])
        sock.settimeout(10)
        assert sock.recv(100) == b""
    procs.wait_until(lambda: "connection from 127.0.0.3" in exmta.log_text(), 10, "refusal logged")
    assert "no receive connector admits this address" in exmta.log_text()
    assert not exmta.error_lines()


def test_connection_limit_per_source_address(exmta_factory: Callable[..., ExmtaProcess],
                                             smtp_sink: SmtpSink) -> None:
    exmta = exmta_factory(toml=two_connectors(smtp_sink))
    held = [connect_from("127.0.0.1", exmta.port) for _ in range(2)]
    try:
        for sock in held:
            assert procs.read_smtp_reply(sock, timeout=10)[0] == 220
        code, text = banner_from("127.0.0.1", exmta.port)
        assert code == 421
        assert text == ["4.7.0 mx.example.test Too many connections from 127.0.0.1 (limit 2), try again later"]
        # another source address (another connector) is not affected
        assert banner_from("127.0.0.2", exmta.port)[0] == 220
    finally:
        for sock in held:
            sock.sendall(b"QUIT\r\n")
            sock.close()
    procs.wait_until(lambda: banner_from("127.0.0.1", exmta.port)[0] == 220, 10, "a free slot after QUIT")
    assert "refused: too many connections from 127.0.0.1 (limit 2)" in exmta.log_text()


@pytest.fixture
def tiny_data_dir(tmp_path: Path):
    """exmta's data directory on an 8 MiB tmpfs (root only; failing to mount fails the test)."""
    mnt = tmp_path / "tinydata"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True, timeout=10)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True, timeout=10)


def mail_reply(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP(procs.LOOPBACK, port, timeout=10) as c:
        c.ehlo("c.example.test")
        return c.mail("x@example.net")


def test_back_pressure_on_a_full_disk(exmta_factory: Callable[..., ExmtaProcess], tiny_data_dir: Path) -> None:
    toml = exmta_toml(relay_networks=[], extra='[back_pressure]\nmin_free_disk = "3MiB"\ncheck_interval = "200ms"\n')
    exmta = exmta_factory(toml=toml, data_dir=tiny_data_dir)
    with smtplib.SMTP(procs.LOOPBACK, exmta.port, timeout=10) as c:
        assert c.sendmail("x@example.net", ["alice@example.test"], "Subject: before\r\n\r\nkept\r\n") == {}
    procs.wait_until(lambda: exmta.maildir_messages("alice@example.test"), 30, "delivery before the disk fills")

    ballast = tiny_data_dir / "ballast"
    free = os.statvfs(tiny_data_dir)
    ballast.write_bytes(b"\0" * max(0, free.f_bavail * free.f_frsize - 2 * 1024 * 1024))
    procs.wait_until(lambda: mail_reply(exmta.port)[0] == 452, 10, "452 under back pressure")
    code, text = mail_reply(exmta.port)
    assert (code, text.split(b" (")[0]) == (452, b"4.3.1 Insufficient system resources")
    assert b"below 3.0 MiB" in text
    assert "back pressure ON" in exmta.log_text()
    # what was accepted before is still there
    (msg,) = exmta.maildir_messages("alice@example.test")
    assert b"kept" in msg

    ballast.unlink()
    procs.wait_until(lambda: mail_reply(exmta.port)[0] == 250, 10, "mail taken again")
    assert "back pressure OFF" in exmta.log_text()
    assert not exmta.error_lines()



def test_implicit_tls_connector_shares_a_port_with_a_plaintext_one(
        exmta_factory: Callable[..., ExmtaProcess], tmp_path: Path) -> None:
    """Each connector keeps its own listening factory (implicit TLS, exmta.tls) behind the dispatcher."""
    import ssl

    import trustme

    ca = trustme.CA()
    ca.issue_cert("mx.example.test", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "mx.pem"))
    smtps = f"""
[receive.smtps]
listen = ["tcp:{{port}}:interface=127.0.0.1"]
remote_ranges = ["127.0.0.2/32"]
banner = "smtps connector"
[receive.smtps.tls]
cert = "{tmp_path / 'mx.pem'}"
implicit = true
"""
    exmta = exmta_factory(toml=exmta_toml(relay_networks=[], receive_extra='remote_ranges = ["127.0.0.1/32"]',
                                          extra=smtps))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with smtplib.SMTP_SSL(procs.LOOPBACK, exmta.port, timeout=10, context=context,
                          source_address=("127.0.0.2", 0)) as c:
        assert c.ehlo("c.example.test")[0] == 250
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert c.sendmail("x@example.net", ["alice@example.test"], "Subject: smtps\r\n\r\nx\r\n") == {}
    code, text = banner_from("127.0.0.1", exmta.port)  # plaintext for the other connector
    assert code == 220
    procs.wait_until(lambda: exmta.maildir_messages("alice@example.test"), 30, "delivery")
    assert "smtps connector" not in text[0]
    assert not exmta.error_lines()


def test_proxy_protocol_endpoint_dispatches_on_the_client_address_in_the_header(
        exmta_factory: Callable[..., ExmtaProcess]) -> None:
    proxy_port = procs.free_port()
    extra = """
[receive.behind-lb]
listen = ["haproxy:tcp:{proxy_port}:interface=127.0.0.1"]
banner = "lb internet"
[receive.behind-lb-apps]
listen = ["haproxy:tcp:{proxy_port}:interface=127.0.0.1"]
remote_ranges = ["192.0.2.0/24"]
relay_networks = ["192.0.2.0/24"]
banner = "lb apps"
"""
    exmta = exmta_factory(toml=exmta_toml(relay_networks=[], extra=extra), subst={"proxy_port": proxy_port})

    def through_proxy(header: bytes) -> tuple[int, list[str]]:
        with socket.create_connection((procs.LOOPBACK, proxy_port), timeout=10) as sock:
            sock.sendall(header)
            return procs.read_smtp_reply(sock, timeout=10)

    assert through_proxy(b"PROXY TCP4 192.0.2.5 127.0.0.1 40000 25\r\n")[1][0].endswith("lb apps")
    assert through_proxy(b"PROXY TCP4 198.51.100.1 127.0.0.1 40000 25\r\n")[1][0].endswith("lb internet")
    with socket.create_connection((procs.LOOPBACK, proxy_port), timeout=10) as sock:
        sock.sendall(b"EHLO no-proxy-header\r\n")
        sock.settimeout(10)
        assert sock.recv(100) == b""  # no PROXY header: closed without a word
    assert not exmta.error_lines()
