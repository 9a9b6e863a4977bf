"""``exmta lockouts``: list and clear the node's AUTH lockouts (issue 10 item 11).

::

    exmta lockouts list  (-c CONFIG | --data DIR)
    exmta lockouts clear (-c CONFIG | --data DIR) (--all | KIND KEY)

KIND is ``source`` (an IPv4 address or an IPv6 /64 as listed), ``user`` (a
login name) or ``identity`` (what the back end resolved a name to). The
store is the data directory's ``auth-lockout.sqlite``, shared by the running
server's connectors and receive workers; changes apply at once.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from exmta.auth.lockout import source_key
from exmta.auth.lockstore import FILE_NAME, KINDS, LockoutStore, user_key

__all__ = ["add_lockouts_parser"]


class _WallClock:
    @staticmethod
    def seconds() -> float:
        return time.time()


def _store(args: argparse.Namespace) -> LockoutStore | None:
    if args.config:
        from exmta.config.load import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as e:
            print(str(e), file=sys.stderr)
            return None
        if config.queue.store == "postgres":  # the cluster's locks, shared by every node
            from exmta.auth.lockout_stores import lockout_store_for

            return lockout_store_for(config, _WallClock())
        data = config.data_dir
    else:
        data = args.data
    path = os.path.join(os.path.abspath(data), FILE_NAME)
    if not os.path.exists(path):
        print(f"no lockouts recorded ({path} does not exist)", file=sys.stderr)
    return LockoutStore(path, _WallClock())


def _exists(store: LockoutStore) -> bool:
    """A node's SQLite file may not exist yet (nothing recorded); the cluster's tables always do."""
    return type(store) is not LockoutStore or os.path.exists(store.path)


def _list(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        return _list_in(store)
    finally:
        if store is not None:
            store.close()


def _list_in(store: LockoutStore | None) -> int:
    if store is None:
        return 2
    if not _exists(store):
        return 0
    rows = store.locks()
    for kind, key, left in rows:
        print(f"{kind}\t{key!r}\t{left:.0f}s left")
    print(f"{len(rows)} lockout(s)")
    return 0


def _clear(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        return _clear_in(args, store)
    finally:
        if store is not None:
            store.close()


def _clear_in(args: argparse.Namespace, store: LockoutStore | None) -> int:
    if store is None:
        return 2
    if not _exists(store):
        return 0
    if args.all:
        n = store.clear()
    else:
        if args.kind is None or args.key is None:
            print("give KIND KEY or --all", file=sys.stderr)
            return 2
        key = source_key(args.key) if args.kind == "source" else user_key(args.key)
        n = store.clear(args.kind, key)
    print(f"{n} lockout(s) cleared")
    return 0


def add_lockouts_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lockouts", help="list or clear AUTH lockouts (all connectors and receive workers)")
    cmds = p.add_subparsers(dest="lockouts_command", metavar="ACTION", required=True)
    for name, func, text in (("list", _list, "list current lockouts"), ("clear", _clear, "clear lockouts")):
        c = cmds.add_parser(name, help=text)
        where = c.add_mutually_exclusive_group(required=True)
        where.add_argument("-c", "--config", help="the server's TOML configuration (for its data_dir)")
        where.add_argument("--data", help="the server's data directory")
        if name == "clear":
            c.add_argument("kind", nargs="?", choices=KINDS)
            c.add_argument("key", nargs="?", help="the address, user name or identity")
            c.add_argument("--all", action="store_true", help="clear every lockout")
        c.set_defaults(func=func)
