"""An Exchange-style Pickup directory: drop ``*.eml`` files in, they are queued.

Every ``interval`` seconds the service takes up to ``max_per_scan`` files
named ``*.eml`` (oldest name first), derives the envelope from the headers,
submits the message to the store durably and only then deletes the file
(at-least-once: a crash between the two submits the file again).
Applications should write a file under another name and rename it to
``.eml`` when complete, as with Exchange.

Envelope rules (as Exchange's Pickup directory):

* sender: ``X-Sender`` if present, else the first ``From`` address, else ``Sender``;
* recipients: every ``X-Receiver`` if any is present, else all addresses in
  ``To``, ``Cc`` and ``Bcc``;
* ``X-Sender``, ``X-Receiver`` and ``Bcc`` are removed, and so are the
  ``X-MS-Exchange-Organization-*``, ``-Forest-*`` and ``-CrossPremises-*``
  headers (Pickup mail is never trusted with them);
* ``Message-ID`` and ``Date`` are added when missing; line endings become CRLF.

A file that cannot be parsed, has no sender or no recipients, or is larger
than ``max_size`` is renamed to ``<name>.bad`` with a log line saying why.

Whoever can write the directory is fully trusted: they submit mail as any
sender to any recipient, as a local ``sendmail`` would. What the directory
must not do is let them (or a mistake) stall or read through the server, so
each file is opened with ``O_NOFOLLOW | O_NONBLOCK`` (a symbolic link, say to
``admin.token`` or ``/dev/zero``, is refused; a FIFO cannot block the open),
must be a regular file with one link by ``fstat``, and is read up to
``max_size + 1`` octets; listing, reading, parsing and deleting run through
``run_blocking`` (the server's thread pool), never on the reactor thread.
File names are logged with ``repr``: a name can hold terminal escapes.
"""
from __future__ import annotations

import email.utils
import errno
import os
import re
import stat
import uuid
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from exmta.model import Body, Envelope, MailParams, Recipient, TrackingEvent, TrackingEventId

__all__ = ["PickupDirectory", "PickupError", "parse_pickup", "read_pickup_file"]

_FIELD_NAME = re.compile(rb"^[!-9;-~]+$")
_STRIPPED_PREFIXES = (b"x-ms-exchange-organization-", b"x-ms-exchange-forest-", b"x-ms-exchange-crosspremises-")
_ENVELOPE_FIELDS = (b"x-sender", b"x-receiver", b"bcc")
_ANGLE = re.compile(r"<([^<>]*)>")


class PickupError(ValueError):
    """The file cannot become a message (the reason is the message)."""


def _address(value: str) -> str | None:
    """The mailbox of an X-Sender/X-Receiver value: ``<a@b>`` (parameters may follow) or ``a@b``."""
    m = _ANGLE.search(value)
    addr = m.group(1).strip() if m else email.utils.parseaddr(value)[1]
    return addr if _plausible(addr) else None


def _plausible(addr: str) -> bool:
    local, sep, domain = addr.rpartition("@")
    return bool(sep and local and domain) and not any(c.isspace() or c in "<>,;" for c in addr)


def _split_fields(block: bytes) -> list[tuple[bytes, bytes]]:
    """Header block (CRLF lines) -> [(lower-case name, raw field bytes including its CRLFs)]."""
    fields: list[tuple[bytes, bytes]] = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise PickupError("the header starts with a continuation line")
            name, raw = fields[-1]
            fields[-1] = (name, raw + line + b"\r\n")
            continue
        name, colon, _ = line.partition(b":")
        if not colon or not _FIELD_NAME.match(name):
            raise PickupError(f"malformed header line {line[:60]!r}")
        fields.append((name.lower(), line + b"\r\n"))
    return fields


