"""exmta as a real process (twistd) with TLS against a real Postfix, both ways.

* exmta -> Postfix: the send connector does mandatory TLS with domain
  validation against the test CA and presents a client certificate, which
  Postfix verifies ("Trusted TLS connection", "(verified OK)" in its
  Received header); a name that does not match defers the message with the
  reason in the tracking log and nothing is sent in plaintext.
* Postfix -> exmta: Postfix relays into a partner connector presenting a
  client certificate (smtp_tls_cert_file), as Exchange Online does; a
  certificate with another name is refused with 530 5.7.1.
* implicit TLS (465) in the process, and certificate files replaced on disk
  picked up on SIGHUP without a restart.
"""
from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import ssl
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
from support.procs import free_port, make_traversable, wait_until
from support.tlscerts import TestPKI

pytestmark = pytest.mark.integration

EXMTA_HOST = "mx.example.test"
PF_HOST = "postfix.example.test"


@pytest.fixture
def pki(tmp_path):
    pki = TestPKI(tmp_path / "pki")
    make_traversable(pki.directory)
    return pki


def readable(*paths: Path) -> None:
    """Postfix's daemons read the files as the postfix user."""
    for p in paths:
        os.chmod(p, 0o644)


def exmta_config(*, smarthost: str | None = None, send_tls: str = "", receive_tls: str = "",
                 extra: str = "", workers: int = 0) -> str:
    out = f"""
[server]
hostname = "{EXMTA_HOST}"
data_dir = "{{data_dir}}"
receive_workers = {workers}

[accepted_domains]
"example.test" = "authoritative"

[receive.default]
listen = ["tcp:{{port}}:interface=127.0.0.1"]
relay_networks = ["127.0.0.0/8"]
{receive_tls}

[send.local]
type = "maildir"
root = "mail"

[[route]]
domains = ["example.test"]
connector = "local"

[queue]
retry_schedule = ["1s"]
"""
    if smarthost:
        out += f"""
[send.relay]
type = "smtp"
smarthosts = ["{smarthost}"]
connect_timeout = "5s"
{send_tls}

[[route]]
domains = ["*"]
connector = "relay"
"""
    return out + extra


