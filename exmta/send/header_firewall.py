"""Exchange's header firewall on the way out: organisation headers leave only toward trusted hops.

On receive, :mod:`exmta.smtp.server` strips ``X-MS-Exchange-Organization-*``,
``-Forest-*`` and ``-CrossPremises-*`` from sessions without the right to
send them. On send, Exchange keeps them only toward connectors that hold
``Ms-Exch-Send-Headers-Organization`` (its Exchange servers and the hybrid
connector) and removes them toward the internet, where they would leak
internal state (``AuthAs``, ``SCL``, ``MessageDirectionality``...) and could
be replayed into another organisation.

A send connector with ``send_organization_headers = false`` (the default)
gets an :class:`OutboundHeaderFirewall`; the connector asks
:meth:`OutboundHeaderFirewall.prepare` for the request to deliver, before
DKIM signing. Only the header section is read and rewritten; the body is
streamed from the queue file as it is.
"""
from __future__ import annotations

import io
from dataclasses import replace
from typing import Any, BinaryIO, Iterable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from exmta.model import DeliveryRequest

__all__ = ["FIREWALLED_PREFIXES", "OutboundHeaderFirewall", "attach_header_firewalls", "strip_header_section"]

log = Logger()

#: the header families Exchange keeps inside the organisation (lower case)
FIREWALLED_PREFIXES = (b"x-ms-exchange-organization-", b"x-ms-exchange-forest-", b"x-ms-exchange-crosspremises-")
#: a header section larger than this is passed unchanged (and logged): no MTA writes one
MAX_HEAD = 1024 * 1024
_READ = 64 * 1024


def strip_header_section(head: bytes, prefixes: Iterable[bytes] = FIREWALLED_PREFIXES) -> tuple[bytes, int]:
    """``head`` (the header section, with or without its empty line) without the fields whose
    name starts with one of ``prefixes`` (case-insensitive), and how many fields were removed.
    Continuation lines go with their field."""
    prefixes = tuple(prefixes)
    out: list[bytes] = []
    removed = 0
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):  # a continuation line belongs to the field above
            if not dropping:
                out.append(line)
            continue
        dropping = line.lower().startswith(prefixes)
        if dropping:
            removed += 1
        else:
            out.append(line)
    return b"".join(out), removed


class _Spliced(io.RawIOBase):
    """A read-only file: ``head`` bytes, then the rest of ``rest`` from its current position."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        super().__init__()
        self._head = memoryview(head)
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(view))
        view[:len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self._rest.close()
        finally:
            super().close()


def _read_head(f: BinaryIO) -> tuple[bytes, bool]:
    """The header section including its empty line (or everything read), and whether it ended."""
    data = b""
    while len(data) <= MAX_HEAD:
        chunk = f.read(_READ)
        if not chunk:
            return data, True  # a message that is all header
        start = max(0, len(data) - 3)
        data += chunk
        if data.startswith(b"\r\n") or data.startswith(b"\n"):
            return data, True  # no header at all; nothing to strip
        end = data.find(b"\r\n\r\n", start)
        if end >= 0:
            return data, True
        lf = data.find(b"\n\n", start)
        if lf >= 0:
            return data, True
    return data, False


def _split_head(data: bytes) -> tuple[bytes, bytes]:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0:
            return data[:i + len(sep) // 2], data[i + len(sep) // 2:]
    return data, b""


class OutboundHeaderFirewall:
    """Removes the organisation header families from a DeliveryRequest's content."""

    def __init__(self, connector: str, reactor: Any = None, threadpool: Any = None) -> None:
        self.connector = connector
        self.reactor = reactor
        self.threadpool = threadpool

    def _run(self, fn: Any, *args: Any) -> Deferred[Any]:
        if self.threadpool is None:
            return maybeDeferred(fn, *args)
        return deferToThreadPool(self.reactor, self.threadpool, fn, *args)

    def filtered_open(self, request: DeliveryRequest) -> tuple[Any, int] | None:
        """An ``open_content`` that gives the message without the headers, and how many were
        removed; None when the message has none of them (blocking: reads the header section)."""
        with request.open_content() as f:
            data, ended = _read_head(f)
        if not ended:
            log.warn("header firewall: {queue_id} has a header section over {limit} octets; sent unchanged",
                     queue_id=request.queue_id, limit=MAX_HEAD, connector=self.connector)
            return None
        head, _ = _split_head(data)
        if b"x-ms-exchange-" not in head.lower():
            return None
        new_head, removed = strip_header_section(head)
        if not removed:
            return None
        skip = len(head)
        source = request.open_content

        def open_content() -> BinaryIO:
            f = source()
            f.read(skip)  # the old header section (read, not seek: the source may not seek)
            return io.BufferedReader(_Spliced(new_head, f), _READ)

        return open_content, removed

    async def prepare(self, request: DeliveryRequest) -> DeliveryRequest:
        """The request to deliver: without organisation headers when it had any."""
        outcome = await self._run(self.filtered_open, request)
        if outcome is None:
            return request
        open_content, removed = outcome
        log.info("header firewall: {removed} organisation header(s) of {queue_id} removed toward {connector}",
                 removed=removed, queue_id=request.queue_id, connector=self.connector)
        return replace(request, open_content=open_content)


def attach_header_firewalls(config: Any, connectors: dict[str, Any], reactor: Any = None,
                            threadpool: Any = None) -> None:
    """Give every SMTP connector without ``send_organization_headers`` a firewall.

    LMTP and Maildir connectors deliver to mailboxes, where Exchange keeps the headers too."""
    for sc in config.send:
        connector = connectors.get(sc.name)
        if sc.kind != "smtp" or connector is None or not hasattr(connector, "header_firewall"):
            continue
        if not getattr(sc, "send_organization_headers", False):
            connector.header_firewall = OutboundHeaderFirewall(sc.name, reactor, threadpool)
