"""AUTH failure counts and lockouts shared by every node of a cluster, in the PostgreSQL queue's database.

With ``[queue] store = "postgres"`` an attacker must not get a fresh quota
of guesses on each node behind the load balancer: the counts and locks of
:class:`~exmta.auth.lockstore.LockoutStore` live in two tables of the
queue's database instead of a per-node SQLite file. Same keys, same
semantics, same methods; each call is one short transaction (the
authenticator runs them on its bounded thread pool, and only AUTH and
its failures touch them, never an ordinary SMTP command).
"""
from __future__ import annotations

from typing import Any

from exmta.auth.lockstore import MAX_ROWS, LockoutStore

__all__ = ["PostgresLockoutStore"]


class PostgresLockoutStore(LockoutStore):
    """:class:`LockoutStore` on PostgreSQL; ``connections`` is an exmta.queue.pgpool.Connections pool."""

    def __init__(self, connections: Any, clock: Any, label: str = "PostgreSQL") -> None:
        super().__init__(label, clock)
        self.connections = connections

    def _run(self, work: Any) -> Any:
        with self.connections.connection() as conn:
            with conn.transaction():
                with conn.cursor() as cur:
                    return work(cur)

    def close(self) -> None:
        self.connections.close()

    def fail(self, kind: str, key: str, threshold: int, window: float, duration: float) -> bool:
        if threshold <= 0 or not key:
            return False
        now = self.clock.seconds()

        def work(cur: Any) -> bool:
            # one lock per (kind, key) across nodes: two nodes counting the same key take turns
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{kind}:{key}",))
            cur.execute("DELETE FROM exmta_auth_failure WHERE kind = %s AND key = %s AND at <= %s",
                        (kind, key, now - window))
            cur.execute("INSERT INTO exmta_auth_failure VALUES (%s, %s, %s)", (kind, key, now))
            cur.execute("SELECT count(*) FROM exmta_auth_failure WHERE kind = %s AND key = %s", (kind, key))
            locked = cur.fetchone()[0] >= threshold
            if locked:
                cur.execute("INSERT INTO exmta_auth_lock VALUES (%s, %s, %s) ON CONFLICT (kind, key)"
                            " DO UPDATE SET until = excluded.until", (kind, key, now + duration))
                cur.execute("DELETE FROM exmta_auth_failure WHERE kind = %s AND key = %s", (kind, key))
            cur.execute("DELETE FROM exmta_auth_lock WHERE until <= %s", (now,))
            cur.execute("SELECT count(*) FROM exmta_auth_failure")
            rows = cur.fetchone()[0]
            if rows > MAX_ROWS:  # a flood of distinct names stays bounded
                cur.execute("DELETE FROM exmta_auth_failure WHERE ctid IN (SELECT ctid FROM exmta_auth_failure"
                            " ORDER BY at LIMIT %s)", (rows - MAX_ROWS,))
            return locked
        return bool(self._run(work))

    def remaining(self, kind: str, key: str) -> float:
        if not key:
            return 0.0

        def work(cur: Any) -> Any:
            cur.execute("SELECT until FROM exmta_auth_lock WHERE kind = %s AND key = %s", (kind, key))
            return cur.fetchone()
        row = self._run(work)
        left = (row[0] - self.clock.seconds()) if row else 0.0
        return left if left > 0 else 0.0

    def forget(self, kind: str, key: str) -> None:
        self._run(lambda cur: cur.execute("DELETE FROM exmta_auth_failure WHERE kind = %s AND key = %s",
                                          (kind, key)))

    def locks(self) -> list[tuple[str, str, float]]:
        now = self.clock.seconds()

        def work(cur: Any) -> list[tuple[str, str, float]]:
            cur.execute("SELECT kind, key, until FROM exmta_auth_lock WHERE until > %s ORDER BY until DESC", (now,))
            return list(cur.fetchall())
        return [(kind, key, until - now) for kind, key, until in self._run(work)]

    def clear(self, kind: str | None = None, key: str | None = None) -> int:
        where, args = [], []
        if kind is not None:
            where.append("kind = %s")
            args.append(kind)
        if key is not None:
            where.append("key = %s")
            args.append(key)
        clause = (" WHERE " + " AND ".join(where)) if where else ""

        def work(cur: Any) -> int:
            cur.execute("DELETE FROM exmta_auth_lock" + clause, args)
            removed = cur.rowcount
            cur.execute("DELETE FROM exmta_auth_failure" + clause, args)
            return removed
        return int(self._run(work))
