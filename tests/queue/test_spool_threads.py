"""SpoolStore on the real reactor with a real, bounded thread pool (loopback-free integration)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.python.threadpool import ThreadPool

from exmta.model import Envelope, Recipient
from exmta.queue.spool import SpoolStore


@pytest_twisted.ensureDeferred
async def test_many_concurrent_commits_then_claim_update_on_threads(tmp_path: Path) -> None:
    from twisted.internet import reactor

    pool = ThreadPool(minthreads=1, maxthreads=8, name="spool-test")
    pool.start()
    try:
        store = SpoolStore(str(tmp_path), reactor, pool)
        heard: list[str] = []
        store.add_listener(heard.append)
        assert await store.recover() == 0

        async def one(i: int) -> str:
            w = store.open_writer()
            for _ in range(4):
                w.write(b"line %d\r\n" % i * 100)
            return await store.commit(w, Envelope("a@example.com", [Recipient(f"r{i}@example.net")]))

        requests_before = store.syncer.requests
        ids: list[Any] = await gatherResults([Deferred.fromCoroutine(one(i)) for i in range(60)])
        assert len(set(ids)) == 60 and sorted(heard) == sorted(ids)
        assert store.syncer.rounds < 60, "concurrent commits must share directory fsync rounds"
        assert store.syncer.requests - requests_before == 60

        entries = await store.claim(reactor.seconds(), 1000)
        assert sorted(e.queue_id for e in entries) == sorted(ids)
        later = reactor.seconds() + 3600
        await gatherResults([
            store.update(e.queue_id, e.envelope, None if n % 2 else later) for n, e in enumerate(entries)
        ])
        assert len(os.listdir(tmp_path / "deferred")) == 30
        assert len(os.listdir(tmp_path / "msg")) == 30
        assert os.listdir(tmp_path / "active") == [] and os.listdir(tmp_path / "tmp") == []
        assert store.next_due() == later
        assert await store.claim(reactor.seconds(), 1000) == []
    finally:
        pool.stop()
