"""``exmta users``: manage a users file without editing hashes by hand.

::

    exmta users add FILE USER [--send-as ADDR ...] [--password-stdin]
    exmta users passwd FILE USER [--password-stdin]
    exmta users remove FILE USER
    exmta users grant FILE USER ADDR...      (ADDR: user@domain, *@domain or *)
    exmta users revoke FILE USER ADDR...
    exmta users rehash FILE [USER] [--password-stdin]
    exmta users list FILE

Passwords are read twice from the terminal, or once from standard input
with ``--password-stdin`` (for scripts). A user name that is an address is
granted send-as for itself unless ``--send-as`` says otherwise.
"""
from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from exmta.auth.sendas import check_grant_pattern
from exmta.auth.users import PasswordHasher, UserRecord, UsersFile, UsersFileError

__all__ = ["add_users_parser"]


class _Refused(Exception):
    pass


def _password(args: argparse.Namespace, prompt: str = "Password") -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"{prompt} for {args.user}: ")
        if getpass.getpass("Again: ") != password:
            raise _Refused("the passwords differ")
    if not password:
        raise _Refused("an empty password is not allowed")
    return password


def _grants(values: list[str]) -> list[str]:
    out = []
    for v in values:
        try:
            out.append(check_grant_pattern(v))
        except ValueError as e:
            raise _Refused(str(e)) from None
    return out


def _get(users: dict[str, UserRecord], user: str) -> UserRecord:
    record = users.get(user.casefold())
    if record is None:
        raise _Refused(f"no user {user!r}")
    return record


def _add(args: argparse.Namespace) -> str:
    if not args.user.strip() or any(c.isspace() or not c.isprintable() for c in args.user):
        raise _Refused(f"{args.user!r}: a user name must be printable and have no spaces")
    send_as = _grants(args.send_as) if args.send_as is not None else (
        [check_grant_pattern(args.user)] if "@" in args.user else [])
    password = _password(args)
    new_hash = PasswordHasher().hash(password)

    def change(users: dict[str, UserRecord]) -> None:
        if args.user.casefold() in users:
            raise _Refused(f"user {args.user!r} exists already (use passwd to change the password)")
        users[args.user.casefold()] = UserRecord(args.user, new_hash, send_as)

    UsersFile(args.file).update(change)
    return f"added {args.user} (send as: {', '.join(send_as) or 'nothing'})"


def _passwd(args: argparse.Namespace) -> str:
    f = UsersFile(args.file)
    _get(f.read(), args.user)
    new_hash = PasswordHasher().hash(_password(args, "New password"))
    f.update(lambda users: setattr(_get(users, args.user), "hash", new_hash))
    return f"password of {args.user} changed"


def _remove(args: argparse.Namespace) -> str:
    f = UsersFile(args.file)
    f.update(lambda users: users.pop(_get(users, args.user).user.casefold()))
    return f"removed {args.user}"


def _grant(args: argparse.Namespace) -> str:
    grants = _grants(args.addresses)

    def change(users: dict[str, UserRecord]) -> None:
        record = _get(users, args.user)
        record.send_as += [g for g in grants if g not in record.send_as]

    UsersFile(args.file).update(change)
    return f"{args.user} may send as {', '.join(grants)}"


def _revoke(args: argparse.Namespace) -> str:
    grants = _grants(args.addresses)

    def change(users: dict[str, UserRecord]) -> None:
        record = _get(users, args.user)
        missing = [g for g in grants if g not in record.send_as]
        if missing:
            raise _Refused(f"{args.user} has no grant {', '.join(missing)}")
        record.send_as = [g for g in record.send_as if g not in grants]

    UsersFile(args.file).update(change)
    return f"{args.user} may no longer send as {', '.join(grants)}"


def _rehash(args: argparse.Namespace) -> str:
    hasher = PasswordHasher()
    f = UsersFile(args.file)
    if args.user is None:
        users = f.read()
        old = sorted(r.user for r in users.values() if hasher.needs_rehash(r.hash))
        if not old:
            return f"all {len(users)} hash(es) use the current parameters"
        return (f"{len(old)} of {len(users)} hash(es) use old parameters or another scheme: {', '.join(old)}\n"
                "each is re-hashed at that user's next successful login, or now with "
                f"`exmta users rehash {args.file} USER`")
    record = _get(f.read(), args.user)
    password = _password(args, "Current password")
    if not hasher.verify(record.hash, password):
        raise _Refused(f"wrong password for {args.user}")
    new_hash = hasher.hash(password)
    f.update(lambda users: setattr(_get(users, args.user), "hash", new_hash))
    return f"{args.user} re-hashed with the current parameters"


def _list(args: argparse.Namespace) -> str:
    hasher = PasswordHasher()
    users = UsersFile(args.file).read()
    lines = []
    for r in sorted(users.values(), key=lambda r: r.user.casefold()):
        scheme = r.hash.split("$")[1] if r.hash.count("$") >= 2 else "unknown"
        state = " (old parameters: re-hashed at next login)" if hasher.needs_rehash(r.hash) else ""
        lines.append(f"{r.user}\t{scheme}{state}\tsend as: {', '.join(r.send_as) or '-'}")
    return "\n".join(lines) if lines else "no users"


def _run(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            print(func(args))
        except _Refused as e:
            print(f"exmta users: {e}", file=sys.stderr)
            return 1
        except (UsersFileError, OSError) as e:
            print(f"exmta users: {e}", file=sys.stderr)
            return 1
        return 0

    return run


def add_users_parser(sub: Any) -> None:
    """Register ``exmta users ...`` on the main command's subparsers."""
    users = sub.add_parser("users", help="manage an SMTP AUTH users file (argon2id hashes, send-as grants)")
    cmds = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)

    def command(name: str, func: Any, help: str, user: str | None = "required", stdin: bool = False) -> Any:
        p = cmds.add_parser(name, help=help)
        p.add_argument("file", help="the users file (created by add)")
        if user == "required":
            p.add_argument("user", help="the login name")
        elif user == "optional":
            p.add_argument("user", nargs="?", help="the login name")
        if stdin:
            p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
        p.set_defaults(func=_run(func))
        return p

    add = command("add", _add, "add a user (asks for the password)", stdin=True)
    add.add_argument("--send-as", action="append", metavar="ADDR",
                     help="an address, *@domain or * the user may send as (repeatable; default: the user name "
                     "when it is an address)")
    command("passwd", _passwd, "set a new password", stdin=True)
    command("remove", _remove, "remove a user")
    command("grant", _grant, "let a user send as more addresses").add_argument("addresses", nargs="+")
    command("revoke", _revoke, "take send-as grants away").add_argument("addresses", nargs="+")
    command("rehash", _rehash, "list hashes with old parameters, or re-hash one user's now",
            user="optional", stdin=True)
    command("list", _list, "list users and their grants (never hashes)", user=None)
