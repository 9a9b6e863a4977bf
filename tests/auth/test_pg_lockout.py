"""AUTH lockouts shared by the nodes of a cluster (PostgreSQL): a guess on one node counts on every node,
and `exmta lockouts` lists and clears the cluster's locks."""
from __future__ import annotations

from pathlib import Path

from twisted.internet import task

from exmta.auth.lockout import LockoutSettings
from exmta.auth.pglockstore import PostgresLockoutStore
from exmta.cli import main
from exmta.queue.postgres import Connections

SETTINGS = LockoutSettings(ip_threshold=10, user_threshold=3, window=600.0, duration=900.0)


def store(dsn: str, clock: task.Clock) -> PostgresLockoutStore:
    return PostgresLockoutStore(Connections(dsn, 2, 5.0, "test"), clock)


def test_failures_on_two_nodes_add_up_and_a_lock_is_seen_by_both(pg_dsn: str) -> None:
    clock = task.Clock()
    clock.advance(1_800_000_000)
    node_a, node_b = store(pg_dsn, clock).view(SETTINGS), store(pg_dsn, clock).view(SETTINGS)
    try:
        assert node_a.record_failure("192.0.2.1", "alice") == (False, False)
        assert node_b.record_failure("192.0.2.2", " Alice") == (False, False)   # the same user, another node
        assert node_a.record_failure("192.0.2.3", "ALICE") == (False, True)     # third strike: locked
        assert node_b.user_locked("alice") == 900.0
        assert node_b.user_locked("bob") == 0.0
        clock.advance(901)
        assert node_a.user_locked("alice") == 0.0
        node_a.record_failure("192.0.2.1", "carol", identity="uid=carol,dc=example")
        node_b.record_success("carol", identity="uid=carol,dc=example")         # a success clears the count
        assert node_a.record_failure("192.0.2.1", "carol") == (False, False)
    finally:
        node_a.store.close()
        node_b.store.close()


def test_lockouts_command_lists_and_clears_the_clusters_locks(pg_dsn: str, tmp_path: Path, capsys) -> None:
    conf = tmp_path / "node.toml"
    conf.write_text(f"""
[receive.default]
listen = ["tcp:2525:interface=127.0.0.1"]

[queue]
store = "postgres"

[postgres]
dsn = "{pg_dsn}"
""")
    import time

    class Wall:
        def seconds(self) -> float:
            return time.time()

    s = store(pg_dsn, Wall())  # type: ignore[arg-type]
    try:
        for _ in range(3):
            s.fail("user", "mallory", 3, 600.0, 900.0)
    finally:
        s.close()
    assert main(["lockouts", "list", "-c", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "user\t'mallory'" in out and "1 lockout(s)" in out
    assert main(["lockouts", "clear", "user", "mallory", "-c", str(conf)]) == 0
    assert "1 lockout(s) cleared" in capsys.readouterr().out
    assert main(["lockouts", "list", "-c", str(conf)]) == 0
    assert "0 lockout(s)" in capsys.readouterr().out
