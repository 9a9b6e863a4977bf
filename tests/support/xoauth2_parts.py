"""The real parts of the XOAUTH2 relay tests, on loopback, stopped by PID.

:class:`Parts` starts npm oidc-provider (a secret client, a certificate
client, Dovecot's introspection client), an aiosmtpd sink, Dovecot
submission checking XOAUTH2 by introspection and relaying to the sink, and a
:class:`~support.wiretap.WireTap` in front of Dovecot; ``exmta()`` starts
exmta with an anonymous LAN connector and an ``auth = "xoauth2"`` send
connector pointed at them; ``no_secret_anywhere()`` checks logs and wire.
"""
from __future__ import annotations

import base64
import datetime
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from prometheus_client.parser import text_string_to_metric_families

from . import dovecot_submission, oidc
from .procs import LOOPBACK, free_port, wait_until
from .sinks import SmtpSink
from .tlscerts import TestPKI
from .wiretap import WireTap

SECRET = "s3cret-for-exmta-Zq8"
MAILBOX = "relay@example.test"

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
max_per_destination = 8                 # Dovecot allows 10 sessions per user and IP address
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

    def __init__(self, tmp: Path, ttl: int = 3600, mailbox: str = MAILBOX) -> None:
        if not (oidc.available() and dovecot_submission.available()):
            pytest.fail("needs node + npm oidc-provider and dovecot-submissiond: run scripts/deps-oauth2.sh")
        self.tmp = tmp
        self.pki = TestPKI(tmp / "pki")
        server = self.pki.issue("submission.example.test")
        self.app_cert, self.app_key = rsa_certificate(tmp / "app")
        self.clients = [oidc.secret_client("exmta-app", SECRET),
                        oidc.certificate_client("exmta-cert-app", self.app_cert.read_bytes()),
                        oidc.introspection_client()]
        self.mailbox = mailbox
        self.oidc = oidc.OIDCProvider(tmp / "oidc", self.clients, ttl=ttl, email=mailbox).start()
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
              secret: str = SECRET, toml: str = EXMTA_TOML, **kw: Any) -> Any:
        if client == "secret":
            client_id, credential = "exmta-app", f'client_secret = "{secret}"'
        else:
            client_id = "exmta-cert-app"
            credential = f'certificate = "{self.app_cert}"\nprivate_key = "{self.app_key}"'
        subst = {"next_hop": self.tap.next_hop, "ca_file": self.pki.ca_file, "token_url": self.oidc.token_url,
                 "client_id": client_id, "credential": credential, "lifetime": lifetime,
                 "metrics_port": self.metrics_port}
        return factory(toml=toml, subst=subst, **kw)

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def no_secret_anywhere(self, ex: Any, protocol_log: bool = True) -> None:
        """No token, no secret, no XOAUTH2 initial response in exmta's logs; nothing but EHLO/STARTTLS in clear."""
        tokens = self.oidc.issued()
        assert tokens, "no token was issued"
        needles = [t.encode() for t in tokens] + [SECRET.encode(), b"auth=Bearer",
                                                  base64.b64encode(f"user={self.mailbox}\x01".encode())[:20]]
        logs = [Path(ex.log_path)] + sorted((ex.data_dir / "log").rglob("*"))
        for path in logs:
            if path.is_file():
                data = path.read_bytes()
                assert not [n for n in needles if n in data], f"a secret in {path}"
        # judge complete sessions only: each one closed, or past STARTTLS (an idle one exmta keeps)
        wait_until(lambda: self.tap.settled(until=b"STARTTLS\r\n"), 30, "the sessions with the next hop to settle")
        wire = self.tap.client_bytes()
        assert wire and not [n for n in needles if n in wire], "a secret on the wire"
        for up, _down in self.tap.sessions:
            clear, sep, _tls = bytes(up).partition(b"STARTTLS\r\n")
            assert sep, f"a session without STARTTLS: {bytes(up)[:300]!r}"
            assert [line.split()[0] for line in clear.split(b"\r\n")[:-1]] == [b"EHLO"], clear
        if not protocol_log:
            return
        protocol = b"".join(p.read_bytes() for p in (ex.data_dir / "log").rglob("send-exo*.jsonl"))
        assert b'"AUTH XOAUTH2 <redacted>"' in protocol
