"""Issue 11 items 3, 4 and 14 against a running ``twistd -n exmta``: the admin API and the metrics listener.

* CSRF: what a browser sends for a cross-site form (remembered Basic
  credentials, a form content type, ``Origin``/``Sec-Fetch-Site``) must not
  redirect the queue; ``exmta queue``'s own requests (Bearer, no body) still work.
* Request bodies over the limit are refused from the headers, before they
  are read (a client announcing 300 MB gets 413 at once, it does not have to
  send them); chunked bodies are cut off at the limit; the metrics listener
  answers GET only and closes clients outside its ``allowed_networks``.
* The unauthenticated /metrics shows queue totals per connector, not the
  recipient domains the admin API's /metrics labels them with.
"""
from __future__ import annotations

import base64
import http.client
import json
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import procs
from support.exmta_proc import ExmtaProcess, exmta_toml
from support.sinks import SmtpSink

pytestmark = pytest.mark.integration

EXTRA = """
[send.mx]
type = "smtp"
mx = true
tls = "none"
connect_timeout = "2s"
dns_servers = ["127.0.0.1:{dead_port}"]

[[route]]
domains = ["*"]
connector = "mx"

[admin]
listen = ["tcp:{admin_port}:interface=127.0.0.1"]

[metrics]
listen = "tcp:{metrics_port}:interface=127.0.0.1"
sample_interval = "0.3s"
"""


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ExmtaProcess, SmtpSink, str]]:
    attacker = SmtpSink().start()
    tmp = tmp_path_factory.mktemp("httpsec")
    ex = ExmtaProcess(tmp / "ex", toml=exmta_toml(retry="1h", extra=EXTRA),
                      subst={"admin_port": procs.free_port(), "metrics_port": procs.free_port(),
                             "dead_port": procs.free_port()})
    ex.start()
    try:
        token_file = ex.data_dir / "admin.token"
        procs.wait_until(lambda: token_file.exists() and procs.port_in_use(ex.subst["admin_port"]), 20,
                         "the admin API")
        procs.wait_for_port(ex.subst["metrics_port"], timeout=20)
        yield ex, attacker, token_file.read_text().strip()
    finally:
        ex.stop()
        attacker.stop()