def submit(port: int, rcpt: str, subject: str) -> None:
    msg = EmailMessage()
    msg["From"] = "alice@example.test"
    msg["To"] = rcpt
    msg["Subject"] = subject
    msg.set_content("over TLS\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.send_message(msg)


def tracking(ex) -> list[dict]:
    path = ex.data_dir / "log" / "tracking.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def postfix_tls_server(pki: TestPKI) -> dict[str, str]:
    files = pki.server(PF_HOST, file="postfix")
    readable(files.cert, files.key, pki.ca_file)
    return {
        "smtpd_tls_cert_file": str(files.cert),
        "smtpd_tls_key_file": str(files.key),
        "smtpd_tls_security_level": "may",
        "smtpd_tls_CAfile": str(pki.ca_file),
        "smtpd_tls_ask_ccert": "yes",
        "smtpd_tls_received_header": "yes",
        "smtpd_tls_loglevel": "1",
    }


# ---------------------------------------------------------------- exmta -> Postfix


def test_mandatory_domain_validated_tls_to_postfix_with_a_client_certificate(tmp_path, pki, postfix_factory,
                                                                             exmta_factory):
    pf = postfix_factory(maildir_domains=["example.net"], main_cf=postfix_tls_server(pki))
    relay = pki.client("relay.example.test", file="relay")
    send_tls = f"""tls = "mandatory"
tls_auth_level = "domain"
tls_domain = "{PF_HOST}"
tls_ca_file = "{pki.ca_file}"
tls_certificate = "{relay.cert}"
tls_key = "{relay.key}"
"""
    ex = exmta_factory(toml=exmta_config(smarthost=f"[127.0.0.1]:{pf.port}", send_tls=send_tls))
    submit(ex.port, "bob@example.net", "verified tls")
    [message] = pf.wait_maildir("bob@example.net", 1, timeout=30)
    text = message.decode(errors="replace")
    assert "(using TLSv1.3 with cipher" in text
    assert '(Client CN "relay.example.test", Issuer "exmta test ca" (verified OK))' in text
    # the log lines are written by other processes (postlogd; exmta after Postfix's 250) and may trail
    # the message in the Maildir: wait for them
    pf.wait_log(r"Trusted TLS connection established from", timeout=30)

    def delivered() -> list[dict]:
        return [e for e in tracking(ex) if e.get("event_id") in ("SEND", "DELIVER") and e.get("tls")]
    wait_until(lambda: bool(delivered()), 30, "the SEND event in exmta's tracking log", interval=0.1)
    assert delivered()[-1]["tls"].startswith("TLSv1.3 ")
    assert ex.error_lines() == []


def test_opportunistic_default_encrypts_to_postfix(tmp_path, pki, postfix_factory, exmta_factory):
    pf = postfix_factory(maildir_domains=["example.net"], main_cf=postfix_tls_server(pki))
    ex = exmta_factory(toml=exmta_config(smarthost=f"[127.0.0.1]:{pf.port}"))  # tls: default settings
    submit(ex.port, "bob@example.net", "opportunistic")
    [message] = pf.wait_maildir("bob@example.net", 1, timeout=30)
    assert b"(using TLSv1.3 with cipher" in message
    assert "Anonymous TLS connection established from" in pf.log_text()  # no client certificate by default


def test_name_mismatch_defers_with_the_reason_and_never_sends_in_plaintext(tmp_path, pki, postfix_factory,
                                                                           exmta_factory):
    pf = postfix_factory(maildir_domains=["example.net"], main_cf=postfix_tls_server(pki))
    send_tls = f"""tls = "mandatory"
tls_auth_level = "domain"
tls_domain = "wrong.example.test"
tls_ca_file = "{pki.ca_file}"
"""
    ex = exmta_factory(toml=exmta_config(smarthost=f"[127.0.0.1]:{pf.port}", send_tls=send_tls))
    submit(ex.port, "bob@example.net", "must not leave")

    def deferred_with_reason() -> bool:
        return any(e.get("event_id") == "DEFER" and "do not match wrong.example.test" in json.dumps(e)
                   for e in tracking(ex))

    wait_until(deferred_with_reason, 30, "a DEFER with the TLS reason in the tracking log", interval=0.2)
    [event] = [e for e in tracking(ex) if e.get("event_id") == "DEFER"][:1]
    text = json.dumps(event)
    assert f"certificate names ({PF_HOST}) do not match wrong.example.test" in text
    assert "4.7.5" in text
    time.sleep(2.5)  # at least one retry (retry_schedule 1s): still never in plaintext
    assert pf.maildir_messages("bob@example.net") == []
    assert "from=<alice@example.test>" not in pf.log_text()
    assert ex.error_lines() == []


def test_mandatory_tls_to_a_server_without_starttls_defers_and_says_why(tmp_path, pki, postfix_factory,
                                                                        exmta_factory):
    pf = postfix_factory(maildir_domains=["example.net"])  # no TLS at all
    ex = exmta_factory(toml=exmta_config(smarthost=f"[127.0.0.1]:{pf.port}", send_tls='tls = "mandatory"'))
    submit(ex.port, "bob@example.net", "needs tls")
    wait_until(lambda: any(e.get("event_id") == "DEFER" and "TLS is mandatory but the remote server does not "
                           "offer STARTTLS" in e.get("reply", "") for e in tracking(ex)), 30, "DEFER", interval=0.2)
    assert pf.maildir_messages("bob@example.net") == []
    assert "from=<alice@example.test>" not in pf.log_text()


def test_certificate_level_refuses_an_unknown_ca(tmp_path, pki, postfix_factory, exmta_factory):
    pf = postfix_factory(maildir_domains=["example.net"], main_cf=postfix_tls_server(pki))
    stranger = pki.other_ca("stranger-ca")
    send_tls = f"""tls = "mandatory"
tls_auth_level = "certificate"
tls_ca_file = "{stranger.ca_file}"
"""
    ex = exmta_factory(toml=exmta_config(smarthost=f"[127.0.0.1]:{pf.port}", send_tls=send_tls))
    submit(ex.port, "bob@example.net", "unknown ca")
    # trustme sends its root with the chain, so OpenSSL's words are "self-signed certificate in the chain"
    wait_until(lambda: any(e.get("event_id") == "DEFER" and "TLS handshake failed: certificate verify failed: "
                           "self-signed certificate in the chain" in e.get("reply", "") for e in tracking(ex)),
               30, "DEFER for the unknown CA", interval=0.2)
    assert pf.maildir_messages("bob@example.net") == []


# ---------------------------------------------------------------- Postfix -> exmta (partner connector)


def partner_receive_tls(pki: TestPKI) -> str:
    files = pki.server(EXMTA_HOST, file="exmta")
    return f"""
[receive.default.tls]
cert = "{files.cert}"
key = "{files.key}"
client_certificate = "require"
client_ca = "{pki.ca_file}"
client_names = ["mail.protection.outlook.com"]
"""


def postfix_client(pki: TestPKI, name: str, exmta_port: int) -> dict[str, str]:
    cert = pki.client(name, file=f"client-{name}")
    readable(cert.cert, cert.key, pki.ca_file)
    return {
        "relayhost": f"[127.0.0.1]:{exmta_port}",
        "smtp_tls_security_level": "encrypt",
        "smtp_tls_cert_file": str(cert.cert),
        "smtp_tls_key_file": str(cert.key),
        "smtp_tls_CAfile": str(pki.ca_file),
        "smtp_tls_loglevel": "1",
    }


def test_postfix_presents_a_partner_certificate_to_exmta(tmp_path, pki, postfix_factory, exmta_factory):
    port = free_port()
    ex = exmta_factory(toml=exmta_config(receive_tls=partner_receive_tls(pki)), port=port)
    pf = postfix_factory(main_cf=postfix_client(pki, "mail.protection.outlook.com", port))
    pf.send("sender@partner.test", ["carol@example.test"], b"Subject: from the partner\r\n\r\nhello\r\n")
    wait_until(lambda: ex.maildir_messages("carol@example.test"), 30, "the partner's message in exmta")
    [message] = ex.maildir_messages("carol@example.test")
    assert b"\t(using TLSv1.3 with cipher " in message and b"with ESMTPS id" in message
    assert "client certificate accepted for 127.0.0.1 on default: mail.protection.outlook.com" in ex.log_text()
    assert ex.error_lines() == []


def test_postfix_with_another_certificate_is_refused_by_the_partner_connector(tmp_path, pki, postfix_factory,
                                                                               exmta_factory):
    port = free_port()
    ex = exmta_factory(toml=exmta_config(receive_tls=partner_receive_tls(pki)), port=port)
    pf = postfix_factory(main_cf=postfix_client(pki, "relay.fabrikam.test", port))
    pf.send("sender@fabrikam.test", ["carol@example.test"], b"Subject: not a partner\r\n\r\nhello\r\n")
    pf.wait_log(r"530 5\.7\.1 Client was not authenticated: certificate names relay\.fabrikam\.test match "
                r"none of mail\.protection\.outlook\.com", timeout=30)
    assert ex.maildir_messages("carol@example.test") == []
    assert "client certificate refused for 127.0.0.1 on default: certificate names relay.fabrikam.test" \
        in ex.log_text()
    assert ex.error_lines() == []


# ---------------------------------------------------------------- implicit TLS and reload in the process


def served_names(port: int, pki: TestPKI, sni: str) -> list[str]:
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            banner = tls.recv(200)
            assert banner.startswith(b"220 "), banner
            tls.sendall(b"QUIT\r\n")
            return [v for _, v in tls.getpeercert()["subjectAltName"]]


def test_implicit_tls_listener_and_sighup_reload(tmp_path, pki, exmta_factory):
    first = pki.server("smtps1.example.test", file="smtps")
    port465 = free_port()
    extra = f"""
[receive.smtps]
listen = ["tcp:{port465}:interface=127.0.0.1"]
relay_networks = ["127.0.0.0/8"]
[receive.smtps.tls]
cert = "{first.cert}"
key = "{first.key}"
implicit = true
reload_interval = "1h"
"""
    ex = exmta_factory(toml=exmta_config(extra=extra))
    assert served_names(port465, pki, "smtps1.example.test") == ["smtps1.example.test"]
    second = pki.server("smtps2.example.test", file="smtps2")
    first.cert.write_bytes(second.cert.read_bytes())
    first.key.write_bytes(second.key.read_bytes())
    os.kill(ex.pid, signal.SIGHUP)
    wait_until(lambda: "TLS certificates of receive.smtps reloaded" in ex.log_text(), 15, "reload log line")
    assert served_names(port465, pki, "x") == ["smtps2.example.test"]
    assert ex.running()
    # a bad file on SIGHUP: logged, the good certificate stays
    expired = pki.server("old.example.test", file="old", expired=True)
    first.cert.write_bytes(expired.cert.read_bytes())
    first.key.write_bytes(expired.key.read_bytes())
    os.kill(ex.pid, signal.SIGHUP)
    wait_until(lambda: "TLS certificates of receive.smtps not reloaded" in ex.log_text(), 15, "refusal log line")
    assert "expired on" in ex.log_text()
    assert served_names(port465, pki, "x") == ["smtps2.example.test"]
    assert ex.error_lines() == []


def test_receive_worker_processes_serve_starttls_and_implicit_tls(tmp_path, pki, exmta_factory):
    """With receive_workers the listening sockets are shared: the workers do TLS the same way."""
    files = pki.server(EXMTA_HOST, file="exmta")
    port465 = free_port()
    receive_tls = f"""
require_tls = true
[receive.default.tls]
cert = "{files.cert}"
key = "{files.key}"
"""
    extra = f"""
[receive.smtps]
listen = ["tcp:{port465}:interface=127.0.0.1"]
relay_networks = ["127.0.0.0/8"]
[receive.smtps.tls]
cert = "{files.cert}"
key = "{files.key}"
implicit = true
"""
    ex = exmta_factory(toml=exmta_config(receive_tls=receive_tls, extra=extra, workers=2))
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    chain_only = ssl.create_default_context(cafile=str(pki.ca_file))
    chain_only.check_hostname = False  # SMTP_SSL would check the name against "127.0.0.1"
    for i in range(6):  # several connections, so that workers and the main process all take some
        with smtplib.SMTP("127.0.0.1", ex.port, timeout=20) as client:
            client.ehlo("c.test")
            assert client.mail("a@example.test") == (530, b"5.7.0 Must issue a STARTTLS command first")
            client.rset()
            client._host = EXMTA_HOST
            client.starttls(context=ctx)
            client.sendmail("a@example.test", ["dave@example.test"], f"Subject: starttls {i}\r\n\r\nx\r\n")
        with smtplib.SMTP_SSL("127.0.0.1", port465, timeout=20, context=chain_only) as client:
            client.sendmail("a@example.test", ["dave@example.test"], f"Subject: 465 {i}\r\n\r\nx\r\n")
    wait_until(lambda: len(ex.maildir_messages("dave@example.test")) == 12, 30, "12 messages for dave")
    assert all(b"(using TLSv1.3 with cipher" in m for m in ex.maildir_messages("dave@example.test"))
    assert ex.error_lines() == []


def _tls10_behind_proxy(port: int, pki: TestPKI, client_ip: str) -> str:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl.TLSVersion.TLSv1: that is the point
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(f"PROXY TCP4 {client_ip} 127.0.0.1 40000 465\r\n".encode())
        try:
            with ctx.wrap_socket(raw, server_hostname=EXMTA_HOST) as tls:
                banner = tls.recv(200)
                tls.sendall(b"QUIT\r\n")
                return f"{tls.version()} {banner[:3].decode()}"
        except (ssl.SSLError, ConnectionError) as e:
            return f"refused: {e.__class__.__name__}"


def test_legacy_networks_behind_haproxy_use_the_proxied_address(tmp_path, pki, exmta_factory):
    files = pki.server(EXMTA_HOST, file="exmta")
    port465 = free_port()
    extra = f"""
[receive.smtps]
listen = ["haproxy:tcp:{port465}:interface=127.0.0.1"]
[receive.smtps.tls]
cert = "{files.cert}"
key = "{files.key}"
implicit = true
legacy_networks = ["192.0.2.0/24"]
"""
    ex = exmta_factory(toml=exmta_config(extra=extra))
    assert _tls10_behind_proxy(port465, pki, "192.0.2.7") == "TLSv1 220"
    assert _tls10_behind_proxy(port465, pki, "198.51.100.1").startswith("refused")
    assert ex.error_lines() == []
