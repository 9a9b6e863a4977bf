"""The users file: user names, argon2id password hashes and send-as grants, one JSON object a line.

::

    {"user": "alice@example.test", "hash": "$argon2id$v=19$m=65536,t=3,p=4$...", "send_as": ["alice@example.test"]}

Lines starting with ``#`` and blank lines are ignored. Operators manage the
file with ``exmta users add|remove|passwd|rehash|grant|revoke|list`` and never
edit hashes by hand (send_as lists may be edited). User names compare
case-insensitively. Hashes are argon2id with argon2-cffi's current
parameters; bcrypt hashes (``$2b$``, e.g. imported from htpasswd) are
verified when the ``bcrypt`` package is installed. A hash made with older
parameters or another scheme is replaced on the next successful login.

Writers take an exclusive ``flock`` on ``FILE.lock`` and replace the file
atomically (temporary file, fsync, rename), so the server's re-hash and an
operator's command never lose each other's changes. The server re-reads the
file when its size, mtime or inode change.
"""
from __future__ import annotations

import fcntl
import json
import os
import stat
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from exmta.auth.avatar import BadPassword, ISubmitter, Submitter, TemporaryAuthFailure
from exmta.auth.sendas import SendAsGrants, check_grant_pattern

__all__ = ["PasswordHasher", "UserRecord", "UsersChecker", "UsersFile", "UsersFileError", "UsersRealm"]

log = Logger()


class UsersFileError(Exception):
    """The users file cannot be read or has a bad line (the message names the file and the line)."""


@dataclass
class UserRecord:
    user: str
    hash: str = field(repr=False)
    send_as: list[str] = field(default_factory=list)

    def to_line(self) -> str:
        return json.dumps({"user": self.user, "hash": self.hash, "send_as": self.send_as}, ensure_ascii=False)

    def grants(self) -> SendAsGrants:
        return SendAsGrants.from_patterns(self.send_as)


class PasswordHasher:
    """argon2id hashing with the library's current parameters; verifies argon2 and bcrypt hashes."""

    def __init__(self, hasher: Any = None) -> None:
        import argon2

        self._argon2 = argon2
        self.hasher = hasher if hasher is not None else argon2.PasswordHasher()

    def hash(self, password: str) -> str:
        return self.hasher.hash(password)

    def verify(self, hashed: str, password: str) -> bool:
        if hashed.startswith("$argon2"):
            try:
                return self.hasher.verify(hashed, password)
            except self._argon2.exceptions.VerificationError:
                return False
            except self._argon2.exceptions.InvalidHashError:
                return False
        if hashed.startswith(("$2a$", "$2b$", "$2y$")):
            try:
                import bcrypt
            except ImportError:
                log.error("a bcrypt hash needs the bcrypt package (pip install bcrypt)")
                return False
            try:
                return bcrypt.checkpw(password.encode("utf-8"), hashed.encode("ascii"))
            except ValueError:
                return False
        return False

    def needs_rehash(self, hashed: str) -> bool:
        if not hashed.startswith("$argon2"):
            return True
        try:
            return self.hasher.check_needs_rehash(hashed)
        except Exception:
            return True

    def known_scheme(self, hashed: str) -> bool:
        return hashed.startswith(("$argon2", "$2a$", "$2b$", "$2y$"))


