"""Issue 11 item 10: an unknown LDAP user takes the same path as a known one with a wrong password.

Before: an unknown name cost one connection (the lookup), a known one a second
TLS connection and a bind (48.5 vs 92.0 ms median), so timing told which
names exist. Now both make the lookup and then a TLS connection and a bind;
the test records the binds each makes against the real slapd.
"""
from __future__ import annotations

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal

from exmta.auth.avatar import ISubmitter
from exmta.auth.ldap import LDAPChecker, LDAPSettings
from support import slapd as slapd_mod
from support.slapd import SlapdServer
from support.sync import run_inline as sync

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    assert slapd_mod.available(), "slapd is not installed: run scripts/install-test-deps.sh"
    with SlapdServer(tmp_path_factory.mktemp("ldap")) as server:
        yield server


class RecordingChecker(LDAPChecker):
    """The real checker; records who each connection binds as (None: anonymous; the service account; a DN)."""

    def __init__(self, *args, **kw) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kw)
        self.binds: list[tuple[str, object]] = []

    def _open(self, user, password):  # noqa: ANN001, ANN202
        result = super()._open(user, password)
        kind = "service" if user == self.settings.bind_dn else "user-or-absent"
        self.binds.append((kind, "refused" if result is False else "bound"))
        return result


def _fail(checker: LDAPChecker, name: str, password: str) -> str:
    d = Portal(checker, [checker]).login(UsernamePassword(name.encode(), password.encode()), None, ISubmitter)
    out: list = []
    d.addBoth(out.append)
    [failure] = out
    assert failure.check(UnauthorizedLogin), failure
    return str(failure.value)


def test_unknown_and_known_users_take_the_same_path(slapd: SlapdServer) -> None:
    settings = LDAPSettings(uri=slapd.uri, base_dn=slapd.base_dn, ca_file=slapd.ca_file, bind_dn=slapd.bind_dn,
                            bind_password=slapd.bind_password, timeout=5.0)
    known, unknown = RecordingChecker(settings, sync), RecordingChecker(settings, sync)
    assert _fail(known, "alice", "not her password") == "wrong password"
    assert _fail(unknown, "nobody-here", "not her password") == "unknown user"
    assert known.binds == unknown.binds == [("service", "bound"), ("user-or-absent", "refused")]
