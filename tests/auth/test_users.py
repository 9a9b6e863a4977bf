"""The users file: parsing with clear errors, atomic locked updates, argon2/bcrypt checks, re-hash on login."""
from __future__ import annotations

import os
import stat

import argon2
import bcrypt
import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin

from exmta.auth.avatar import TemporaryAuthFailure
from exmta.auth.users import PasswordHasher, UserRecord, UsersChecker, UsersFile, UsersFileError
from support.sync import run_inline as sync


def result(d):
    out: list = []
    d.addBoth(out.append)
    [value] = out
    return value.value if hasattr(value, "value") else value


FAST = dict(time_cost=1, memory_cost=8, parallelism=1)


def test_write_read_round_trip_and_mode(tmp_path):
    f = UsersFile(str(tmp_path / "users.jsonl"))
    f.write({"alice": UserRecord("Alice", "$argon2id$x", ["alice@example.test", "*@sales.example.test"])})
    assert stat.S_IMODE(os.stat(f.path).st_mode) == 0o600
    with open(f.path) as fh:
        text = fh.read()
    assert text.startswith("# exmta users file")
    users = f.read()
    assert list(users) == ["alice"] and users["alice"].user == "Alice"
    assert users["alice"].grants().allows("x@SALES.example.test")


def test_missing_file_is_empty(tmp_path):
    assert UsersFile(str(tmp_path / "none.jsonl")).read() == {}


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2: not a JSON object"),
    ('{"hash": "$argon2id$x"}', "line 2: needs \"user\""),
    ('{"user": "bob"}', "line 2: user 'bob' needs \"hash\""),
    ('{"user": "bob", "hash": "h", "send_as": "bob@x.test"}', "\"send_as\" must be a list"),
    ('{"user": "bob", "hash": "h", "send_as": ["b*b@x.test"]}', "send_as: 'b*b@x.test' is not an address"),
    ('{"user": "bob", "hash": "h", "password": "x"}', "unknown key(s) password"),
    ('{"user": "ALICE", "hash": "h"}', "user 'ALICE' appears twice"),
])
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "users.jsonl"
    path.write_text('{"user": "alice", "hash": "h"}\n' + line + "\n")
    with pytest.raises(UsersFileError) as e:
        UsersFile(str(path)).read()
    assert str(path) in str(e.value) and message in str(e.value)


def test_comments_and_blank_lines_are_ignored(tmp_path):
    path = tmp_path / "users.jsonl"
    path.write_text("# comment\n\n   \n" + '{"user": "a", "hash": "h"}\n')
    assert list(UsersFile(str(path)).read()) == ["a"]


def test_checker_accepts_right_password_and_refuses_others(tmp_path):
    hasher = PasswordHasher(argon2.PasswordHasher(**FAST))
    path = str(tmp_path / "u.jsonl")
    UsersFile(path).write({"alice": UserRecord("alice", hasher.hash("pw"), [])})
    checker = UsersChecker(path, sync, hasher=hasher)
    assert result(checker.requestAvatarId(UsernamePassword(b"ALICE", b"pw"))) == "alice"
    assert isinstance(result(checker.requestAvatarId(UsernamePassword(b"alice", b"pW"))), UnauthorizedLogin)
    assert isinstance(result(checker.requestAvatarId(UsernamePassword(b"nobody", b"pw"))), UnauthorizedLogin)
    assert isinstance(result(checker.requestAvatarId(UsernamePassword(b"alice", b""))), UnauthorizedLogin)


def test_login_rehashes_old_parameters_and_keeps_the_file_valid(tmp_path):
    old = PasswordHasher(argon2.PasswordHasher(**FAST))
    current = PasswordHasher(argon2.PasswordHasher(time_cost=2, memory_cost=16, parallelism=1))
    path = str(tmp_path / "u.jsonl")
    UsersFile(path).write({"alice": UserRecord("alice", old.hash("pw"), ["alice@example.test"]),
                           "bob": UserRecord("bob", current.hash("b"), [])})
    checker = UsersChecker(path, sync, hasher=current)
    assert current.needs_rehash(UsersFile(path).read()["alice"].hash)
    assert result(checker.requestAvatarId(UsernamePassword(b"alice", b"pw"))) == "alice"
    users = UsersFile(path).read()
    assert not current.needs_rehash(users["alice"].hash) and "t=2" in users["alice"].hash
    assert users["alice"].send_as == ["alice@example.test"] and "bob" in users
    assert result(checker.requestAvatarId(UsernamePassword(b"alice", b"pw"))) == "alice"  # the new hash works


def test_bcrypt_hash_is_verified_and_migrated_to_argon2(tmp_path):
    current = PasswordHasher(argon2.PasswordHasher(**FAST))
    path = str(tmp_path / "u.jsonl")
    legacy = bcrypt.hashpw(b"old secret", bcrypt.gensalt(rounds=4)).decode()
    UsersFile(path).write({"carol": UserRecord("carol", legacy, [])})
    checker = UsersChecker(path, sync, hasher=current)
    assert isinstance(result(checker.requestAvatarId(UsernamePassword(b"carol", b"nope"))), UnauthorizedLogin)
    assert UsersFile(path).read()["carol"].hash == legacy
    assert result(checker.requestAvatarId(UsernamePassword(b"carol", b"old secret"))) == "carol"
    assert UsersFile(path).read()["carol"].hash.startswith("$argon2id$")


def test_unknown_hash_scheme_never_matches(tmp_path):
    path = str(tmp_path / "u.jsonl")
    UsersFile(path).write({"dave": UserRecord("dave", "plaintext", [])})
    checker = UsersChecker(path, sync, hasher=PasswordHasher(argon2.PasswordHasher(**FAST)))
    assert isinstance(result(checker.requestAvatarId(UsernamePassword(b"dave", b"plaintext"))), UnauthorizedLogin)


def test_a_broken_file_is_a_temporary_failure_not_a_failed_login(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text("{broken\n")
    checker = UsersChecker(str(path), sync, hasher=PasswordHasher(argon2.PasswordHasher(**FAST)))
    failure = result(checker.requestAvatarId(UsernamePassword(b"a", b"b")))
    assert isinstance(failure, TemporaryAuthFailure) and "line 1" in str(failure)


def test_update_keeps_concurrent_changes(tmp_path):
    f = UsersFile(str(tmp_path / "u.jsonl"))
    f.update(lambda users: users.__setitem__("a", UserRecord("a", "h1", [])))
    f.update(lambda users: users.__setitem__("b", UserRecord("b", "h2", [])))
    assert sorted(f.read()) == ["a", "b"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".users.")] == []  # no temporary files left


def test_rewrite_keeps_owner_group_and_mode_but_never_others(tmp_path):
    f = UsersFile(str(tmp_path / "u.jsonl"))
    f.write({"a": UserRecord("a", "h", [])})
    owner = (65534, 65534) if os.getuid() == 0 else (os.getuid(), os.getgid())  # nobody:nogroup as root
    os.chown(f.path, *owner)  # as if the server ran as that user
    os.chmod(f.path, 0o644)
    f.update(lambda users: users.__setitem__("b", UserRecord("b", "h2", [])))
    st = os.stat(f.path)
    assert (st.st_uid, st.st_gid) == owner
    assert stat.S_IMODE(st.st_mode) == 0o640
