"""MTA-STS through ``twistd -n exmta``: the [tls_policy] section wired in, mail deferred then bounced.

exmta relays by MX (Knot) to two domains with an enforce policy (served by a
standard-library HTTPS server of the test CA): ``good.bb.test`` whose MX
offers STARTTLS with a valid certificate, and ``clear.bb.test`` whose MX
offers no STARTTLS.  The first is delivered over TLS; the second never
reaches its MX in clear, is deferred with the reason (and its explanation in
the tracking log), and bounces to the sender when its lifetime is over.
"""
from __future__ import annotations

import email
import email.policy
import json
import smtplib
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from support import knot
from support.policyhost import policy
from support.procs import free_port, wait_until
from support.sinks import SmtpSink
from support.tlscerts import TestPKI

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not knot.available(), reason="knotd is not installed")]

ZONE = """\
good MX 10 mx.good
mx.good A 127.0.0.2
_mta-sts.good TXT "v=STSv1; id=1"
mta-sts.good A 127.0.0.1
clear MX 10 mx.clear
mx.clear A 127.0.0.3
_mta-sts.clear TXT "v=STSv1; id=1"
mta-sts.clear A 127.0.0.1
"""


class _Handler(BaseHTTPRequestHandler):
    policies: dict[str, str] = {}

    def do_GET(self) -> None:  # noqa: N802
        body = self.policies.get((self.headers.get("Host") or "").split(":")[0])
        if body is None or self.path != "/.well-known/mta-sts.txt":
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def policy_server(tmp_path: Path) -> Iterator[tuple[TestPKI, int]]:
    pki = TestPKI(tmp_path / "pki")
    files = pki.server("mta-sts.good.bb.test", "mta-sts.clear.bb.test", file="policy-host")
    _Handler.policies = {"mta-sts.good.bb.test": policy("enforce", "mx.good.bb.test"),
                         "mta-sts.clear.bb.test": policy("enforce", "mx.clear.bb.test")}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(files.cert), str(files.key))
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield pki, httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def test_enforce_delivers_over_tls_defers_the_rest_then_bounces(
        tmp_path: Path, policy_server: tuple[TestPKI, int], exmta_factory: Callable[..., Any]) -> None:
    pki, https_port = policy_server
    mx = pki.server("mx.good.bb.test", file="mx")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(mx.cert), str(mx.key))
    port = free_port("127.0.0.2")
    with knot.KnotServer(tmp_path, {"bb.test": ZONE}) as dns, \
            SmtpSink(host="127.0.0.2", port=port, tls_context=ctx) as good, \
            SmtpSink(host="127.0.0.3", port=port) as clear:
        toml = f"""
[server]
hostname = "relay.example.test"
data_dir = "{{data_dir}}"
receive_workers = 0

[accepted_domains]
"example.test" = "authoritative"

[receive.default]
listen = ["tcp:{{port}}:interface=127.0.0.1"]
relay_networks = ["127.0.0.0/8"]

[send.local]
type = "maildir"
root = "mail"

[send.internet]
type = "smtp"
port = {port}
tls = "opportunistic"
connect_timeout = "5s"
dns_servers = ["127.0.0.1:{dns.port}"]

[[route]]
domains = ["example.test"]
connector = "local"

[[route]]
domains = ["*"]
connector = "internet"

[queue]
retry_schedule = ["1s"]
max_lifetime = "4s"
delay_warning = 0

[tls_policy]
ca_file = "{pki.ca_file}"
https_port = {https_port}
txt_recheck = 0
"""
        ex = exmta_factory(toml=toml)
        with smtplib.SMTP("127.0.0.1", ex.port, timeout=30) as s:
            s.sendmail("alice@example.test", ["bob@good.bb.test", "carol@clear.bb.test"],
                       b"From: alice@example.test\r\nSubject: policy\r\n\r\nhello\r\n")
        good.wait_for(1, timeout=60)
        wait_until(lambda: ex.maildir_messages("alice@example.test"), 60, "the DSN for carol")
        assert clear.messages == []  # never in clear to a domain whose policy forbids it
        ex.stop()  # its cached connection to the MX closes before the sinks stop
    assert [m.rcpt_tos for m in good.messages] == [["bob@good.bb.test"]]
    [dsn] = ex.maildir_messages("alice@example.test")
    msg = email.message_from_bytes(dsn, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    text = dsn.decode("utf-8", "replace")
    assert "carol@clear.bb.test" in text and "MTA-STS policy of clear.bb.test" in text
    tracking = Path(ex.workdir) / "data" / "log" / "tracking.jsonl"
    events = [json.loads(line) for line in tracking.read_text().splitlines()]
    defers = [e for e in events if e["event_id"] == "DEFER" and "carol@clear.bb.test" in e["recipients"]]
    assert defers and defers[0]["reply"].startswith("451 4.7.5")
    assert "TLS policy" in defers[0]["explanation"]
    sent = [e for e in events if e["event_id"] == "SEND" and "bob@good.bb.test" in e["recipients"]]
    assert sent and sent[0]["tls"].startswith("TLSv1.")
    assert (Path(ex.workdir) / "data" / "tls-policy" / "mta-sts" / "good.bb.test.json").exists()
