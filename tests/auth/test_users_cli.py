"""``exmta users``: the operator manages users and grants; hashes are never typed or shown."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest

from exmta.auth.users import PasswordHasher, UsersFile
from exmta.cli import main


def run(capsys, monkeypatch, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_add_list_grant_revoke_remove(tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "users.jsonl")
    assert run(capsys, monkeypatch, "users", "add", path, "alice@example.test", "--password-stdin",
               stdin="pw one\n") == (0, "added alice@example.test (send as: alice@example.test)\n", "")
    code, out, _ = run(capsys, monkeypatch, "users", "add", path, "scanner", "--send-as", "*@scan.example.test",
                       "--send-as", "ops@example.test", "--password-stdin", stdin="pw two\n")
    assert code == 0
    users = UsersFile(path).read()
    assert PasswordHasher().verify(users["alice@example.test"].hash, "pw one")
    assert users["scanner"].send_as == ["*@scan.example.test", "ops@example.test"]
    code, out, _ = run(capsys, monkeypatch, "users", "list", path)
    assert out == ("alice@example.test\targon2id\tsend as: alice@example.test\n"
                   "scanner\targon2id\tsend as: *@scan.example.test, ops@example.test\n")
    assert "$argon2" not in out
    assert run(capsys, monkeypatch, "users", "grant", path, "SCANNER", "*")[0] == 0
    assert UsersFile(path).read()["scanner"].send_as[-1] == "*"
    assert run(capsys, monkeypatch, "users", "revoke", path, "scanner", "*", "ops@example.test")[0] == 0
    assert UsersFile(path).read()["scanner"].send_as == ["*@scan.example.test"]
    assert run(capsys, monkeypatch, "users", "remove", path, "scanner") == (0, "removed scanner\n", "")
    assert list(UsersFile(path).read()) == ["alice@example.test"]


def test_refusals(tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "users.jsonl")
    run(capsys, monkeypatch, "users", "add", path, "alice", "--password-stdin", stdin="pw\n")
    cases = [
        (("users", "add", path, "ALICE", "--password-stdin"), "pw\n", "user 'ALICE' exists already"),
        (("users", "add", path, "bob", "--password-stdin"), "\n", "an empty password is not allowed"),
        (("users", "add", path, "b ob", "--password-stdin"), "x\n", "must be printable and have no spaces"),
        (("users", "add", path, "bob", "--send-as", "bob@*", "--password-stdin"), "x\n", "is not an address"),
        (("users", "remove", path, "nobody"), "", "no user 'nobody'"),
        (("users", "revoke", path, "alice", "x@y.test"), "", "alice has no grant x@y.test"),
        (("users", "rehash", path, "alice", "--password-stdin"), "wrong\n", "wrong password for alice"),
    ]
    for argv, stdin, message in cases:
        code, out, err = run(capsys, monkeypatch, *argv, stdin=stdin)
        assert code == 1 and message in err, (argv, err)


def test_passwords_from_the_terminal_must_match(tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "users.jsonl")
    answers = iter(["first", "second"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    code, _, err = run(capsys, monkeypatch, "users", "add", path, "alice")
    assert code == 1 and "the passwords differ" in err
    answers = iter(["same", "same"])
    assert run(capsys, monkeypatch, "users", "add", path, "alice")[0] == 0
    answers = iter(["new", "new"])
    assert run(capsys, monkeypatch, "users", "passwd", path, "alice") == (0, "password of alice changed\n", "")
    assert PasswordHasher().verify(UsersFile(path).read()["alice"].hash, "new")


def test_rehash_reports_and_rehashes(tmp_path, capsys, monkeypatch):
    import argon2

    from exmta.auth.users import UserRecord

    path = str(tmp_path / "users.jsonl")
    weak = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    UsersFile(path).write({"old": UserRecord("old", weak.hash("pw"), []),
                           "new": UserRecord("new", PasswordHasher().hash("x"), [])})
    code, out, _ = run(capsys, monkeypatch, "users", "rehash", path)
    assert code == 0 and out.startswith("1 of 2 hash(es) use old parameters or another scheme: old\n")
    assert "(old parameters: re-hashed at next login)" in run(capsys, monkeypatch, "users", "list", path)[1]
    assert run(capsys, monkeypatch, "users", "rehash", path, "old", "--password-stdin", stdin="pw\n")[0] == 0
    assert run(capsys, monkeypatch, "users", "rehash", path)[1] == "all 2 hash(es) use the current parameters\n"


def test_the_installed_command(tmp_path):
    path = str(tmp_path / "users.jsonl")
    proc = subprocess.run([sys.executable, "-m", "exmta.cli", "users", "add", path, "carol@example.test",
                           "--password-stdin"], input="pw\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "exmta.cli", "users", "--help"], capture_output=True, text=True,
                          timeout=60)
    for action in ("add", "remove", "passwd", "rehash", "list", "grant", "revoke"):
        assert action in proc.stdout


@pytest.mark.parametrize("argv", [["users"], ["users", "add"]])
def test_usage_errors(argv, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
