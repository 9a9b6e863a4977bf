"""FromMemberOf / SentToMemberOf against a real OpenLDAP slapd (StartTLS, the AD-like test directory)."""
from __future__ import annotations

import pytest
from support import mime_samples as S
from support import slapd as slapd_mod
from support.rulekit import ctx, rules
from support.slapd import PEOPLE, SlapdServer

from exmta.auth.ldap import LDAPChecker, LDAPSettings
from exmta.config.load import ConfigError, parse_config
from exmta.rules.directory import DirectoryGroups, DirectoryUnavailable

pytestmark = pytest.mark.integration

BASE = "dc=example,dc=test"
GROUPS = [
    ("finance", "x-unused", {"mail": ["finance@example.test"], "member": [f"cn=alice,ou=people,{BASE}"]}),
    ("all-staff", "x-unused", {"mail": ["staff@example.test"],
                               "member": [f"cn=finance,ou=people,{BASE}", f"cn=bob,ou=people,{BASE}"]}),
]


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    assert slapd_mod.available(), "slapd is not installed: run scripts/install-test-deps.sh"
    with SlapdServer(tmp_path_factory.mktemp("ldap"), PEOPLE + GROUPS) as server:
        yield server


def groups(server: SlapdServer, **kw) -> DirectoryGroups:
    settings = LDAPSettings(uri=server.uri, base_dn=server.base_dn, ca_file=server.ca_file,
                            bind_dn=server.bind_dn, bind_password=server.bind_password, timeout=5.0)
    return DirectoryGroups(LDAPChecker(settings, run_blocking=None), **kw)


def test_direct_nested_and_not_members(slapd):
    g = groups(slapd)
    assert g.member_of("alice@example.test", "finance@example.test")
    assert g.member_of("a.example@example.test", "finance")           # a proxy address; the group by cn
    assert g.member_of("alice@example.test", "staff@example.test")    # through finance (nested)
    assert g.member_of("bob@example.test", f"cn=all-staff,ou=people,{BASE}")
    assert not g.member_of("bob@example.test", "finance@example.test")
    assert not g.member_of("nobody@example.test", "finance@example.test")


def test_rules_use_the_directory(slapd):
    g = groups(slapd)
    ruleset = rules("""
[[rule]]
name = "Finance copies"
[rule.conditions]
FromMemberOf = "finance@example.test"
[rule.actions]
BlindCopyTo = "compliance@example.test"

[[rule]]
name = "Staff only"
[rule.conditions]
SentToMemberOf = "staff@example.test"
[rule.actions]
RejectMessageReasonText = "Staff lists take no outside mail"
""")
    d = ruleset.evaluate(ctx(S.PLAIN, "alice@example.test", "bob@example.test", "carol@example.test",
                             member_of=g.member_of))
    assert d.add_recipients == ["compliance@example.test"]
    assert list(d.rejected_recipients) == ["bob@example.test"]


def test_an_unreachable_directory_raises_instead_of_answering_no(slapd):
    from support.procs import free_port
    settings = LDAPSettings(uri=f"ldap://127.0.0.1:{free_port()}", base_dn=BASE, ca_file=slapd.ca_file,
                            bind_dn=slapd.bind_dn, bind_password=slapd.bind_password, timeout=2.0)
    with pytest.raises(DirectoryUnavailable):
        DirectoryGroups(LDAPChecker(settings, run_blocking=None)).member_of("alice@example.test", "finance")


def test_directory_must_name_an_ldap_backend(tmp_path):
    (tmp_path / "rules.toml").write_text('[[rule]]\nname = "x"\n[rule.actions]\nLogEventText = "x"\n')
    raw = {"receive": {"in": {"listen": ["tcp:0"]}},
           "transport_rules": {"file": "rules.toml", "directory": "corp"}}
    with pytest.raises(ConfigError) as e:
        parse_config(raw, str(tmp_path / "exmta.toml"))
    assert e.value.problems == ['transport_rules.directory: no [auth.corp] section with kind = "ldap" '
                                "(the directory for FromMemberOf / SentToMemberOf)"]
