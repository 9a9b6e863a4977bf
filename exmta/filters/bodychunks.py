"""A message's body as an async stream of chunks, read off the reactor: what a scanner client sends."""
from __future__ import annotations

from typing import Any, AsyncIterator

from twisted.internet.threads import deferToThreadPool

__all__ = ["body_chunks"]


async def body_chunks(view: Any, reactor: Any, threadpool: Any, size: int) -> AsyncIterator[bytes]:
    """The message in ``size``-octet chunks, read from the spool on ``threadpool`` (inline without one)."""
    f = view.open_body() if threadpool is None else await deferToThreadPool(reactor, threadpool, view.open_body)
    try:
        while True:
            chunk = f.read(size) if threadpool is None else \
                await deferToThreadPool(reactor, threadpool, f.read, size)
            if not chunk:
                return
            yield chunk
    finally:
        f.close()
