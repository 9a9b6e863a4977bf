"""Units of exmta.tls on task.Clock: contexts, reload by mtime and SIGHUP, the session gate, send contexts."""
from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
from OpenSSL import SSL
from support.tlscerts import TestPKI
from twisted.internet.task import Clock

from exmta.config.schema import (
    ReceiveConnectorConfig, ReceiveTLSConfig, SendConnectorConfig, TLSCertificateConfig,
)
from exmta.model import Session, TLSInfo
from exmta.tls.certs import CertificateError, load_certificate
from exmta.tls.client import SendTLS, send_tls_context
from exmta.tls.context import ImplicitTLSFactory, ServerTLS, ip_in, listening_factory, match_name
from exmta.tls.reload import TLSReloadService, configure_receive_tls
from exmta.tls.verify import MUST_STARTTLS, TLSGate, describe_tls_failure


@pytest.fixture
def pki(tmp_path):
    return TestPKI(tmp_path / "pki")


def tls_config(files, **kw) -> ReceiveTLSConfig:
    return ReceiveTLSConfig(certificate=TLSCertificateConfig(str(files.cert), str(files.key)), **kw)


def served_names(ctx: SSL.Context) -> tuple[str, ...]:
    from exmta.tls.certs import certificate_names

    conn = SSL.Connection(ctx, None)
    return certificate_names(conn.get_certificate().to_cryptography())


