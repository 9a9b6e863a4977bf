"""Connection filtering end to end: a real exmta process, DNS lists served by a real Knot DNS on loopback,
and smtplib bound to 127.0.0.x source addresses (the zones list x.0.0.127)."""
from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, cast

import pytest

from support import knot
from support.exmta_proc import ExmtaProcess, exmta_toml

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not knot.available(), reason="knotd not installed"),
]

ZONES = {
    "zen.test": ("2.0.0.127 A 127.0.0.2\n"
                 "2.0.0.127 TXT \"Listed by zen.test, see https://zen.test/q?127.0.0.2\"\n"
                 "3.0.0.127 A 127.0.0.4\n"
                 "6.0.0.127 A 127.0.0.99\n"
                 "4.0.0.127 300 A 127.0.0.3\n"),          # a return code the list's codes do not count
    "dnswl.test": "3.0.0.127 A 127.0.10.2\n",          # 127.0.0.3 is on both: the allow list wins
    "broken.test": "@ CNAME elsewhere.test.\n",        # Knot refuses to load it: every query is SERVFAIL
}

LISTS = """
[connection_filter]
dns_servers = ["{dns}"]
timeout = "{timeout}"

[connection_filter.lists.zen]
zone = "zen.test"
codes = ["127.0.0.[2..11]"]
weight = 1
txt = true

[connection_filter.lists.dnswl]
zone = "dnswl.test"
action = "allow"

[connection_filter.lists.broken]
zone = "broken.test"
weight = 1
"""

EDGE = 'greet_pause = "{pause}"\ndnsbl_sites = ["zen", "dnswl", "broken"]\n'


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[knot.KnotServer]:
    with knot.KnotServer(tmp_path_factory.mktemp("dnsbl"), ZONES) as server:
        yield server


def start(tmp_path: Path, dns: str, pause: str = "2s", timeout: str = "5s", edge: str = EDGE,
          workers: int = 0) -> ExmtaProcess:
    toml = exmta_toml(relay_networks=["127.0.0.1/32"], receive_workers=workers,
                      receive_extra=edge.format(pause=pause), extra=LISTS.format(dns=dns, timeout=timeout))
    return ExmtaProcess(tmp_path, toml)  # its readiness probe comes from 127.0.0.1: exempt


def client(proc: ExmtaProcess, source: str) -> smtplib.SMTP:
    return smtplib.SMTP(proc.host, proc.port, timeout=30, source_address=(source, 0))


def refusal(proc: ExmtaProcess, source: str) -> tuple[int, bytes]:
    with pytest.raises(smtplib.SMTPConnectError) as e:
        client(proc, source)
    return e.value.smtp_code, e.value.smtp_error


def send(proc: ExmtaProcess, source: str, rcpt: str = "user@example.test") -> None:
    with client(proc, source) as s:
        s.sendmail("sender@remote.test", [rcpt], f"Subject: from {source}\r\n\r\nhello\r\n")


def delivered(proc: ExmtaProcess, count: int, deadline: float = 30.0) -> list[bytes]:
    """The Maildir once ``count`` messages are in it (delivery runs after the 250), or at the deadline."""
    end = time.monotonic() + deadline
    while True:
        messages = proc.maildir_messages("user@example.test")
        if len(messages) >= count or time.monotonic() > end:
            return messages
        time.sleep(0.1)


def tracked(proc: ExmtaProcess, check: str, deadline: float = 20.0) -> list[dict]:
    path = proc.data_dir / "log" / "tracking.jsonl"
    end = time.monotonic() + deadline
    while True:
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        found = [r for r in rows if r.get("check") == check]  # details are top-level keys of a row
        if found or time.monotonic() > end:
            return found
        time.sleep(0.1)