class UsersFile:
    """Reads and atomically rewrites one users file."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def read(self) -> dict[str, UserRecord]:
        """Every user, keyed by the case-folded name. A missing file is an empty one."""
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            raise UsersFileError(f"{self.path}: cannot be read: {e}") from None
        return self.parse(text)

    def parse(self, text: str) -> dict[str, UserRecord]:
        users: dict[str, UserRecord] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{self.path}, line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsersFileError(f"{where}: not a JSON object: {e.msg}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("user"), str) or not obj["user"]:
                raise UsersFileError(f"{where}: needs \"user\" (a non-empty string)")
            if not isinstance(obj.get("hash"), str) or not obj["hash"]:
                raise UsersFileError(f"{where}: user {obj['user']!r} needs \"hash\" (set it with exmta users passwd)")
            send_as = obj.get("send_as", [])
            if not isinstance(send_as, list) or not all(isinstance(s, str) for s in send_as):
                raise UsersFileError(f"{where}: \"send_as\" must be a list of strings")
            for s in send_as:
                try:
                    check_grant_pattern(s)
                except ValueError as e:
                    raise UsersFileError(f"{where}: send_as: {e}") from None
            unknown = set(obj) - {"user", "hash", "send_as"}
            if unknown:
                raise UsersFileError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
            key = obj["user"].casefold()
            if key in users:
                raise UsersFileError(f"{where}: user {obj['user']!r} appears twice")
            users[key] = UserRecord(obj["user"], obj["hash"], list(send_as))
        return users

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive writer lock (``FILE.lock``), held while reading, changing and replacing the file."""
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def write(self, users: dict[str, UserRecord]) -> None:
        """Replace the file atomically (call inside :meth:`locked`).

        A new file is mode 0600 (hashes are secrets too); a replaced one keeps its owner, group and
        mode, minus any bit for others.
        """
        directory = os.path.dirname(self.path)
        header = "# exmta users file: manage with `exmta users ...`; never edit hashes by hand\n"
        body = "".join(r.to_line() + "\n" for r in sorted(users.values(), key=lambda r: r.user.casefold()))
        try:
            old = os.stat(self.path)
        except FileNotFoundError:
            old = None
        fd, tmp = tempfile.mkstemp(prefix=".users.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(header + body)
                f.flush()
                os.fsync(f.fileno())
            if old is not None:
                # keep the owner, group and mode the operator gave the file (the server may run as
                # another user than the one running `exmta users`); never readable by others
                if (old.st_uid, old.st_gid) != (os.getuid(), os.getgid()):
                    try:
                        os.chown(tmp, old.st_uid, old.st_gid)
                    except PermissionError:
                        pass
                os.chmod(tmp, stat.S_IMODE(old.st_mode) & 0o660)
            else:
                os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def update(self, change: Callable[[dict[str, UserRecord]], None]) -> None:
        """Read, change and rewrite under the lock."""
        with self.locked():
            users = self.read()
            change(users)
            self.write(users)


@implementer(ICredentialsChecker)
class UsersChecker:
    """twisted.cred checker over a users file. Blocking work runs through ``run_blocking``.

    ``run_blocking(f, *args)`` returns a Deferred for ``f(*args)`` run on a
    bounded thread pool (argon2 takes tens of milliseconds of CPU by design).
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path: str, run_blocking: Callable[..., Deferred], hasher: PasswordHasher | None = None) -> None:
        self.file = UsersFile(path)
        self.run_blocking = run_blocking
        self.hasher = hasher or PasswordHasher()
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, UserRecord] = {}
        self._dummy: str | None = None

    def _current(self) -> dict[str, UserRecord]:
        """The users, re-read when the file changed (called on the pool)."""
        try:
            st = os.stat(self.file.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        except OSError as e:
            raise TemporaryAuthFailure(f"users file {self.file.path}: {e.strerror}") from None
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._users = self.file.read()
                except UsersFileError as e:
                    raise TemporaryAuthFailure(str(e)) from None
                self._stamp = stamp
            return self._users

    def _check(self, username: str, password: str) -> str:
        users = self._current()
        record = users.get(username.casefold())
        if record is None:
            # same work as for a real user, so timing does not tell which names exist
            if self._dummy is None:
                self._dummy = self.hasher.hash("exmta-dummy-password")
            self.hasher.verify(self._dummy, password)
            raise UnauthorizedLogin("unknown user")
        if not password or not self.hasher.verify(record.hash, password):
            raise BadPassword("wrong password", record.user)
        if self.hasher.needs_rehash(record.hash):
            self._rehash(record.user, record.hash, password)
        return record.user

    def _rehash(self, user: str, old_hash: str, password: str) -> None:
        new_hash = self.hasher.hash(password)

        def change(users: dict[str, UserRecord]) -> None:
            record = users.get(user.casefold())
            if record is not None and record.hash == old_hash:  # unchanged since we verified it
                record.hash = new_hash

        try:
            self.file.update(change)
            log.info("users file {path}: password hash of {user} re-hashed with current parameters",
                     path=self.file.path, user=user)
        except (OSError, UsersFileError) as e:
            log.warn("users file {path}: re-hash of {user} failed: {error}", path=self.file.path, user=user,
                     error=str(e))

    def requestAvatarId(self, credentials: Any) -> Deferred:
        username = credentials.username
        password = credentials.password
        if isinstance(username, bytes):
            username = username.decode("utf-8")
        if isinstance(password, bytes):
            password = password.decode("utf-8")
        return self.run_blocking(self._check, username, password)

    def submitter(self, identity: str) -> Submitter:
        with self._lock:
            record = self._users.get(identity.casefold())
        if record is None:
            raise UnauthorizedLogin("user removed")
        return Submitter(record.user, record.grants())


@implementer(IRealm)
class UsersRealm:
    """Builds the :class:`Submitter` avatar for a users-file login (its send_as grants)."""

    def __init__(self, checker: UsersChecker) -> None:
        self.checker = checker

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Callable[[], None]]:
        if ISubmitter not in interfaces:
            raise NotImplementedError("only ISubmitter avatars")  # twisted.cred IRealm: unsupported interface
        return ISubmitter, self.checker.submitter(avatarId), lambda: None
