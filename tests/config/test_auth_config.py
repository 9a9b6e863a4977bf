"""SMTP AUTH settings: receive connector keys and [auth.NAME] back ends, validated with the key named."""
from __future__ import annotations

import subprocess
import sys

import pytest

from exmta.auth.users import UserRecord, UsersFile
from exmta.config.load import ConfigError, load_config
from exmta.config.schema import ReceiveConnectorConfig

BASE = """
[receive.submission]
listen = ["tcp:2587:interface=127.0.0.1"]
{receive}

[send.out]
smarthosts = ["[127.0.0.1]:2601"]

[[route]]
domains = ["*"]
connector = "out"
{extra}
"""


def write(tmp_path, receive="", extra=""):
    path = tmp_path / "exmta.toml"
    path.write_text(BASE.format(receive=receive, extra=extra))
    return str(path)


def users_file(tmp_path, name="users.jsonl"):
    path = tmp_path / name
    UsersFile(str(path)).write({"a": UserRecord("a", "$argon2id$x", [])})
    return path


def problems(path):
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return e.value.problems


def test_defaults_are_secure():
    rc = ReceiveConnectorConfig(name="x")
    assert rc.auth == () and rc.auth_backend is None and rc.auth_before_tls_networks == ()
    assert rc.auth_tarpit == 5.0 and rc.auth_lockout_user_failures == 5 and rc.auth_lockout_source_failures == 10
    assert rc.accept_any_sender is False


def test_users_file_path_relative_to_the_config_file(tmp_path):
    users_file(tmp_path)
    config = load_config(write(tmp_path, receive='auth = ["plain", "LOGIN"]\nauth_backend = "users.jsonl"\n'
                               'auth_tarpit = "2s"\nauth_lockout_window = "5m"\nauth_lockout_duration = "1h"\n'
                               'auth_lockout_user_failures = 3\nauth_lockout_source_failures = 0\n'
                               'auth_before_tls_networks = ["10.1.2.0/24"]\naccept_any_sender = true'))
    rc = config.receive[0]
    assert rc.auth == ("PLAIN", "LOGIN")
    assert rc.auth_backend == str(tmp_path / "users.jsonl")
    assert (rc.auth_tarpit, rc.auth_lockout_window, rc.auth_lockout_duration) == (2.0, 300.0, 3600.0)
    assert (rc.auth_lockout_user_failures, rc.auth_lockout_source_failures) == (3, 0)
    assert rc.auth_before_tls_networks == ("10.1.2.0/24",) and rc.accept_any_sender


def test_auth_sections(tmp_path):
    users_file(tmp_path, "corp-users.jsonl")
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    config = load_config(write(tmp_path, receive='auth = ["PLAIN"]\nauth_backend = "corp"', extra=f"""
[auth.local]
kind = "users"
path = "corp-users.jsonl"
[auth.corp]
kind = "ldap"
uri = "ldaps://dc1.corp.example:636"
tls = "ldaps"
ca_file = "{ca}"
base_dn = "dc=corp,dc=example"
bind_dn = "cn=svc,dc=corp,dc=example"
bind_password = "pw"
user_filter = "(objectClass=user)"
login_attributes = ["sAMAccountName", "userPrincipalName"]
timeout = "3s"
"""))
    corp = config.auth_backend("corp")
    assert corp.kind == "ldap" and corp.uri == "ldaps://dc1.corp.example:636" and corp.timeout == 3.0
    assert corp.login_attributes == ("sAMAccountName", "userPrincipalName")
    assert config.auth_backend("local").path == str(tmp_path / "corp-users.jsonl")
    assert config.receive[0].auth_backend == "corp"