def test_the_resolver_gives_record_and_negative_ttls(dns_server: knot.KnotServer) -> None:
    from twisted.python.threadpool import ThreadPool

    from exmta.routing.dns import DNSResolver, DNSTemporaryError

    resolver = DNSResolver(object(), ThreadPool(), dns_server.nameservers, timeout=3.0)  # blocking calls only
    assert resolver.records_with_ttl_blocking("4.0.0.127.zen.test", "A")[1] == 300.0
    records, ttl = resolver.records_with_ttl_blocking("2.0.0.127.zen.test", "A")
    assert [r.address for r in records] == ["127.0.0.2"] and ttl == 60.0  # type: ignore[attr-defined]
    assert resolver.records_with_ttl_blocking("9.0.0.127.zen.test", "A") == ([], 60.0)  # NXDOMAIN: SOA minimum
    assert resolver.records_with_ttl_blocking("2.0.0.127.zen.test", "AAAA") == ([], 60.0)  # no such record
    with pytest.raises(DNSTemporaryError):
        resolver.records_with_ttl_blocking("2.0.0.127.broken.test", "A")


def test_listed_refused_allowed_and_failing_lists_pass(tmp_path: Path, dns_server: knot.KnotServer) -> None:
    dns = f"{dns_server.host}:{dns_server.port}"
    with start(tmp_path, dns) as proc:
        code, text = refusal(proc, "127.0.0.2")
        assert code == 554
        assert text == (b"5.7.1 Service unavailable; client [127.0.0.2] blocked using zen.test; "
                        b"Listed by zen.test, see https://zen.test/q?127.0.0.2")
        send(proc, "127.0.0.3")   # on zen.test too, but dnswl.test allows it
        send(proc, "127.0.0.6")   # zen.test answers a code outside its codes
        send(proc, "127.0.0.7")   # not listed; broken.test answers SERVFAIL: never a refusal
        assert sorted(m.split(b"Subject: from ")[1][:9] for m in delivered(proc, 3)) == [
            b"127.0.0.3", b"127.0.0.6", b"127.0.0.7"]
        rejected, = tracked(proc, "dnsbl")
        assert rejected["remote_host"] == "127.0.0.2" and rejected["lists"] == "zen.test"
        assert "SERVFAIL" in proc.log_text() and "broken.test lookup" in proc.log_text()
        assert not proc.error_lines()


def test_an_early_talker_is_refused(tmp_path: Path, dns_server: knot.KnotServer) -> None:
    with start(tmp_path, f"{dns_server.host}:{dns_server.port}", pause="3s") as proc:
        with socket.create_connection((proc.host, proc.port), timeout=30, source_address=("127.0.0.8", 0)) as sock:
            sock.sendall(b"EHLO hasty.test\r\n")  # before the greeting
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = sock.recv(1024)
                if not chunk:
                    break
                data += chunk
            assert data == b"521 5.5.1 Protocol error: talking before the greeting\r\n"
            assert sock.recv(1024) == b""  # and disconnected
        assert tracked(proc, "pregreet")[0]["remote_host"] == "127.0.0.8"


def test_a_silent_dns_server_delays_but_never_refuses(tmp_path: Path) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        with start(tmp_path, f"127.0.0.1:{silent.getsockname()[1]}", pause="0s", timeout="1s") as proc:
            send(proc, "127.0.0.2")  # listed in zen.test, but no list answers in time
            assert len(delivered(proc, 1)) == 1
            assert "timeout" in proc.log_text().lower()
    finally:
        silent.close()


def test_a_reload_reaches_the_receive_workers(tmp_path: Path, dns_server: knot.KnotServer) -> None:
    dns = f"{dns_server.host}:{dns_server.port}"
    with start(tmp_path, dns, edge="", workers=1) as proc:
        send(proc, "127.0.0.2")  # no lists on the connector yet
        assert proc.config_path is not None
        proc.config_path.write_text(proc.config_path.read_text().replace(
            "[receive.default]\n", '[receive.default]\ndnsbl_sites = ["zen"]\n', 1))
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:  # the main process applies it first, then each worker
            try:
                send(proc, "127.0.0.2")
            except smtplib.SMTPConnectError as e:
                assert e.smtp_code == 554
                break
            assert time.monotonic() < deadline, "the reload never reached the connector"
            time.sleep(0.2)
        # every later connection, whichever process accepts it, is refused
        assert "worker" in proc.log_text()
        for _ in range(6):
            assert refusal(proc, "127.0.0.2")[0] == 554


