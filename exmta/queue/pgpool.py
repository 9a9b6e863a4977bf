"""The PostgreSQL store's connection pool (used by the queue, shared AUTH lockouts and rates)."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["Connections"]


class Connections:
    """A small connection pool: idle connections are checked before use, a missing one is made at once.

    No background reconnection with growing back-off (psycopg_pool waited up to a minute after a
    PostgreSQL restart): every request that needs a connection tries to make one, bounded by the
    store's thread pool and ``connect_timeout``, so service resumes as soon as the server is back.
    """

    def __init__(self, dsn: str, max_idle: int, connect_timeout: float, application_name: str) -> None:
        self.dsn = dsn
        self.max_idle = max_idle
        self.connect_timeout = max(1, int(connect_timeout))
        self.application_name = application_name
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    def _connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self.dsn, connect_timeout=self.connect_timeout,
                               application_name=self.application_name)
        conn.execute("SET synchronous_commit = on")  # a 250 needs the commit on disk
        conn.commit()
        return conn

    def _checkout(self) -> Any:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            try:
                conn.execute("SELECT 1")
                conn.rollback()
                return conn
            except Exception:
                conn.close()  # stale (the server restarted): try the next one, then a new one

    @contextmanager
    def connection(self) -> Iterator[Any]:
        conn = self._checkout()
        try:
            yield conn
        finally:
            keep = False
            if not conn.closed and not conn.broken:
                try:
                    conn.rollback()
                    keep = True
                except Exception:
                    keep = False
            with self._lock:
                if keep and not self._closed and len(self._idle) < self.max_idle:
                    self._idle.append(conn)
                    conn = None
            if conn is not None:
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