def test_every_auth_problem_is_reported_with_its_key(tmp_path):
    bad_users = tmp_path / "bad.jsonl"
    bad_users.write_text("{oops\n")
    found = problems(write(tmp_path, receive="""auth = ["PLAIN", "CRAM-MD5", "PLAIN"]
auth_backend = "nowhere"
auth_before_tls_networks = ["0.0.0.0/0", "not-a-net"]
auth_tarpit = "2m"
auth_lockout_user_failures = -1
auth_lockout_window = 0
""", extra=f"""
[receive.other]
listen = ["tcp:2588:interface=127.0.0.1"]
auth_backend = "{bad_users}"
[auth.dir]
kind = "ldap"
uri = "ldap://dc.corp.example"
tls = "none"
bind_dn = "cn=svc"
user_filter = "objectClass=user"
[auth.nokind]
path = "x"
[auth.u]
kind = "users"
uri = "ldap://x"
"""))
    text = "\n".join(found)
    for expected in (
        "receive.submission.auth: item 2 ('CRAM-MD5'): 'CRAM-MD5' is not a supported mechanism",
        "receive.submission.auth_before_tls_networks: item 2 ('not-a-net')",
        "receive.submission.auth_tarpit: more than 60s",
        "receive.submission.auth_lockout_user_failures: must be at least 0",
        "receive.submission.auth_lockout_window: must be positive",
        "receive.submission.auth_backend: no [auth.nowhere] section and no users file",
        "receive.other.auth: is empty although auth_backend is set",
        "receive.other.auth_backend: " + str(bad_users) + ", line 1: not a JSON object",
        "auth.dir.tls: \"none\" would send passwords to the directory in clear text",
        "auth.dir.base_dn: is required",
        "auth.dir.bind_dn: bind_dn and bind_password go together",
        "auth.dir.user_filter: must be an LDAP filter in parentheses",
        "auth.nokind.kind: is required",
        "auth.u.path: is required for kind = \"users\"",
        "auth.u.uri: is an LDAP setting",
    ):
        assert expected in text, (expected, found)


def test_plaintext_auth_for_everyone_is_refused(tmp_path):
    users_file(tmp_path)
    found = problems(write(tmp_path, receive='auth = ["PLAIN"]\nauth_backend = "users.jsonl"\n'
                                             'auth_before_tls_networks = ["::/0"]'))
    assert found == ["receive.submission.auth_before_tls_networks: ::/0 would send every password in clear text; "
                     "list only pinned networks"]


def test_mechanisms_need_a_backend(tmp_path):
    assert problems(write(tmp_path, receive='auth = ["PLAIN"]')) == [
        "receive.submission.auth_backend: is required when auth is set: an [auth.NAME] section or a users file path"]


def test_ldap_tls_must_match_the_scheme_and_none_is_for_loopback_only(tmp_path):
    found = problems(write(tmp_path, extra="""
[auth.a]
kind = "ldap"
uri = "ldaps://dc.example"
base_dn = "dc=example"
[auth.b]
kind = "ldap"
uri = "ldap://127.0.0.1:3389"
tls = "none"
base_dn = "dc=example"
[auth.c]
kind = "ldap"
uri = "http://dc.example"
base_dn = "dc=example"
"""))
    assert found == [
        "auth.a.tls: must be \"ldaps\" exactly when the uri is ldaps:// (StartTLS needs ldap://)",
        "auth.c.uri: 'http://dc.example' is not an ldap:// or ldaps:// URL with a host",
    ]


def test_check_config_command_reports_auth_problems(tmp_path):
    path = write(tmp_path, receive='auth = ["PLAIN"]\nauth_backend = "missing.jsonl"')
    proc = subprocess.run([sys.executable, "-m", "exmta.cli", "check-config", path], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "receive.submission.auth_backend: no [auth.missing.jsonl] section and no users file" in proc.stderr
    assert "exmta users add" in proc.stderr


def test_the_annotated_example_auth_settings_load(tmp_path):
    """etc/exmta.toml's commented AUTH keys and [auth.corp] section, uncommented, are a valid configuration."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "etc" / "exmta.toml").read_text()
    start, end = text.index("# SMTP AUTH (Exchange AuthMechanism"), text.index("values. true: no check")
    block = text[start:end]
    text = text.replace(block, re.sub(r"^# (auth\w*|accept_any_sender) =", r"\1 =", block, flags=re.M))
    start, end = text.index("# [auth.corp]"), text.index("# A send connector")
    block = text[start:end]
    uncommented = re.sub(r"^# ([\[a-z_]+.*)$", r"\1", block, flags=re.M)
    text = text.replace(block, uncommented.replace('ca_file = "/etc/exmta/tls/corp-ca.pem"', "# ca_file"))
    path = tmp_path / "example.toml"
    path.write_text(text)
    config = load_config(str(path))
    rc = config.receive[0]
    assert rc.auth == ("PLAIN", "LOGIN") and rc.auth_backend == "corp" and rc.auth_before_tls_networks
    corp = config.auth_backend("corp")
    assert corp.kind == "ldap" and corp.tls == "starttls" and corp.user_filter.startswith("(&(objectCategory")