def test_starttls_works_through_the_screening_wrapper(tmp_path: Path, dns_server: knot.KnotServer) -> None:
    import ssl

    from support.tlscerts import TestPKI

    pki = TestPKI(tmp_path / "pki")
    cert = pki.server("mx.example.test")
    edge = EDGE + f'[receive.default.tls]\ncert = "{cert.cert}"\nkey = "{cert.key}"\n'
    with start(tmp_path, f"{dns_server.host}:{dns_server.port}", pause="1s", edge=edge) as proc:
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        context.check_hostname = False  # smtplib names the server 127.0.0.1; the chain is still verified
        with client(proc, "127.0.0.9") as s:
            s.ehlo("client.test")
            assert s.starttls(context=context)[0] == 220
            s.ehlo("client.test")
            s.sendmail("sender@remote.test", ["user@example.test"], "Subject: from 127.0.0.9\r\n\r\ntls\r\n")
        assert b"Subject: from 127.0.0.9" in delivered(proc, 1)[0]


HAPROXY_CFG = """\
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp_in
    bind 127.0.0.1:{front}
    default_backend exmta
backend exmta
    server exmta1 127.0.0.1:{back} send-proxy-v2
"""


@pytest.mark.skipif(not os.path.exists("/usr/sbin/haproxy"), reason="haproxy not installed")
def test_behind_haproxy_the_real_client_is_judged_after_the_header(tmp_path: Path,
                                                                   dns_server: knot.KnotServer) -> None:
    from support.procs import ManagedProcess, free_port, wait_for_port

    front, back = free_port(), free_port()
    edge = (f'listen = ["tcp:{{port}}:interface=127.0.0.1", "haproxy:tcp:{back}:interface=127.0.0.1"]\n'
            + EDGE.format(pause="2s"))
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(front=front, back=back))
    toml = exmta_toml(relay_networks=["127.0.0.1/32"], receive_workers=0, receive_extra=edge,
                      extra=LISTS.format(dns=f"{dns_server.host}:{dns_server.port}", timeout="5s"))
    toml = toml.replace('listen = ["tcp:{port}:interface=127.0.0.1"]\n', "", 1)  # the edge lists both endpoints
    haproxy = ManagedProcess(["/usr/sbin/haproxy", "-db", "-f", str(cfg)], log_path=tmp_path / "haproxy.log",
                             name="haproxy").start()
    try:
        with ExmtaProcess(tmp_path / "exmta", toml) as proc:
            wait_for_port(front, timeout=20)
            via = cast(ExmtaProcess, SimpleNamespace(host="127.0.0.1", port=front))  # the same server, via HAProxy
            code, text = refusal(via, "127.0.0.2")  # HAProxy's own address (127.0.0.1) would be exempt
            assert code == 554 and b"client [127.0.0.2] blocked using zen.test" in text
            with socket.create_connection(("127.0.0.1", front), timeout=30,
                                          source_address=("127.0.0.8", 0)) as sock:
                sock.sendall(b"EHLO hasty.test\r\n")  # early talk, sent to exmta after the PROXY header
                data = b""
                while not data.endswith(b"\r\n"):
                    chunk = sock.recv(1024)
                    if not chunk:
                        break
                    data += chunk
                assert data == b"521 5.5.1 Protocol error: talking before the greeting\r\n"
            send(via, "127.0.0.7")  # waits for the pause, then delivers
            assert len(delivered(proc, 1)) == 1
            assert tracked(proc, "pregreet")[0]["remote_host"] == "127.0.0.8"
    finally:
        haproxy.stop()
