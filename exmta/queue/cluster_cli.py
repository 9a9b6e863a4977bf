"""``exmta db init|migrate|status`` and ``exmta cluster status|drain|undrain``: the PostgreSQL queue.

Both read the ``[postgres]`` section of the configuration (``-c FILE``) and
talk to the database directly, so they work from any node, and while every
node is down.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from exmta.config.load import ConfigError, load_config

DEFAULT_CONFIG = "/etc/exmta/exmta.toml"


def _dsn(args: argparse.Namespace) -> tuple[str, Any] | None:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return None
    if config.queue.store != "postgres":
        print(f'{args.config}: [queue] store is "{config.queue.store}"; these commands need "postgres"',
              file=sys.stderr)
        return None
    return config.postgres.dsn, config


def _db(args: argparse.Namespace) -> int:
    from exmta.queue.postgres import migrate_dsn, status_dsn

    found = _dsn(args)
    if found is None:
        return 2
    dsn, config = found
    try:
        if args.action in ("init", "migrate"):
            applied = migrate_dsn(dsn, config.postgres.connect_timeout)
            st = status_dsn(dsn, config.postgres.connect_timeout)
            if applied:
                print(f"schema migrated to version {st.version} (applied: {', '.join(map(str, applied))})")
            else:
                print(f"schema already at version {st.version}; nothing to do")
            return 0
        st = status_dsn(dsn, config.postgres.connect_timeout)
    except Exception as e:
        print(f"PostgreSQL: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if st.version == 0:
        print(f"no exmta schema in the database (run: exmta db init -c {args.config})")
        return 1
    print(f"schema version {st.version}, this exmta knows {st.latest}: "
          + ("current" if st.current else f"run: exmta db migrate -c {args.config}"))
    return 0 if st.current else 1


def _run_store(config: Any, work: Any) -> Any:
    """Run one store call synchronously, for a command-line tool (its own threads, no reactor)."""
    import tempfile

    from exmta.queue.postgres import PostgresStore
    from twisted.internet import task

    class Inline:
        def callFromThread(self, f: Any, *a: Any, **kw: Any) -> None:
            f(*a, **kw)

    class InlinePool:
        def callInThreadWithCallback(self, on_result: Any, f: Any, *a: Any, **kw: Any) -> None:
            from twisted.python.failure import Failure
            try:
                r = f(*a, **kw)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, r)

    with tempfile.TemporaryDirectory(prefix="exmta-cli-") as tmp:
        store = PostgresStore(config.postgres.dsn, "cli", tmp, Inline(), clock=task.Clock(), pool_size=1,
                              connect_timeout=config.postgres.connect_timeout, threadpool=InlinePool())
        try:
            out: list[Any] = []
            work(store).addBoth(out.append)
            value = out[0]
            if hasattr(value, "raiseException"):
                value.raiseException()
            return value
        finally:
            store.close()


def _cluster(args: argparse.Namespace) -> int:
    found = _dsn(args)
    if found is None:
        return 2
    _, config = found
    try:
        if args.action in ("drain", "undrain"):
            ok = _run_store(config, lambda s: s.set_draining(args.node, args.action == "drain"))
            if not ok:
                print(f"no node {args.node!r} has registered (exmta cluster status lists them)", file=sys.stderr)
                return 1
            what = ("draining: within one heartbeat (5s) its /readyz fails and it claims no more mail"
                    if args.action == "drain" else "back in service")
            print(f"node {args.node} {what}")
            return 0
        nodes = _run_store(config, lambda s: s.nodes())
        counts = _run_store(config, lambda s: s.counts())
    except Exception as e:
        print(f"PostgreSQL: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    stale = max(15.0, config.postgres.lease / 2)
    if args.json:
        print(json.dumps({"nodes": [dict(n.__dict__, alive=n.heartbeat_age <= stale) for n in nodes],
                          "queue": counts}, indent=2))
    else:
        print(f"{'NODE':<20} {'STATE':<9} {'HEARTBEAT':>10} {'CLAIMED':>8} {'RECEIVED':>9} {'MSGS/S':>7} "
              f"{'LOST LEASES':>11}")
        for n in nodes:  # every node has the same role: it receives, and delivers whatever is due
            state = "draining" if n.draining else ("up" if n.heartbeat_age <= stale else "down")
            print(f"{n.name:<20} {state:<9} {n.heartbeat_age:>9.0f}s {n.claimed:>8} {n.received:>9} "
                  f"{n.receive_rate:>7.1f} {n.lost_leases:>11}")
        print("queue: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def add_commands(sub: Any) -> None:
    db = sub.add_parser("db", help="the PostgreSQL queue's schema: init, migrate, status")
    db.add_argument("action", choices=["init", "migrate", "status"])
    db.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="configuration file with [postgres]")
    db.set_defaults(func=_db)
    cl = sub.add_parser("cluster", help="nodes sharing the PostgreSQL queue: status, drain, undrain")
    cl.add_argument("action", choices=["status", "drain", "undrain"])
    cl.add_argument("node", nargs="?", help="the node to drain or undrain (its [postgres] node name)")
    cl.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="configuration file with [postgres]")
    cl.add_argument("--json", action="store_true", help="machine-readable output")

    def run(args: argparse.Namespace) -> int:
        if args.action != "status" and not args.node:
            print(f"exmta cluster {args.action} needs a NODE", file=sys.stderr)
            return 2
        return _cluster(args)
    cl.set_defaults(func=run)
