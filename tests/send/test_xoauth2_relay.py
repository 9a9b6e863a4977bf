"""The XOAUTH2 relay end to end, with real parts on loopback.

An anonymous LAN device (by IP range) -> exmta -> STARTTLS + AUTH XOAUTH2 ->
Dovecot submission (checks the token by introspection at npm oidc-provider)
-> an aiosmtpd sink.  Between exmta and Dovecot a wiretap records every byte:
no token, no ``AUTH`` crosses the wire in clear.  Token refresh, a token the
server stops accepting, the endpoint down and back, a refused and a revoked
client, each against the real token endpoint.
"""
from __future__ import annotations

import base64
import datetime
import json
import smtplib
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from support import dovecot_submission, oidc
from support.procs import LOOPBACK, free_port, wait_until
from support.sinks import SmtpSink
from support.tlscerts import TestPKI
from support.wiretap import WireTap

pytestmark = pytest.mark.integration

SECRET = "s3cret-for-exmta-Zq8"
MAILBOX = "relay@example.test"
SENDER = "scanner@example.test"

EXMTA_TOML = """
[server]
hostname = "relay.example.test"
data_dir = "{data_dir}"

[accepted_domains]
"example.test" = "authoritative"

# the LAN's devices: anonymous, by IP range, may relay (Exchange: an anonymous relay connector)
[receive.lan]
listen = ["tcp:{port}:interface=127.0.0.1"]
remote_ranges = ["127.0.0.0/8"]
relay_networks = ["127.0.0.0/8"]

[send.local]
type = "maildir"
root = "mail"

[send.exo]
smarthosts = ["{next_hop}"]
tls = "mandatory"
tls_auth_level = "domain"
tls_domain = "submission.example.test"
tls_ca_file = "{ca_file}"
auth = "xoauth2"
max_messages_per_connection = 1
connect_timeout = "5s"
command_timeout = "20s"
protocol_log = "verbose"

[send.exo.oauth2]
token_endpoint = "{token_url}"
client_id = "{client_id}"
{credential}
mailbox = "relay@example.test"
timeout = "5s"

[[route]]
domains = ["example.test"]
connector = "local"

[[route]]
domains = ["*"]
connector = "exo"

[queue]
retry_schedule = ["1s"]
max_lifetime = "{lifetime}"

[metrics]
listen = "tcp:{metrics_port}:interface=127.0.0.1"
"""


def rsa_certificate(directory: Path) -> tuple[Path, Path]:
    """An app registration's certificate (self-signed, as Entra takes them) and its key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "exmta relay app")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365)).sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "app.pem", directory / "app.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Parts:
    """The real components, started per test, stopped by PID."""

    def __init__(self, tmp: Path, ttl: int = 3600) -> None:
        if not (oidc.available() and dovecot_submission.available()):
            pytest.fail("needs node + npm oidc-provider and dovecot-submissiond: run scripts/deps-oauth2.sh")
        self.tmp = tmp
        self.pki = TestPKI(tmp / "pki")
        server = self.pki.issue("submission.example.test")
        self.app_cert, self.app_key = rsa_certificate(tmp / "app")
        self.clients = [oidc.secret_client("exmta-app", SECRET),
                        oidc.certificate_client("exmta-cert-app", self.app_cert.read_bytes()),
                        oidc.introspection_client()]
        self.oidc = oidc.OIDCProvider(tmp / "oidc", self.clients, ttl=ttl, email=MAILBOX).start()
        self.sink = SmtpSink().start()
        introspect = self.oidc.introspection_url.replace("http://", "http://dovecot:dovecot-secret@")
        self.dovecot = dovecot_submission.DovecotSubmission(tmp / "dovecot", server.cert, server.key, introspect,
                                                           self.sink.port).start()
        self.tap = WireTap(self.dovecot.port).start()
        self.metrics_port = free_port()

    def stop(self) -> None:
        self.tap.stop()
        self.dovecot.stop()
        self.sink.stop()
        self.oidc.stop()

    def exmta(self, factory: Callable[..., Any], client: str = "secret", lifetime: str = "1h",
              secret: str = SECRET) -> Any:
        if client == "secret":
            client_id, credential = "exmta-app", f'client_secret = "{secret}"'
        else:
            client_id, credential = "exmta-cert-app", f'certificate = "{self.app_cert}"\nprivate_key = "{self.app_key}"'
        subst = {"next_hop": self.tap.next_hop, "ca_file": self.pki.ca_file, "token_url": self.oidc.token_url,
                 "client_id": client_id, "credential": credential, "lifetime": lifetime,
                 "metrics_port": self.metrics_port}
        return factory(toml=EXMTA_TOML, subst=subst)

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def no_secret_anywhere(self, ex: Any) -> None:
        """No token, no secret, no XOAUTH2 initial response in exmta's logs; nothing but EHLO/STARTTLS in clear."""
        tokens = self.oidc.issued()
        assert tokens, "no token was issued"
        needles = [t.encode() for t in tokens] + [SECRET.encode(), b"auth=Bearer",
                                                  base64.b64encode(f"user={MAILBOX}\x01".encode())[:20]]
        logs = [Path(ex.log_path)] + sorted((ex.data_dir / "log").rglob("*"))
        for path in logs:
            if path.is_file():
                data = path.read_bytes()
                assert not [n for n in needles if n in data], f"a secret in {path}"
        wire = self.tap.client_bytes()
        assert wire and not [n for n in needles if n in wire], "a secret on the wire"
        for up, _down in self.tap.sessions:
            clear, sep, _tls = bytes(up).partition(b"STARTTLS\r\n")
            assert sep, "a session without STARTTLS"
            assert clear.split(b"\r\n")[:-1] == [b"EHLO relay.example.test"], clear
        protocol = b"".join(p.read_bytes() for p in (ex.data_dir / "log").rglob("send-exo*.jsonl"))
        assert b'"AUTH XOAUTH2 <redacted>"' in protocol