def call(port: int, method: str, path: str, headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(procs.LOOPBACK, port, timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def redirected(ex: ExmtaProcess, token: str) -> Any:
    status, body = call(ex.subst["admin_port"], "GET", "/api/queues", {"Authorization": f"Bearer {token}"})
    assert status == 200
    return [q.get("redirected_to") for q in json.loads(body)["queues"] if q.get("redirected_to")]


def test_cross_site_form_cannot_redirect_the_queue(running: tuple[ExmtaProcess, SmtpSink, str]) -> None:
    ex, attacker, token = running
    port = ex.subst["admin_port"]
    basic = "Basic " + base64.b64encode(f"admin:{token}".encode()).decode()
    target = f"/api/redirect?target=127.0.0.1:{attacker.port}"
    form = b"target=127.0.0.1%3A" + str(attacker.port).encode()
    browser = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example",
               "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    attempts = [
        ({"Authorization": basic, **browser}, form, {401, 403, 415}),   # the browser's auto-submitted form
        ({"Authorization": basic}, None, {401}),                        # Basic never reaches /api
        ({"Authorization": f"Bearer {token}", "Content-Type": "application/x-www-form-urlencoded"}, form, {415}),
        ({"Authorization": f"Bearer {token}", "Content-Type": "text/plain"}, b"x", {415}),
        ({"Authorization": f"Bearer {token}", "Origin": "http://evil.example"}, None, {403}),
        ({"Authorization": f"Bearer {token}", "Origin": "null"}, None, {403}),
        ({"Authorization": f"Bearer {token}", "Sec-Fetch-Site": "cross-site"}, None, {403}),
        ({"Authorization": f"Bearer {token}", "Sec-Fetch-Site": "same-site"}, None, {403}),
    ]
    for headers, body, expected in attempts:
        status, text = call(port, "POST", target, headers, body)
        assert status in expected, (headers, status, text)
        assert redirected(ex, token) == [], headers
    # DELETE is state-changing too
    status, _ = call(port, "DELETE", "/api/redirect", {"Authorization": basic, "Origin": "http://evil.example"})
    assert status in (401, 403)

    # the next message for a local mailbox stays here
    with smtplib.SMTP(procs.LOOPBACK, ex.port, timeout=10) as c:
        c.sendmail("someone@example.org", ["bob@example.test"], b"Subject: csrf check\r\n\r\nhello\r\n")
    maildir = ex.data_dir / "mail" / "example.test" / "bob" / "new"
    procs.wait_until(lambda: maildir.is_dir() and any(maildir.iterdir()), 20, "local delivery")
    assert attacker.messages == []

    # what `exmta queue` and a same-origin page send still work; the status page still takes Basic
    same = {"Authorization": f"Bearer {token}", "Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    status, text = call(port, "POST", "/api/redirect?target=127.0.0.1:1", same)
    assert status == 200, text
    assert call(port, "DELETE", "/api/redirect", {"Authorization": f"Bearer {token}"})[0] == 200
    assert redirected(ex, token) == []
    status, page = call(port, "GET", "/status", {"Authorization": basic})
    assert status == 200 and b"exmta on" in page


def raw_exchange(port: int, head: bytes, chunks: Iterator[bytes] = iter(())) -> bytes:
    """Send ``head`` then ``chunks`` (stopping when the server closes); return what the server said."""
    with socket.create_connection((procs.LOOPBACK, port), timeout=15) as s:
        s.sendall(head)
        try:
            for chunk in chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while len(out) < 65536:
                data = s.recv(65536)
                if not data:
                    break
                out += data
        except ConnectionResetError:
            pass
        return out


def test_big_bodies_refused_before_they_are_read(running: tuple[ExmtaProcess, SmtpSink, str]) -> None:
    ex, _, token = running
    admin, metrics = ex.subst["admin_port"], ex.subst["metrics_port"]
    # 300 MB announced, none sent: the answer comes from the headers alone (the server does not wait)
    for port, path in ((admin, "/api/queues"), (admin, "/status")):
        got = raw_exchange(port, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n\r\n" % path.encode())
        assert got.startswith(b"HTTP/1.1 413"), got[:200]
    got = raw_exchange(metrics, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 600000000\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 405"), got[:200]
    got = raw_exchange(metrics, b"PUT /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 405"), got[:200]

    # chunked: 1 MiB in 16 KiB chunks, no terminating chunk; cut off once past the limit
    chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
    got = raw_exchange(admin, b"POST /api/queues HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                       iter([chunk] * 64))
    assert got.startswith(b"HTTP/1.1 413"), got[:200]
    assert "413" in ex.log_text()

    # small requests still work, on both listeners
    assert call(admin, "GET", "/api/queues", {"Authorization": f"Bearer {token}"})[0] == 200
    assert call(metrics, "GET", "/metrics")[0] == 200
    assert call(metrics, "HEAD", "/healthz")[0] == 200


def test_public_metrics_show_connectors_not_recipient_domains(
        running: tuple[ExmtaProcess, SmtpSink, str]) -> None:
    ex, _, token = running
    with smtplib.SMTP(procs.LOOPBACK, ex.port, timeout=10) as c:
        c.sendmail("alice@example.test", ["ceo@secret-partner.example"], b"Subject: merger\r\n\r\nx\r\n")

    def scraped() -> str:
        return call(ex.subst["metrics_port"], "GET", "/metrics")[1].decode()

    procs.wait_until(lambda: 'exmta_queue_connector_messages{connector="mx"} 1.0' in scraped(), 30,
                     "the deferred message in the public gauges")
    public = scraped()
    assert "secret-partner" not in public
    assert "exmta_queue_nexthop_messages" not in public
    status, admin_text = call(ex.subst["admin_port"], "GET", "/metrics", {"Authorization": f"Bearer {token}"})
    assert status == 200 and 'nexthop="mx/secret-partner.example"' in admin_text.decode()


def test_metrics_listener_closes_clients_outside_allowed_networks(tmp_path: Path) -> None:
    extra = ('[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n'
             'allowed_networks = ["192.0.2.0/24"]\n')
    ex = ExmtaProcess(tmp_path / "ex", toml=exmta_toml(extra=extra), subst={"metrics_port": procs.free_port()})
    ex.start()
    try:
        procs.wait_for_port(ex.subst["metrics_port"], timeout=20)
        got = raw_exchange(ex.subst["metrics_port"], b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 403 ") and b"exmta_" not in got  # refused from the address alone
        procs.wait_until(lambda: "outside allowed_networks" in ex.log_text(), 10, "the log line")
    finally:
        ex.stop()
