"""AUTH failure counts and lockouts shared by every connector and receive worker of one node.

:class:`~exmta.auth.lockout.LoginThrottle` counted per connector and per
process, so an attacker got a fresh quota of guesses on each connector and
in each receive worker (issue 10 item 11). Here the counts live in one
SQLite file in the data directory (``auth-lockout.sqlite``, WAL mode), which
every process of the node opens; each receive connector keeps its own
thresholds (:meth:`LockoutStore.view`), but a lock set through one is seen
by all. Keys are ``source`` (an IPv4 address or an IPv6 /64), ``user`` (the
login name, case-folded and stripped) and ``identity`` (what the back end
resolved the name to, so name variants share one lock; issue 11 item 11).

Every method blocks on the file (milliseconds); the authenticator runs them
on its bounded thread pool. ``exmta auth lockouts`` lists and clears locks.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

from exmta.auth.lockout import LockoutSettings, source_key

__all__ = ["FILE_NAME", "KINDS", "LockoutStore", "SharedThrottle", "user_key"]

FILE_NAME = "auth-lockout.sqlite"
KINDS = ("source", "user", "identity")
#: most failure rows kept; the oldest are dropped past it (a flood of distinct names stays bounded)
MAX_ROWS = 200_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS failures (kind TEXT NOT NULL, key TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS failures_key ON failures (kind, key, at);
CREATE INDEX IF NOT EXISTS failures_at ON failures (at);
CREATE TABLE IF NOT EXISTS locks (kind TEXT NOT NULL, key TEXT NOT NULL, until REAL NOT NULL,
                                  PRIMARY KEY (kind, key));
"""


def user_key(name: str) -> str:
    """The lockout key of a login name: stripped, case-folded (" Alice" and "alice" are one user)."""
    return name.strip().casefold()


class LockoutStore:
    """The node's failure counts and locks in one SQLite file; thread-safe, blocking."""

    def __init__(self, path: str, clock: Any) -> None:
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # names of users: not world-readable
            os.close(fd)
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def fail(self, kind: str, key: str, threshold: int, window: float, duration: float) -> bool:
        """Count one failure for (kind, key); True when it now reaches ``threshold`` and locks."""
        if threshold <= 0 or not key:
            return False
        now = self.clock.seconds()
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM failures WHERE kind = ? AND key = ? AND at <= ?", (kind, key, now - window))
                db.execute("INSERT INTO failures VALUES (?, ?, ?)", (kind, key, now))
                (count,) = db.execute("SELECT count(*) FROM failures WHERE kind = ? AND key = ?",
                                      (kind, key)).fetchone()
                locked = count >= threshold
                if locked:
                    db.execute("INSERT OR REPLACE INTO locks VALUES (?, ?, ?)", (kind, key, now + duration))
                    db.execute("DELETE FROM failures WHERE kind = ? AND key = ?", (kind, key))
                self._trim(db, now)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return locked

    @staticmethod
    def _trim(db: sqlite3.Connection, now: float) -> None:
        db.execute("DELETE FROM locks WHERE until <= ?", (now,))
        (rows,) = db.execute("SELECT count(*) FROM failures").fetchone()
        if rows > MAX_ROWS:
            db.execute("DELETE FROM failures WHERE rowid IN (SELECT rowid FROM failures ORDER BY at LIMIT ?)",
                       (rows - MAX_ROWS,))

    def remaining(self, kind: str, key: str) -> float:
        """Seconds (kind, key) stays locked; 0 when it is not."""
        if not key:
            return 0.0
        with self._lock:
            row = self._conn().execute("SELECT until FROM locks WHERE kind = ? AND key = ?", (kind, key)).fetchone()
        left = (row[0] - self.clock.seconds()) if row else 0.0
        return left if left > 0 else 0.0

    def forget(self, kind: str, key: str) -> None:
        """Drop the failures of (kind, key) (a successful login clears its user's count)."""
        with self._lock:
            self._conn().execute("DELETE FROM failures WHERE kind = ? AND key = ?", (kind, key))

    def locks(self) -> list[tuple[str, str, float]]:
        """Current locks: (kind, key, seconds left), longest first."""
        now = self.clock.seconds()
        with self._lock:
            rows = self._conn().execute("SELECT kind, key, until FROM locks WHERE until > ? ORDER BY until DESC",
                                        (now,)).fetchall()
        return [(kind, key, until - now) for kind, key, until in rows]

    def clear(self, kind: str | None = None, key: str | None = None) -> int:
        """Remove locks (and their failure counts): one key, one kind, or all. Returns the locks removed."""
        where, args = [], []
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if key is not None:
            where.append("key = ?")
            args.append(key)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            cur = db.execute("DELETE FROM locks" + clause, args)
            db.execute("DELETE FROM failures" + clause, args)
            db.execute("COMMIT")
        return cur.rowcount

    def view(self, settings: LockoutSettings) -> SharedThrottle:
        """The throttle of one receive connector: its thresholds over the shared counts."""
        return SharedThrottle(self, settings)


class SharedThrottle:
    """:class:`~exmta.auth.lockout.LoginThrottle`'s interface over a :class:`LockoutStore` (blocking)."""

    blocking = True  # the authenticator runs these methods on its thread pool

    def __init__(self, store: LockoutStore, settings: LockoutSettings) -> None:
        self.store = store
        self.settings = settings

    def source_locked(self, ip: str) -> float:
        return self.store.remaining("source", source_key(ip))

    def user_locked(self, user: str) -> float:
        return self.store.remaining("user", user_key(user))

    def identity_locked(self, identity: str) -> float:
        return self.store.remaining("identity", user_key(identity))

    def record_failure(self, ip: str, user: str | None, identity: str | None = None) -> tuple[bool, bool]:
        """Count one failure; returns (source now locked, user or identity now locked)."""
        s = self.settings
        src = self.store.fail("source", source_key(ip), s.ip_threshold, s.window, s.duration)
        usr = bool(user) and self.store.fail("user", user_key(user or ""), s.user_threshold, s.window, s.duration)
        ident = bool(identity) and self.store.fail("identity", user_key(identity or ""), s.user_threshold,
                                                   s.window, s.duration)
        return src, bool(usr or ident)

    def record_success(self, user: str, identity: str | None = None) -> None:
        self.store.forget("user", user_key(user))
        if identity:
            self.store.forget("identity", user_key(identity))
