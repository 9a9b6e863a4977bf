"""Which queue store a process uses: the embedded spool, or the PostgreSQL queue shared by nodes.

The main process and every receive worker call :func:`make_store`, so both
get the same store from one config.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from zope.interface.verify import verifyObject

from exmta.config.schema import Config
from exmta.interfaces import IQueueAdmin, IQueueStore


@dataclass
class StoreChoice:
    store: Any
    service: Service | None     # started before the store is recovered; None for the spool
    shared: bool                # True when several nodes share the queue


def node_name(config: Config) -> str:
    return config.postgres.node or config.hostname


def make_store(config: Config, paths: dict[str, str], reactor: Any, pool: Any, *, worker: bool) -> StoreChoice:
    """The queue store for this process, checked against IQueueStore and IQueueAdmin."""
    if config.queue.store == "postgres":
        from exmta.queue.postgres import PostgresStore

        pg = config.postgres
        work_dir = os.path.join(paths["queue"], "postgres-worker" if worker else "postgres")
        store: Any = PostgresStore(pg.dsn, node_name(config), work_dir, reactor, clock=reactor, lease=pg.lease,
                                   pool_size=pg.pool_size, connect_timeout=pg.connect_timeout,
                                   poll_interval=pg.poll_interval)
        service: Service | None = store.service
        shared = True
    else:
        from exmta.queue.spool import SpoolStore

        if worker:  # only the main process claims; no thread hand-offs but the syncfs calls
            store = SpoolStore(paths["queue"], reactor, pool, clock=reactor, claims=False,
                               io="inline", sync=config.spool_sync_for(worker=True),
                               writer_lock=True)  # a restarted main's recovery waits for this process to exit
        else:
            store = SpoolStore(paths["queue"], reactor, pool, clock=reactor, io=config.main_spool_io,
                               sync=config.spool_sync_for(worker=False))
        service = None
        shared = False
    verifyObject(IQueueStore, store)
    verifyObject(IQueueAdmin, store)
    return StoreChoice(store, service, shared)
