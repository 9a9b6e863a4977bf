"""Exchange's header firewall on the way out: organisation headers leave only toward trusted hops.

On receive, :mod:`exmta.smtp.header_checks` strips ``X-MS-Exchange-Organization-*``,
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

from dataclasses import replace
from typing import Any, BinaryIO, Iterable

from twisted.logger import Logger

from exmta.model import DeliveryRequest

__all__ = ["FIREWALLED_PREFIXES", "OutboundHeaderFirewall", "attach_header_firewalls", "strip_header_section"]

log = Logger()

#: the header families Exchange keeps inside the organisation (lower case)
FIREWALLED_PREFIXES = (b"x-ms-exchange-organization-", b"x-ms-exchange-forest-", b"x-ms-exchange-crosspremises-")
#: a header section larger than this is passed unchanged (and logged): no MTA writes one
MAX_HEAD = 1024 * 1024
_READ = 8 * 1024  # most header sections fit; the file's own buffer makes this one system call


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


class _Spliced:
    """A read-only file: ``head`` bytes, then the rest of ``rest`` from its current position.

    ``read(n)`` fills up to ``n`` octets as a regular file does (the DKIM
    signer reads a whole message with one call); ``read()`` reads to the end."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._rest.read(n)
        if n is None or n < 0:
            data, self._head = self._head + self._rest.read(), b""
            return data
        if n <= len(self._head):
            data, self._head = self._head[:n], self._head[n:]
            return data
        data, self._head = self._head, b""
        return data + self._rest.read(n - len(data))

    def close(self) -> None:
        self._rest.close()

    def __enter__(self) -> _Spliced:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _head_end(data: bytes, start: int) -> int:
    """Where the header lines end (the empty line starts there), or -1 when not in ``data`` yet.

    A queued message has CRLF line ends (the receive side refuses or normalises bare LF); an LF-only
    message is looked at only when it has no CRLF empty line."""
    i = data.find(b"\r\n\r\n", start)
    if i >= 0:
        return i + 2
    i = data.find(b"\n\n", start)
    return i + 1 if i >= 0 else -1


def _read_head(f: BinaryIO) -> tuple[bytes, int]:
    """(what was read, where the header lines end in it); -1 when the section passes MAX_HEAD."""
    data = f.read(_READ)
    if data.startswith((b"\r\n", b"\n")):
        return data, 0  # no header section at all
    end = _head_end(data, 0)
    while end < 0:
        if len(data) > MAX_HEAD:
            return data, -1
        chunk = f.read(_READ)
        if not chunk:
            return data, len(data)  # a message that is all header
        start = max(0, len(data) - 3)
        data += chunk
        end = _head_end(data, start)
    return data, end


class OutboundHeaderFirewall:
    """Removes the organisation header families from a DeliveryRequest's content.

    The work happens when the content is opened: the SMTP client opens and
    reads the queue file on the reactor thread anyway, and the header section
    it reads first is the only part looked at here, so a delivery costs no
    extra open, no thread hand-off and no copy of the body."""

    def __init__(self, connector: str) -> None:
        self.connector = connector

    def open_filtered(self, request: DeliveryRequest) -> BinaryIO:
        """The message without organisation headers, as a file object."""
        f = request.open_content()
        try:
            data, end = _read_head(f)
        except BaseException:
            f.close()
            raise
        if end < 0:
            log.warn("header firewall: {queue_id} has a header section over {limit} octets; sent unchanged",
                     queue_id=request.queue_id, limit=MAX_HEAD, connector=self.connector)
            return _Spliced(data, f)  # type: ignore[return-value]
        head = data[:end]
        removed = 0
        if b"x-ms-exchange-" in head.lower():
            new_head, removed = strip_header_section(head)
        if not removed:  # the usual case: the file as it is, from the start
            if f.seekable():
                f.seek(0)
                return f
            return _Spliced(data, f)  # type: ignore[return-value]
        log.info("header firewall: {removed} organisation header(s) of {queue_id} removed toward {connector}",
                 removed=removed, queue_id=request.queue_id, connector=self.connector)
        if f.seekable():
            f.seek(len(head))
            return _Spliced(new_head, f)  # type: ignore[return-value]
        return _Spliced(new_head + data[end:], f)  # type: ignore[return-value]

    async def prepare(self, request: DeliveryRequest) -> DeliveryRequest:
        """The request to deliver: its content is read through :meth:`open_filtered`."""
        return replace(request, open_content=lambda: self.open_filtered(request))


def attach_header_firewalls(config: Any, connectors: dict[str, Any]) -> None:
    """Give every SMTP connector without ``send_organization_headers`` a firewall.

    LMTP and Maildir connectors deliver to mailboxes, where Exchange keeps the headers too."""
    for sc in config.send:
        connector = connectors.get(sc.name)
        if sc.kind != "smtp" or connector is None or not hasattr(connector, "header_firewall"):
            continue
        if not getattr(sc, "send_organization_headers", False):
            connector.header_firewall = OutboundHeaderFirewall(sc.name)
