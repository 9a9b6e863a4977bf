"""The PostgreSQL queue's schema, versioned, created and migrated by the program.

``exmta db init|migrate|status`` call :func:`migrate` and :func:`status`.
Several nodes may run ``migrate`` at once: each migration runs in one
transaction under a transaction-scoped advisory lock, and re-reads the
version after taking it, so a second node finds the work done.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: pg_advisory_xact_lock key of schema changes ("exmta" in ASCII, as a bigint)
SCHEMA_LOCK = 0x65786D7461

#: (version, statements); append only: a released migration is never edited
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        """CREATE TABLE exmta_message (
            queue_id      text PRIMARY KEY,
            state         text NOT NULL CHECK (state IN ('incoming', 'active', 'deferred', 'hold')),
            envelope      text NOT NULL,
            next_attempt  double precision NOT NULL DEFAULT 0,
            size          bigint NOT NULL,
            sha256        bytea NOT NULL,
            chunks        integer NOT NULL,
            lease_owner   text,
            lease_token   bigint,
            lease_expires timestamptz,
            committed_by  text NOT NULL,
            committed_at  timestamptz NOT NULL DEFAULT now()
        )""",
        # due mail: new first come first served, deferred by retry time, expired leases
        "CREATE INDEX exmta_message_due ON exmta_message (state, next_attempt)",
        "CREATE INDEX exmta_message_lease ON exmta_message (lease_owner) WHERE state = 'active'",
        """CREATE TABLE exmta_content (
            queue_id text NOT NULL REFERENCES exmta_message (queue_id) ON DELETE CASCADE,
            seq      integer NOT NULL,
            data     bytea NOT NULL,
            PRIMARY KEY (queue_id, seq)
        )""",
        "CREATE SEQUENCE exmta_lease_token",
        """CREATE TABLE exmta_node (
            name        text PRIMARY KEY,
            started_at  timestamptz NOT NULL,
            heartbeat   timestamptz NOT NULL,
            pid         integer NOT NULL,
            draining    boolean NOT NULL DEFAULT false,
            received    bigint NOT NULL DEFAULT 0,
            lost_leases bigint NOT NULL DEFAULT 0
        )""",
    )),
)

MIGRATIONS += (
    (2, (
        # AUTH failures and locks shared by every node (exmta.auth.pglockstore)
        """CREATE TABLE exmta_auth_failure (
            kind text NOT NULL,
            key  text NOT NULL,
            at   double precision NOT NULL
        )""",
        "CREATE INDEX exmta_auth_failure_key ON exmta_auth_failure (kind, key, at)",
        "CREATE INDEX exmta_auth_failure_at ON exmta_auth_failure (at)",
        """CREATE TABLE exmta_auth_lock (
            kind  text NOT NULL,
            key   text NOT NULL,
            until double precision NOT NULL,
            PRIMARY KEY (kind, key)
        )""",
    )),
)

MIGRATIONS += (
    (3, (
        # the message tracking events of every node, one partition per UTC day (exmta.observe.pgtracking)
        """CREATE TABLE exmta_tracking (
            at         double precision NOT NULL,
            node       text NOT NULL,
            event_id   text NOT NULL,
            queue_id   text,
            message_id text,
            record     jsonb NOT NULL
        ) PARTITION BY RANGE (at)""",
        "CREATE TABLE exmta_tracking_default PARTITION OF exmta_tracking DEFAULT",
        "CREATE INDEX exmta_tracking_at ON exmta_tracking (at)",
        "CREATE INDEX exmta_tracking_queue_id ON exmta_tracking (queue_id)",
        "CREATE INDEX exmta_tracking_message_id ON exmta_tracking (message_id)",
    )),
)

MIGRATIONS += (
    (4, (
        # per-minute counts of the receive rate limits, per counting process (exmta.receive.sharedrates)
        """CREATE UNLOGGED TABLE exmta_rate (
            name   text NOT NULL,
            key    text NOT NULL,
            bucket bigint NOT NULL,
            source text NOT NULL,
            count  bigint NOT NULL,
            PRIMARY KEY (name, key, bucket, source)
        )""",
        "CREATE INDEX exmta_rate_bucket ON exmta_rate (bucket)",
    )),
)

MIGRATIONS += (
    (5, (
        "ALTER TABLE exmta_node ADD COLUMN receive_rate double precision NOT NULL DEFAULT 0",
    )),
)

LATEST = MIGRATIONS[-1][0]


@dataclass(frozen=True)
class SchemaStatus:
    version: int      # 0: no schema yet
    latest: int

    @property
    def current(self) -> bool:
        return self.version == self.latest


def current_version(cur: Any) -> int:
    """The schema version in the database the cursor is connected to (0 when none)."""
    cur.execute("SELECT to_regclass('exmta_schema') IS NOT NULL")
    if not cur.fetchone()[0]:
        return 0
    cur.execute("SELECT max(version) FROM exmta_schema")
    row = cur.fetchone()
    return int(row[0] or 0)


def status(conn: Any) -> SchemaStatus:
    with conn.cursor() as cur:
        version = current_version(cur)
    conn.rollback()
    return SchemaStatus(version, LATEST)


def migrate(conn: Any) -> list[int]:
    """Apply every migration the database lacks; returns the versions applied here.

    Safe to run from several nodes at once (advisory lock, version re-read
    under it); a newer schema than this program knows is an error.
    """
    applied: list[int] = []
    for version, statements in MIGRATIONS:
        with conn.transaction():
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                cur.execute("CREATE TABLE IF NOT EXISTS exmta_schema ("
                            "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
                have = current_version(cur)
                if have > LATEST:
                    raise RuntimeError(f"the database schema is version {have}, newer than this "
                                       f"exmta knows ({LATEST}): upgrade exmta on this node")
                if have >= version:
                    continue
                for statement in statements:
                    cur.execute(statement)
                cur.execute("INSERT INTO exmta_schema (version) VALUES (%s)", (version,))
                applied.append(version)
    return applied


def migrate_dsn(dsn: str, connect_timeout: float = 10.0) -> list[int]:
    """Create or migrate the schema (``exmta db migrate``)."""
    import psycopg

    with psycopg.connect(dsn, connect_timeout=max(1, int(connect_timeout))) as conn:
        return migrate(conn)


def status_dsn(dsn: str, connect_timeout: float = 10.0) -> SchemaStatus:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=max(1, int(connect_timeout))) as conn:
        return status(conn)
