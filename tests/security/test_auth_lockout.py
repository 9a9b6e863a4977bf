"""AUTH lockout against ``twistd -n exmta``: name variants (issue 11 item 11), connectors and receive
workers (issue 10 item 11), and ``exmta lockouts`` to list and clear.

Before the fixes: after ``alice`` was locked, ``" alice"`` with the right password got 235; another
connector, or another receive worker, had its own count and let ``alice`` in.
"""
from __future__ import annotations

import base64
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from exmta.auth.users import PasswordHasher, UserRecord, UsersFile
from support import procs
from support import slapd as slapd_mod
from support.exmta_proc import ExmtaProcess, exmta_toml
from support.slapd import SlapdServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    assert slapd_mod.available(), "slapd is not installed: run scripts/install-test-deps.sh"
    with SlapdServer(tmp_path_factory.mktemp("ldap")) as server:
        yield server


LOCKOUT = ('auth = ["PLAIN"]\nauth_backend = "{backend}"\nauth_before_tls_networks = ["127.0.0.0/8"]\n'
           'auth_tarpit = "0.05s"\nauth_lockout_user_failures = 3\nauth_lockout_source_failures = 0\n')


def _auth(port: int, user: str, password: str) -> int:
    """One session: EHLO, AUTH PLAIN; the AUTH reply code."""
    with socket.create_connection((procs.LOOPBACK, port), timeout=30) as s:
        assert procs.read_smtp_reply(s, 30)[0] == 220
        s.sendall(b"EHLO c.example\r\n")
        assert procs.read_smtp_reply(s, 30)[0] == 250
        s.sendall(b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()) + b"\r\n")
        return procs.read_smtp_reply(s, 30)[0]


def _ldap_server(slapd: SlapdServer, exmta_factory) -> tuple[ExmtaProcess, int]:
    second = procs.free_port()
    extra = (f'[auth.corp]\nkind = "ldap"\nuri = "{slapd.uri}"\nca_file = "{slapd.ca_file}"\n'
             f'base_dn = "{slapd.base_dn}"\nbind_dn = "{slapd.bind_dn}"\nbind_password = "{slapd.bind_password}"\n\n'
             '[receive.second]\nlisten = ["tcp:{second}:interface=127.0.0.1"]\n'
             + LOCKOUT.replace("{backend}", "corp"))
    ex = exmta_factory(toml=exmta_toml(relay_networks=(), receive_extra=LOCKOUT.replace("{backend}", "corp"),
                                       extra=extra), subst={"second": second})
    return ex, second


def test_name_variants_and_other_connectors_share_one_lock(slapd: SlapdServer, exmta_factory) -> None:
    ex, second = _ldap_server(slapd, exmta_factory)
    assert [_auth(ex.port, "alice", "wrong") for _ in range(3)] == [535, 535, 535]
    # the right password, by every variant of the name, on either connector: never 235
    assert _auth(ex.port, "alice", "alice-secret") == 454
    assert _auth(ex.port, " alice", "alice-secret") == 535   # refused name: no second count of its own
    assert _auth(ex.port, "alice ", "alice-secret") == 535
    assert _auth(ex.port, "ALICE", "alice-secret") == 454
    assert _auth(ex.port, "alice@example.test", "alice-secret") == 454       # mail: the same entry
    assert _auth(second, "alice@corp.example.test", "alice-secret") == 454   # another connector
    assert _auth(second, "alice@example.test", "wrong") == 454   # no oracle: wrong or right, the same
    # password guesses spread over variants count for the one user (" bob" is refused unchecked)
    assert _auth(second, "bob", "wrong") == 535
    assert _auth(ex.port, "bob@example.test", "wrong") == 535
    assert _auth(ex.port, " bob", "wrong") == 535
    assert _auth(second, "Bob", "wrong") == 535
    assert _auth(second, "bob", "bob-secret") == 454
    assert _auth(ex.port, "bob@example.test", "bob-secret") == 454
    log = ex.log_text()
    assert "user name with surrounding white space" in log and "bob-secret" not in log


def _exmta_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exmta", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("workers", [2])
def test_receive_workers_share_the_lock_and_the_operator_clears_it(tmp_path: Path, exmta_factory,
                                                                   workers: int) -> None:
    users = tmp_path / "users.jsonl"
    UsersFile(str(users)).write({"carol": UserRecord("carol", PasswordHasher().hash("carol-pass"),
                                                      ["carol@example.test"])})
    ex = exmta_factory(toml=exmta_toml(relay_networks=(), receive_workers=workers,
                                       receive_extra=LOCKOUT.replace("{backend}", str(users))))
    assert len(procs.descendants(ex.pid)) == workers
    # six sessions: whichever process takes each one, three failures lock carol in all of them
    assert [_auth(ex.port, "carol", "wrong") for _ in range(3)] == [535, 535, 535]
    assert [_auth(ex.port, "carol", "carol-pass") for _ in range(6)] == [454] * 6
    listed = _exmta_cli("lockouts", "list", "--data", str(ex.data_dir))
    assert listed.returncode == 0, listed.stderr
    assert "user\t'carol'" in listed.stdout and "identity\t'carol'" in listed.stdout
    cleared = _exmta_cli("lockouts", "clear", "--data", str(ex.data_dir), "--all")
    assert cleared.returncode == 0 and "2 lockout(s) cleared" in cleared.stdout, cleared
    assert _auth(ex.port, "carol", "carol-pass") == 235
    assert "0 lockout(s)" in _exmta_cli("lockouts", "list", "--data", str(ex.data_dir)).stdout
