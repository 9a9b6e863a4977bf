"""The LDAP / AD checker against a real OpenLDAP slapd (StartTLS and LDAPS, test CA, AD-like schema)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.threads import deferToThread

from exmta.auth.avatar import ISubmitter, TemporaryAuthFailure
from exmta.auth.ldap import LDAPChecker, LDAPSettings
from support import slapd as slapd_mod
from support.procs import free_port
from support.slapd import SlapdServer
from support.sync import run_inline as sync

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    assert slapd_mod.available(), "slapd is not installed: run scripts/install-test-deps.sh"
    with SlapdServer(tmp_path_factory.mktemp("ldap")) as server:
        yield server


def settings(server: SlapdServer, **kw) -> LDAPSettings:
    base = LDAPSettings(uri=server.uri, base_dn=server.base_dn, ca_file=server.ca_file,
                        bind_dn=server.bind_dn, bind_password=server.bind_password, timeout=5.0)
    return replace(base, **kw)


def login(checker: LDAPChecker, user: str, password: str):
    """The avatar, or the exception the Portal login failed with."""
    d = Portal(checker, [checker]).login(UsernamePassword(user.encode(), password.encode()), None, ISubmitter)
    results: list = []
    d.addBoth(results.append)
    [result] = results  # sync runner: already fired
    if hasattr(result, "value"):
        return result.value
    return result[1]


@pytest.mark.parametrize("login_name", ["alice", "ALICE", "alice@corp.example.test", "alice@example.test"])
def test_good_password_by_each_login_attribute(slapd, login_name):
    avatar = login(LDAPChecker(settings(slapd), sync), login_name, "alice-secret")
    assert avatar.identity == "alice@corp.example.test"  # the userPrincipalName


def test_proxy_addresses_and_mail_are_the_send_as_grants(slapd):
    avatar = login(LDAPChecker(settings(slapd), sync), "alice", "alice-secret")
    grants = avatar.grants
    for address in ("alice@example.test", "A.Example@Example.test", "alice@legacy.example.test"):
        assert grants.allows(address), address
    for address in ("bob@example.test", "alice@corp.example.test", "sip:alice@example.test", "/o=Example"):
        assert not grants.allows(address), address
    assert grants.describe() == ["a.example@example.test", "alice@example.test", "alice@legacy.example.test"]


def test_entry_without_upn_is_known_by_its_mail(slapd):
    avatar = login(LDAPChecker(settings(slapd), sync), "bob", "bob-secret")
    assert avatar.identity == "bob@example.test"
    assert avatar.grants.describe() == ["bob@example.test"]


def test_bad_password_unknown_user_and_empty_password(slapd):
    checker = LDAPChecker(settings(slapd), sync)
    assert isinstance(login(checker, "alice", "wrong"), UnauthorizedLogin)
    assert isinstance(login(checker, "nobody", "alice-secret"), UnauthorizedLogin)
    # an empty password would be an LDAP "unauthenticated bind", which succeeds: never sent
    assert isinstance(login(checker, "alice", ""), UnauthorizedLogin)


@pytest.mark.parametrize("login_name", ["*", "alice)(mail=*", "al*", "alice\\", "(|(sAMAccountName=*))"])
def test_filter_injection_does_not_match(slapd, login_name):
    assert isinstance(login(LDAPChecker(settings(slapd), sync), login_name, "alice-secret"), UnauthorizedLogin)


def test_ambiguous_login_name_is_refused(slapd):
    assert isinstance(login(LDAPChecker(settings(slapd), sync), "twins@example.test", "twin-secret"),
                      UnauthorizedLogin)
    assert login(LDAPChecker(settings(slapd), sync), "twin1", "twin-secret").identity == "twins@example.test"
    # three matches pass the search's size limit: still a refused login, not a directory error
    assert isinstance(login(LDAPChecker(settings(slapd), sync), "triplets@example.test", "t-secret"),
                      UnauthorizedLogin)


def test_ldaps(slapd):
    checker = LDAPChecker(settings(slapd, uri=slapd.ldaps_uri, tls="ldaps"), sync)
    assert login(checker, "alice", "alice-secret").identity == "alice@corp.example.test"
    assert isinstance(login(checker, "alice", "nope"), UnauthorizedLogin)


def test_user_filter_narrows_the_lookup(slapd):
    checker = LDAPChecker(settings(slapd, user_filter="(proxyAddresses=*)"), sync)
    assert login(checker, "alice", "alice-secret").identity == "alice@corp.example.test"
    assert isinstance(login(checker, "bob", "bob-secret"), UnauthorizedLogin)


def test_untrusted_directory_certificate_is_a_temporary_failure(slapd):
    checker = LDAPChecker(settings(slapd, ca_file=None), sync)  # the system store does not know the test CA
    assert isinstance(login(checker, "alice", "alice-secret"), TemporaryAuthFailure)


def test_certificate_name_must_match(slapd):
    checker = LDAPChecker(settings(slapd, uri=f"ldap://127.0.0.2:{slapd.port}"), sync)
    assert isinstance(login(checker, "alice", "alice-secret"), TemporaryAuthFailure)  # refused or mismatched


def test_directory_down_is_a_temporary_failure():
    s = LDAPSettings(uri=f"ldap://127.0.0.1:{free_port()}", base_dn="dc=example,dc=test", timeout=2.0)
    assert isinstance(login(LDAPChecker(s, sync), "alice", "alice-secret"), TemporaryAuthFailure)


def test_refused_lookup_account_is_a_temporary_failure(slapd):
    checker = LDAPChecker(settings(slapd, bind_password="wrong"), sync)
    assert isinstance(login(checker, "alice", "alice-secret"), TemporaryAuthFailure)


def test_anonymous_lookup_finds_nothing_here_as_in_ad(slapd):
    checker = LDAPChecker(settings(slapd, bind_dn=None, bind_password=None), sync)
    assert isinstance(login(checker, "alice", "alice-secret"), UnauthorizedLogin)


# ------------------------------------------------------------ through the SMTP server, on the reactor's thread pool


@pytest.fixture
def ldap_submission(slapd):
    import trustme
    from twisted.internet import reactor
    from twisted.internet.ssl import PrivateCertificate

    from exmta.auth.smtp import build_authenticator
    from exmta.config.schema import AuthBackendConfig, Config, ReceiveConnectorConfig
    from exmta.filters.base import FilterChain
    from exmta.smtp.server import ESMTPServerFactory
    from exmta.testing.memstore import MemoryStore
    from support.smtp_stubs import StubPolicy

    rc = ReceiveConnectorConfig(name="submission", hostname="mx.loop.test", auth=("PLAIN", "LOGIN"),
                                auth_backend="corp", auth_tarpit=0.1)
    backend = AuthBackendConfig(name="corp", kind="ldap", uri=slapd.uri, base_dn=slapd.base_dn,
                                ca_file=slapd.ca_file, bind_dn=slapd.bind_dn, bind_password=slapd.bind_password,
                                timeout=5.0)
    config = Config(receive=(rc,), auth_backends=(backend,))
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ctx = PrivateCertificate.loadPEM(cert.private_key_and_cert_chain_pem.bytes()).options()
    store = MemoryStore(reactor)
    policy = StubPolicy(relay_authenticated=True)
    factory = ESMTPServerFactory(rc, policy, FilterChain([], reactor), store, reactor, tls_context_factory=ctx)
    factory.authenticator = build_authenticator(config, rc, reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield port.getHost().port, store, ca
    port.stopListening()
    for session in list(factory.sessions):
        session.transport.abortConnection()


def _submit(port, ca, user, password, sender):
    import smtplib
    import ssl

    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.starttls(context=ctx)
        try:
            client.login(user, password)
        except smtplib.SMTPAuthenticationError as e:
            return ("auth", e.smtp_code)
        try:
            client.sendmail(sender, ["x@remote.test"], f"From: {sender}\r\nSubject: t\r\n\r\nx\r\n".encode())
        except smtplib.SMTPSenderRefused as e:
            return ("sender", e.smtp_code, e.smtp_error)
        return ("sent",)


@pytest_twisted.inlineCallbacks
def test_smtp_auth_against_the_directory(ldap_submission):
    port, store, ca = ldap_submission
    assert (yield deferToThread(_submit, port, ca, "alice", "alice-secret", "a.example@example.test")) == ("sent",)
    assert (yield deferToThread(_submit, port, ca, "alice@corp.example.test", "alice-secret",
                                "alice@legacy.example.test")) == ("sent",)
    assert (yield deferToThread(_submit, port, ca, "alice", "wrong", "alice@example.test")) == ("auth", 535)
    assert (yield deferToThread(_submit, port, ca, "nobody", "x", "alice@example.test")) == ("auth", 535)
    assert (yield deferToThread(_submit, port, ca, "bob", "bob-secret", "alice@example.test")) == (
        "sender", 550, b"5.7.60 Client does not have permissions to send as this sender")
    envelopes = yield store.list_messages("incoming")
    assert sorted(e.sender for e in envelopes) == ["a.example@example.test", "alice@legacy.example.test"]
    assert {e.auth_identity for e in envelopes} == {"alice@corp.example.test"}