def _value(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return re.sub(r"\r\n(?=[ \t])", "", text.partition(":")[2]).strip()


def parse_pickup(data: bytes, hostname: str, now: float) -> tuple[bytes, Envelope]:
    """Turn a pickup file into (content, envelope); PickupError when it cannot be queued."""
    data = re.sub(rb"\r?\n", b"\r\n", data)
    if data.startswith(b"\r\n"):
        raise PickupError("the file has no header")
    head, sep, body = data.partition(b"\r\n\r\n")
    fields = _split_fields(head)

    def values(name: bytes) -> list[str]:
        return [_value(raw) for n, raw in fields if n == name]

    x_sender = [a for a in map(_address, values(b"x-sender")) if a]
    x_receivers = [a for a in map(_address, values(b"x-receiver")) if a]
    if x_sender:
        sender = x_sender[0]
    else:
        candidates = [a for _, a in email.utils.getaddresses(values(b"from") + values(b"sender")) if _plausible(a)]
        if not candidates:
            raise PickupError("no sender: neither X-Sender nor a From/Sender address")
        sender = candidates[0]
    if x_receivers:
        found = x_receivers
    else:
        listed = values(b"to") + values(b"cc") + values(b"bcc")
        found = [a for _, a in email.utils.getaddresses(listed) if _plausible(a)]
    recipients: list[str] = []
    seen: set[str] = set()
    for addr in found:
        if addr.lower() not in seen:
            seen.add(addr.lower())
            recipients.append(addr)
    if not recipients:
        raise PickupError("no recipients in X-Receiver, To, Cc or Bcc")

    kept = [
        raw for name, raw in fields
        if name not in _ENVELOPE_FIELDS and not name.startswith(_STRIPPED_PREFIXES)
    ]
    message_ids = values(b"message-id")
    message_id = message_ids[0] if message_ids else f"<{uuid.uuid4().hex}@{hostname}>"
    if not message_ids:
        kept.append(f"Message-ID: {message_id}\r\n".encode())
    if not values(b"date"):
        kept.append(f"Date: {email.utils.formatdate(now, usegmt=True)}\r\n".encode())
    content = b"".join(kept) + b"\r\n" + body
    eight_bit = any(b >= 0x80 for b in content)
    utf8_addresses = not all(a.isascii() for a in [sender, *recipients])
    params = MailParams(
        size=len(content), body=Body.EIGHT_BIT if eight_bit else Body.SEVEN_BIT, smtputf8=utf8_addresses
    )
    envelope = Envelope(
        sender=sender,
        recipients=[Recipient(a) for a in recipients],
        params=params,
        received_at=now,
        connector="pickup",
        message_id=message_id,
        size=len(content),
    )
    return content, envelope


def read_pickup_file(path: str, max_size: int) -> bytes:
    """The bytes of ``path``, blocking; PickupError for a link, a special file or more than ``max_size``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PickupError("a symbolic link (pickup files must be regular files)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PickupError("not a regular file (FIFO, device, socket or directory)")
        if st.st_nlink != 1:
            raise PickupError(f"has {st.st_nlink} hard links (pickup files must have one)")
        if st.st_size > max_size:
            raise PickupError(f"larger than {max_size} octets")
        chunks: list[bytes] = []
        total = 0
        while total <= max_size:
            chunk = os.read(fd, min(1 << 20, max_size + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_size:
            raise PickupError(f"larger than {max_size} octets")
        return b"".join(chunks)
    finally:
        os.close(fd)


class PickupDirectory(Service):
    """Polls ``path`` every ``interval`` seconds on ``clock`` and submits ``*.eml`` files to ``store``."""

    log = Logger()

    def __init__(
        self,
        path: str,
        store: Any,
        clock: IReactorTime,
        interval: float,
        tracker: Any = None,
        hostname: str = "localhost",
        *,
        max_per_scan: int = 100,
        max_size: int = 36 * 1024 * 1024,
        run_blocking: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        self.path = path
        self.store = store
        self.clock = clock
        self.interval = interval
        self.tracker = tracker
        self.hostname = hostname
        self.max_per_scan = max_per_scan
        self.max_size = max_size
        #: runs a blocking call (file I/O, parsing) off the reactor: the server passes its thread pool
        self.run_blocking = run_blocking or (lambda f, *a: maybeDeferred(f, *a))
        self._loop: LoopingCall | None = None
        self._scanning: Deferred[int] | None = None
        self.submitted = 0
        self.bad = 0
        #: exmta.rules.hook.TransportRules run on each picked-up message, or None
        self.transport_rules: Any = None

    def startService(self) -> None:
        super().startService()
        os.makedirs(self.path, exist_ok=True)
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("Pickup loop for {path} stopped", f, path=self.path)
        )

    def stopService(self) -> Deferred[Any]:
        """Stop polling; fires once a scan in progress has finished."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._scanning is None:
            return succeed(None)
        waiter: Deferred[Any] = Deferred()
        self._scanning.addBoth(lambda r: (waiter.callback(None), r)[1])
        return waiter

    def _tick(self) -> Deferred[int]:
        d = self.scan()
        self._scanning = d

        def done(result: object) -> object:
            if self._scanning is d:
                self._scanning = None
            return result

        return d.addBoth(done).addErrback(
            lambda f: self.log.failure("Pickup scan of {path} failed", f, path=self.path) or 0
        )

    def scan(self) -> Deferred[int]:
        """Process up to max_per_scan files now; fires with the number submitted."""
        return Deferred.fromCoroutine(self._scan())

    async def _scan(self) -> int:
        try:
            names = sorted(n for n in await self.run_blocking(os.listdir, self.path) if n.lower().endswith(".eml"))
        except OSError as e:
            self.log.error("Cannot list the pickup directory {path}: {error}", path=self.path, error=str(e))
            return 0
        count = 0
        for name in names[: self.max_per_scan]:
            outcome = await self._one(name)
            if outcome is None:  # the store failed: try again at the next scan
                break
            count += outcome
        return count

    def _read(self, full: str, now: float) -> tuple[bytes, Envelope]:
        return parse_pickup(read_pickup_file(full, self.max_size), self.hostname, now)

    async def _one(self, name: str) -> int | None:
        full = os.path.join(self.path, name)
        try:
            content, envelope = await self.run_blocking(self._read, full, self.clock.seconds())
        except FileNotFoundError:
            return 0
        except PickupError as e:
            await self._set_aside(full, name, str(e))
            return 0
        except OSError as e:
            self.log.error("Cannot read pickup file {file!r}: {error}", file=full, error=str(e))
            return 0
        try:
            if self.transport_rules is not None:  # exmta.rules.hook: None when a rule deleted or refused it
                queue_id = await self.transport_rules.submit(content, envelope, "PICKUP")
            else:
                queue_id = await self.store.submit(content, envelope)
        except Exception:
            self.log.failure("Cannot queue pickup file {file!r}; will retry", file=full)
            return None
        try:
            await self.run_blocking(os.unlink, full)
        except FileNotFoundError:
            pass
        if queue_id is None:
            self.log.info("Pickup file {file} deleted or refused by a transport rule", file=name)
            return 0
        self.submitted += 1
        self.log.info(
            "Picked up {file!r} as {queue_id} from {sender} to {count} recipients",
            file=name, queue_id=queue_id, sender=envelope.sender, count=len(envelope.recipients),
            connector="pickup",
        )
        if self.tracker is not None:
            self.tracker.track(TrackingEvent(
                TrackingEventId.SUBMIT, queue_id, self.clock.seconds(),
                sender=envelope.sender,
                recipients=tuple(r.address for r in envelope.recipients),
                message_id=envelope.message_id, size=envelope.size,
                connector="pickup", source="PICKUP", details={"file": name},
            ))
        return 1

    @staticmethod
    def _rename_aside(full: str, name: str) -> str:
        """Rename ``full`` to a free ``<stem>.bad`` name (blocking); returns it."""
        stem = name[: -len(".eml")]
        target = os.path.join(os.path.dirname(full), stem + ".bad")
        n = 1
        while os.path.lexists(target):
            target = os.path.join(os.path.dirname(full), f"{stem}.{n}.bad")
            n += 1
        os.rename(full, target)
        return target

    async def _set_aside(self, full: str, name: str, reason: str) -> None:
        try:
            target = await self.run_blocking(self._rename_aside, full, name)
        except OSError as e:
            self.log.error("Cannot rename bad pickup file {file!r}: {error}", file=full, error=str(e))
            return
        self.bad += 1
        self.log.warn(
            "Bad pickup file {file!r} renamed to {target!r}: {reason}", file=full, target=target, reason=reason
        )