def bump(path) -> None:
    """Make sure the mtime moves even on coarse file systems."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


# ---------------------------------------------------------------- names and ranges


@pytest.mark.parametrize("pattern,name,ok", [
    ("mail.example", "mail.example", True),
    ("mail.example", "MAIL.Example.", True),
    ("*.example", "mx.example", True),
    ("*.example", "a.b.example", False),
    ("*.example", "example", False),
    ("mail.example", "mx.example", False),
])
def test_match_name(pattern, name, ok):
    assert match_name(pattern, name) is ok


def test_ip_in_handles_v4_mapped_and_garbage():
    from ipaddress import ip_network

    nets = (ip_network("192.0.2.0/24"), ip_network("2001:db8::/32"))
    assert ip_in("192.0.2.9", nets) and ip_in("::ffff:192.0.2.9", nets) and ip_in("2001:db8::1", nets)
    assert not ip_in("198.51.100.1", nets) and not ip_in("not-an-ip", nets) and not ip_in(None, nets)


# ---------------------------------------------------------------- contexts


def test_modern_context_refuses_old_versions_and_legacy_context_only_for_pinned(pki):
    files = pki.server("mx.example.test")
    tls = ServerTLS("in", tls_config(files, legacy_networks=("192.0.2.0/24",)), Clock())
    modern, legacy = tls.context_for("198.51.100.1"), tls.context_for("192.0.2.7")
    assert modern is not legacy
    assert tls.context_for(None) is modern
    no_legacy = ServerTLS("in", tls_config(files), Clock())
    assert no_legacy.context_for("192.0.2.7") is no_legacy.context_for("198.51.100.1")
    assert served_names(modern) == ("mx.example.test",)


def test_certificate_problems_at_construction_name_the_file(pki):
    files = pki.server("old.example.test", expired=True)
    with pytest.raises(CertificateError, match=str(files.cert)):
        ServerTLS("in", tls_config(files), Clock())


def test_load_certificate_facts(pki):
    files = pki.server("mx.example.test", "smtp.example.test")
    loaded = load_certificate(str(files.cert), str(files.key))
    assert loaded.names == ("mx.example.test", "smtp.example.test")
    assert loaded.paths == (str(files.cert), str(files.key))
    assert loaded.chain_pem == ()  # trustme signs leaves with its root directly


# ---------------------------------------------------------------- reload


def test_changed_files_are_reloaded_after_the_interval(pki):
    files = pki.server("mx.example.test")
    clock = Clock()
    tls = ServerTLS("in", tls_config(files, reload_interval=60.0), clock)
    before = tls.context_for(None)
    new = pki.server("mx2.example.test", file="new")
    files.cert.write_bytes(new.cert.read_bytes())
    files.key.write_bytes(new.key.read_bytes())
    bump(files.cert)
    tls.maybe_reload()
    assert tls.context_for(None) is before  # interval not over yet
    clock.advance(60)
    tls.maybe_reload()
    assert tls.reloads == 1
    assert served_names(tls.context_for(None)) == ("mx2.example.test",)
    clock.advance(60)
    tls.maybe_reload()
    assert tls.reloads == 1  # unchanged files are not read again


def test_a_bad_new_certificate_keeps_the_old_one(pki):
    files = pki.server("mx.example.test")
    tls = ServerTLS("in", tls_config(files), Clock())
    expired = pki.server("mx.example.test", file="expired", expired=True)
    files.cert.write_bytes(expired.cert.read_bytes())
    files.key.write_bytes(expired.key.read_bytes())
    bump(files.cert)
    assert tls.reload() is False
    assert tls.reload_failures == 1
    assert served_names(tls.context_for(None)) == ("mx.example.test",)
    other = pki.server("x.example.test", file="other")
    files.key.write_bytes(other.key.read_bytes())  # mismatched key: same outcome
    bump(files.key)
    assert tls.reload() is False and tls.reload_failures == 2


def test_reload_service_polls_on_its_clock_and_on_sighup(pki):
    files = pki.server("mx.example.test")
    clock = Clock()
    tls = ServerTLS("in", tls_config(files, reload_interval=30.0), clock)
    service = TLSReloadService([tls], clock, reactor=None)
    previous = signal.getsignal(signal.SIGHUP)
    service.startService()
    try:
        assert signal.getsignal(signal.SIGHUP) == service._on_sighup
        new = pki.server("mx3.example.test", file="new3")
        files.cert.write_bytes(new.cert.read_bytes())
        files.key.write_bytes(new.key.read_bytes())
        bump(files.cert)
        clock.advance(30)
        assert tls.reloads == 1 and served_names(tls.context_for(None)) == ("mx3.example.test",)
        service._on_sighup(signal.SIGHUP, None)  # forced: read again even if unchanged
        assert tls.reloads == 2
    finally:
        service.stopService()
    assert signal.getsignal(signal.SIGHUP) == previous
    assert clock.getDelayedCalls() == []


def test_real_sighup_reaches_the_service(pki):
    files = pki.server("mx.example.test")
    clock = Clock()
    tls = ServerTLS("in", tls_config(files, reload_interval=0), clock)
    service = TLSReloadService([tls], clock, reactor=None)
    service.startService()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert tls.reloads == 1
    finally:
        service.stopService()


# ---------------------------------------------------------------- wiring


def test_configure_receive_tls_sets_the_factory(pki):
    files = pki.server("mx.example.test")
    factory = SimpleNamespace(tls_context_factory=None, implicit_tls=False, tls_gate=None)
    rc = ReceiveConnectorConfig(name="in", tls=tls_config(files, implicit=True), require_tls=True)
    server_tls = configure_receive_tls(factory, rc, Clock())
    assert factory.tls_context_factory is server_tls and factory.implicit_tls
    assert isinstance(factory.tls_gate, TLSGate) and factory.tls_gate.require_tls
    assert isinstance(listening_factory(factory, Clock()), ImplicitTLSFactory)
    plain = SimpleNamespace(tls_context_factory=None, implicit_tls=False, tls_gate=None)
    assert configure_receive_tls(plain, ReceiveConnectorConfig(name="p"), Clock()) is None
    assert plain.tls_gate is None and listening_factory(plain) is plain


# ---------------------------------------------------------------- the gate


def fake_server(tls_active: bool, peer_ip: str = "198.51.100.1", tls: TLSInfo | None = None, problem=None):
    session = Session(peer_ip=peer_ip, session_id="s1", helo_name="c.test", tls=tls)
    return SimpleNamespace(session=session, tls_active=tls_active, tls_client_problem=problem, transport=None)


def test_gate_require_tls_and_plaintext_networks(pki):
    files = pki.server("mx.example.test")
    rc = ReceiveConnectorConfig(name="in", tls=tls_config(files, plaintext_networks=("192.0.2.0/24",)),
                                require_tls=True)
    gate = TLSGate(rc, ServerTLS("in", rc.tls, Clock()))
    assert gate.check_mail(fake_server(False)) is MUST_STARTTLS
    assert str(MUST_STARTTLS) == "530 5.7.0 Must issue a STARTTLS command first"
    assert gate.check_mail(fake_server(False, "192.0.2.5")) is None
    assert gate.check_mail(fake_server(True, tls=TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256"))) is None


def test_gate_partner_replies(pki):
    files = pki.server("mx.example.test")
    rc = ReceiveConnectorConfig(name="in", tls=tls_config(
        files, client_certificate="require", client_names=("mail.protection.outlook.com",)))
    gate = TLSGate(rc, None)
    tls = TLSInfo("TLSv1.3", "X")
    assert str(gate.check_mail(fake_server(True, tls=tls, problem="no client certificate"))) == \
        "530 5.7.1 Client was not authenticated: this connector requires a client certificate"
    assert str(gate.check_mail(fake_server(True, tls=tls, problem="certificate names a.test match none of b"))) \
        == "530 5.7.1 Client was not authenticated: certificate names a.test match none of b"
    ok = TLSInfo("TLSv1.3", "X", partner="mail.protection.outlook.com")
    assert gate.check_mail(fake_server(True, tls=ok)) is None
    assert gate.check_mail(fake_server(False)) is MUST_STARTTLS  # a partner connector needs TLS first


def test_describe_tls_failure():
    err = SSL.Error([("SSL routines", "", "wrong version number")])
    assert describe_tls_failure(err) == "TLS handshake failed: wrong version number"
    assert describe_tls_failure(ConnectionResetError()) is None
    assert describe_tls_failure(None) is None


# ---------------------------------------------------------------- send side


def test_send_tls_levels(pki):
    assert send_tls_context(SendConnectorConfig(name="o", tls="none")) is None
    enc = SendTLS(SendConnectorConfig(name="o"))
    creator = enc("mx.example.test")
    assert creator.verify is False and creator.check_name is None
    assert enc("mx.example.test") is creator  # cached per host
    cert = SendTLS(SendConnectorConfig(name="o", tls="mandatory", tls_auth_level="certificate",
                                       tls_ca_file=str(pki.ca_file)))
    assert cert("mx.example.test").verify is True and cert("mx.example.test").check_name is None
    dom = SendTLS(SendConnectorConfig(name="o", tls="mandatory", tls_auth_level="domain",
                                      tls_domain="mail.protection.outlook.com"))
    assert dom("10.0.0.1").check_name == "mail.protection.outlook.com"
    by_host = SendTLS(SendConnectorConfig(name="o", tls="mandatory", tls_auth_level="domain"))
    assert by_host("mx1.example.test").check_name == "mx1.example.test"


def test_send_tls_client_certificate_reload(pki):
    client = pki.client("relay.example.test", file="relay")
    send = SendTLS(SendConnectorConfig(name="o", tls_certificate=str(client.cert), tls_key=str(client.key)))
    first = send("mx.example.test")
    assert served_names(first.ctx) == ("relay.example.test",)
    new = pki.client("relay2.example.test", file="relay2")
    client.cert.write_bytes(new.cert.read_bytes())
    client.key.write_bytes(new.key.read_bytes())
    bump(client.cert)
    second = send("mx.example.test")
    assert second is not first and served_names(second.ctx) == ("relay2.example.test",)
    broken = pki.client("x.example.test", file="x")
    client.key.write_bytes(broken.key.read_bytes())
    bump(client.key)
    assert served_names(send("mx.example.test").ctx) == ("relay2.example.test",)  # old one kept


def test_certificates_about_to_expire_are_reported_daily(pki):
    import datetime
    import time

    files = pki.server("mx.example.test")
    clock = Clock()
    clock.advance(time.time())
    tls = ServerTLS("in", tls_config(files, reload_interval=0), clock)
    service = TLSReloadService([tls], clock, install_signal=False)
    not_after = tls.certificates[0].not_after.timestamp()
    assert service.interval == 3600.0  # hourly even without file polling
    assert service.warn_expiring() == []
    clock.advance(not_after - clock.seconds() - 3 * 86400)  # three days left
    [text] = service.warn_expiring()
    assert "mx.example.test" in text and "expires in 3.0 day(s)" in text and str(files.cert) in text
    assert service.warn_expiring() == []  # once a day
    clock.advance(86400 * 4)
    [text] = service.warn_expiring()
    assert "expired on" in text
    assert tls.certificates[0].not_after > datetime.datetime.now(datetime.timezone.utc)


def test_implicit_tls_handshake_times_out_on_the_clock(pki):
    from twisted.internet.address import IPv4Address
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import StringTransport

    files = pki.server("mx.example.test")
    clock = Clock()
    started: list[Protocol] = []

    class Session(Protocol):
        def connectionMade(self) -> None:
            started.append(self)

    inner = Factory.forProtocol(Session)
    inner.config = ReceiveConnectorConfig(name="smtps", command_timeout=30.0)
    factory = ImplicitTLSFactory(ServerTLS("smtps", tls_config(files), clock), inner, clock=clock)
    assert factory.handshake_timeout == 30.0  # min(60, the connector's command timeout)
    proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1234))
    transport = StringTransport()
    proto.makeConnection(transport)
    assert started == []  # no SMTP session before the handshake
    clock.advance(29)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting  # aborted: a silent client holds no slot
    assert clock.getDelayedCalls() == []
