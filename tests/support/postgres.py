"""A private PostgreSQL cluster from Debian's binaries, for the PostgreSQL queue store's tests.

``initdb`` runs in a fresh temporary directory owned by the ``postgres``
user (PostgreSQL refuses to run as root), the server listens on a Unix
socket in that directory only (no TCP port, so nothing can collide), and it
is stopped by its PID. Each test gets its own database, created from the
cluster in a few milliseconds:

    with PostgresCluster() as pg:
        dsn = pg.create_database()
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1] if glob.glob("/usr/lib/postgresql/*/bin") else ""


def available() -> bool:
    return bool(PG_BIN) and os.path.exists(os.path.join(PG_BIN, "initdb"))


def _as_postgres() -> dict[str, object]:
    if os.getuid() != 0:
        return {}
    pw = pwd.getpwnam("postgres")

    def demote() -> None:
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    return {"preexec_fn": demote}


class PostgresCluster:
    """initdb + postgres on a Unix socket in a temporary directory; stop() ends it by PID."""

    def __init__(self, port: int = 5432, extra_conf: str = "") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="exmta-pg-"))
        self.data = self.dir / "data"
        self.socket_dir = str(self.dir)
        self.port = port  # names the socket file only: no TCP listener
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "postgres.log"

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _chown(self) -> None:
        if os.getuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o755)

    def start(self) -> None:
        self._chown()
        if not self.data.exists():
            subprocess.run([os.path.join(PG_BIN, "initdb"), "-D", str(self.data), "-U", "postgres",
                            "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C.UTF-8"],
                           check=True, capture_output=True, timeout=120, **_as_postgres())  # type: ignore[call-overload]
            with open(self.data / "postgresql.conf", "a") as f:
                f.write(f"listen_addresses = ''\nunix_socket_directories = '{self.socket_dir}'\n"
                        f"port = {self.port}\nfsync = on\nsynchronous_commit = on\nmax_connections = 200\n"
                        f"shared_buffers = 32MB\n{self.extra_conf}\n")
        log = open(self.log, "ab")
        self.proc = subprocess.Popen([os.path.join(PG_BIN, "postgres"), "-D", str(self.data)],
                                     stdout=log, stderr=log, **_as_postgres())  # type: ignore[call-overload]
        log.close()
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log.read_text(errors='replace')[-2000:]}")
            r = subprocess.run([os.path.join(PG_BIN, "pg_isready"), "-h", self.socket_dir, "-p", str(self.port),
                                "-U", "postgres"], capture_output=True, timeout=30)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready after {timeout}s")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGINT) -> None:  # "fast" shutdown: SIGTERM would wait for clients
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)

    def restart(self) -> None:
        self.stop()  # sessions are cut, as in a real restart
        self.start()

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} port={self.port} user=postgres dbname={dbname}"

    def create_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


# ---------------------------------------------------------------- pytest fixtures (conftest's pytest_plugins)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pg_cluster():
    """One private PostgreSQL server for the whole test session (databases are per test)."""
    if not available():
        pytest.fail("PostgreSQL binaries missing: run scripts/install-test-deps.sh")
    with PostgresCluster() as pg:
        yield pg


@pytest.fixture
def pg_dsn(pg_cluster: PostgresCluster) -> str:
    """A fresh database with the exmta schema, for one test."""
    from exmta.queue.postgres import migrate_dsn

    dsn = pg_cluster.create_database()
    migrate_dsn(dsn)
    return dsn