@pytest.fixture
def parts(tmp_path: Path) -> Any:
    p = Parts(tmp_path)
    yield p
    p.stop()


def tracking(ex: Any) -> list[dict[str, Any]]:
    path = ex.data_dir / "log" / "tracking.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def send(ex: Any, subject: str, rcpt: str = "bob@fabrikam.test") -> None:
    """The LAN device: anonymous SMTP, no TLS, no AUTH, as printers do."""
    with smtplib.SMTP(LOOPBACK, ex.port, local_hostname="printer.lan", timeout=10) as c:
        c.sendmail(SENDER, [rcpt], f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nscan\r\n".encode())


@pytest.mark.parametrize("client", ["secret", "certificate"])
def test_lan_device_to_dovecot_over_xoauth2(parts: Parts, exmta_factory: Any, client: str) -> None:
    ex = parts.exmta(exmta_factory, client)
    for i in range(3):
        send(ex, f"scan {i}")
    got = parts.sink.wait_for(3, timeout=60)
    assert sorted(m.message()["Subject"] for m in got) == ["scan 0", "scan 1", "scan 2"]
    assert {m.mail_from for m in got} == {SENDER}
    # three sessions (max_messages_per_connection = 1), each logged in with XOAUTH2 over TLS, one token
    logins = [line for line in parts.dovecot.log_text().splitlines()
              if f"Login: user=<{MAILBOX}>, method=XOAUTH2" in line]
    assert len(logins) == 3 and all(", TLS," in line for line in logins)
    assert len(parts.oidc.issued()) == 1
    wait_until(lambda: sum(e["event_id"] == "SEND" for e in tracking(ex)) == 3, 20, "three SEND events")
    assert parts.metric("exmta_oauth2_token_requests_total", result="ok") == 1
    assert parts.metric("exmta_oauth2_token_cache_hits_total") >= 2
    parts.no_secret_anywhere(ex)


def test_token_renewed_before_expiry_and_after_the_server_refuses_it(tmp_path: Path, exmta_factory: Any) -> None:
    parts = Parts(tmp_path, ttl=8)  # renewed after 4 s, never sent in its last 2 s
    try:
        ex = parts.exmta(exmta_factory)
        send(ex, "first")
        parts.sink.wait_for(1, timeout=60)
        sent = 1

        def renewed() -> bool:
            nonlocal sent
            send(ex, f"more {sent}")
            sent += 1
            return len(parts.oidc.issued()) >= 2
        wait_until(renewed, 40, "a renewed token", interval=0.5)
        parts.sink.wait_for(sent, timeout=60)
        assert "Authentication failed" not in parts.dovecot.log_text()  # never sent an expired token

        # the provider restarts: every token it issued is gone, Dovecot's introspection says inactive
        before = len(parts.oidc.issued())
        parts.oidc.restart()
        send(ex, "after restart")
        got = parts.sink.wait_for(sent + 1, timeout=60)
        assert "after restart" in {m.message()["Subject"] for m in got}
        assert len(parts.oidc.issued()) == before + 1
        assert "refused by the server; fetching a new one" in ex.log_text()
        assert "Introspection" in parts.dovecot.log_text() or "Authentication failed" in parts.dovecot.log_text()
        parts.no_secret_anywhere(ex)
    finally:
        parts.stop()


def test_token_endpoint_down_defers_then_delivers(parts: Parts, exmta_factory: Any) -> None:
    parts.oidc.stop()
    ex = parts.exmta(exmta_factory)
    send(ex, "while down")

    def deferred() -> list[dict[str, Any]]:
        return [e for e in tracking(ex) if e["event_id"] == "DEFER"]
    wait_until(lambda: deferred(), 30, "a DEFER event")
    reply = deferred()[0]["reply"]
    assert reply.startswith("451 4.7.0 XOAUTH2 token not available: token endpoint "
                            f"{parts.oidc.token_url} unreachable"), reply
    assert parts.metric("exmta_oauth2_token_requests_total", result="unreachable") >= 1
    assert parts.metric("exmta_messages_deferred_total", connector="exo") >= 1
    assert parts.tap.sessions == []  # no token, no session with the next hop

    parts.oidc.start()
    (got,) = parts.sink.wait_for(1, timeout=60)
    assert got.message()["Subject"] == "while down"
    assert not [e for e in tracking(ex) if e["event_id"] in ("FAIL", "EXPIRE", "DSN")]
    parts.no_secret_anywhere(ex)


def test_refused_client_defers_with_the_reason(parts: Parts, exmta_factory: Any) -> None:
    ex = parts.exmta(exmta_factory, secret="not-the-secret")
    send(ex, "wrong secret")
    wait_until(lambda: any(e["event_id"] == "DEFER" for e in tracking(ex)), 30, "a DEFER event")
    (defer_event, *_) = [e for e in tracking(ex) if e["event_id"] == "DEFER"]
    assert defer_event["reply"] == (f"451 4.7.0 XOAUTH2 token not available: token endpoint {parts.oidc.token_url} "
                                    "refused client exmta-app: HTTP 401 invalid_client: client authentication "
                                    "failed"), defer_event["reply"]
    assert parts.metric("exmta_oauth2_token_requests_total", result="refused") >= 1
    assert parts.tap.sessions == [] and "not-the-secret" not in ex.log_text()
    assert not [e for e in tracking(ex) if e["event_id"] in ("FAIL", "EXPIRE")]


def test_revoked_client_defers_then_expires_with_a_dsn(parts: Parts, exmta_factory: Any) -> None:
    ex = parts.exmta(exmta_factory, lifetime="12s")
    send(ex, "before revocation")
    parts.sink.wait_for(1, timeout=60)
    # the app registration is deleted: the provider forgets the client and its tokens
    parts.oidc.restart([c for c in parts.clients if c["client_id"] != "exmta-app"])
    send(ex, "after revocation")

    def expired() -> bool:
        return any(e["event_id"] == "EXPIRE" for e in tracking(ex))
    wait_until(expired, 60, "the message to expire")
    events = tracking(ex)
    defers = [e for e in events if e["event_id"] == "DEFER"]
    assert defers and all("refused client exmta-app: HTTP 401 invalid_client" in e["reply"] for e in defers), defers
    wait_until(lambda: ex.maildir_messages(SENDER), 30, "the DSN to the device's sender")
    (dsn,) = ex.maildir_messages(SENDER)
    text = dsn.decode("utf-8", "replace").replace("\r\n", "\n")
    assert "Action: failed" in text and "bob@fabrikam.test" in text
    assert "refused client exmta-app" in text
    assert [m.message()["Subject"] for m in parts.sink.messages] == ["before revocation"]
    parts.no_secret_anywhere(ex)
