"""Which AUTH lockout store a node uses: its SQLite file, or the cluster's PostgreSQL tables.

Kept apart from both stores so that neither imports the other (the PostgreSQL one builds on
:mod:`exmta.auth.lockstore`).
"""
from __future__ import annotations

import os
from typing import Any

from exmta.auth.lockstore import FILE_NAME, LockoutStore
from exmta.auth.pglockstore import PostgresLockoutStore
from exmta.queue.pgpool import Connections

__all__ = ["lockout_store_for"]


def lockout_store_for(config: Any, clock: Any) -> LockoutStore:
    """The node's SQLite file, or the cluster's PostgreSQL tables with ``[queue] store = "postgres"``."""
    if config.queue.store == "postgres":
        pg = config.postgres
        connections = Connections(pg.dsn, 2, pg.connect_timeout, f"exmta {pg.node or config.hostname} auth")
        return PostgresLockoutStore(connections, clock)
    return LockoutStore(os.path.join(os.path.abspath(config.data_dir), FILE_NAME), clock)
