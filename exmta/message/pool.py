"""Reading and parsing a spooled message off the reactor thread, on a bounded pool."""
from __future__ import annotations

from typing import Any, BinaryIO, Callable

from twisted.internet.threads import deferToThreadPool

from exmta.message.limits import Limits
from exmta.message.parse import MimeMessage

__all__ = ["load_message", "read_content"]


def read_content(open_content: Callable[[], BinaryIO], limit: int | None = None) -> bytes:
    """The whole message (blocking: call it in a thread)."""
    with open_content() as f:
        return f.read() if limit is None else f.read(limit)


def _load(open_content: Callable[[], BinaryIO], limits: Limits) -> MimeMessage:
    msg = MimeMessage(read_content(open_content), limits)
    msg.header_values("Subject")  # the header fields are scanned here, in the thread; the tree waits
    return msg


async def load_message(open_content: Callable[[], BinaryIO], limits: Limits, reactor: Any,
                       threadpool: Any) -> MimeMessage:
    """A :class:`MimeMessage` read and header-parsed in ``threadpool`` (inline when it is None)."""
    if threadpool is None:
        return _load(open_content, limits)
    return await deferToThreadPool(reactor, threadpool, _load, open_content, limits)
