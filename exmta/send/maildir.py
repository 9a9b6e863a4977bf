"""MaildirConnector: local delivery into ``<root>/<domain>/<local-part>/`` Maildirs.

Each recipient gets its own copy: ``Return-Path`` and ``Delivered-To`` are
prepended, the file is written into ``tmp/`` under a unique name
(``<sec>.M<usec>P<pid>Q<n>R<random>.<host>``, the Maildir spec's recipe), fsynced,
renamed into ``new/`` and the ``new/`` directory is fsynced, so a 250 from here
means the mail is on stable storage. ``tmp/``, ``new/`` and ``cur/`` are
created as needed (and their parents fsynced when created). Content is
copied as stored (CRLF line endings, which Dovecot and Courier accept).

Local parts and domains become directory names, so anything that could
escape the root (``/``, ``\\``, ``..``, NUL and other control characters, a
leading dot, empty or over-long names) is refused with ``550 5.1.3``. A
failing disk (ENOSPC, EIO, ...) defers with ``451 4.3.0``.
"""
from __future__ import annotations

import itertools
import os
import socket
import time
from typing import Any, BinaryIO, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from exmta.interfaces import ISendConnector
from exmta.model import Address, DeliveryRequest, Outcome, RecipientResult, Reply

__all__ = ["MaildirConnector", "UnsafeMailbox", "mailbox_path"]

_COPY_CHUNK = 256 * 1024
_NAME_MAX = 255


class UnsafeMailbox(ValueError):
    """A recipient whose local part or domain cannot safely be a directory name."""


def _safe_component(value: str, what: str) -> str:
    if not value:
        raise UnsafeMailbox(f"empty {what}")
    if value.startswith("."):
        raise UnsafeMailbox(f"{what} starts with a dot")
    if ".." in value:
        raise UnsafeMailbox(f"{what} contains '..'")
    for ch in value:
        if ch in "/\\" or ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise UnsafeMailbox(f"{what} contains {ch!r}")
    if len(value.encode("utf-8", "surrogateescape")) > _NAME_MAX:
        raise UnsafeMailbox(f"{what} is too long")
    return value


def mailbox_path(root: str, recipient: str) -> str:
    """``<root>/<domain>/<local-part>`` for recipient, or UnsafeMailbox.

    The domain is compared in lower case (so it is stored in lower case); the
    local part is kept as given.
    """
    address = Address.parse_simple(recipient)
    if not address.domain:
        raise UnsafeMailbox("no domain")
    domain = _safe_component(address.domain_key, "domain")
    local = _safe_component(address.local, "local part")
    base = os.path.abspath(root)
    path = os.path.join(base, domain, local)
    if os.path.dirname(os.path.dirname(path)) != base:  # defence in depth
        raise UnsafeMailbox("path leaves the root")
    return path


def _header_value(text: str) -> str:
    return text.replace("\r", "").replace("\n", "")


@implementer(ISendConnector)
class MaildirConnector:
    """ISendConnector delivering to Maildirs under ``root``.

    With a ``threadpool`` (and its ``reactor``) the file work runs there, one
    job per request; without one it runs inline (tests, tools). ``fsync`` is
    injectable so tests can record or fail it.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        root: str,
        clock: IReactorTime | None = None,
        threadpool: Any = None,
        reactor: Any = None,
        *,
        hostname: str | None = None,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        if threadpool is not None and reactor is None:
            raise ValueError("a threadpool needs the reactor that runs it")
        self.name = name
        self.root = os.path.abspath(root)
        self._clock = clock
        self._pool = threadpool
        self._reactor = reactor
        self._fsync = fsync
        host = hostname or socket.gethostname()
        self._host = host.replace("/", "\\057").replace(":", "\\072")
        self._counter = itertools.count(1)

    def deliver(self, request: DeliveryRequest) -> Deferred[list[RecipientResult]]:
        now = self._clock.seconds() if self._clock is not None else time.time()
        if self._pool is not None:
            return deferToThreadPool(self._reactor, self._pool, self._deliver_all, request, now)
        try:
            return succeed(self._deliver_all(request, now))
        except Exception:
            return fail()

    # ------------------------------------------------------------ file work (thread pool)

    def _deliver_all(self, request: DeliveryRequest, now: float) -> list[RecipientResult]:
        sender = _header_value(request.envelope.sender)
        results = []
        for rcpt in request.recipients:
            results.append(self._deliver_one(request, rcpt.address, sender, now))
        return results

    def _deliver_one(self, request: DeliveryRequest, rcpt: str, sender: str, now: float) -> RecipientResult:
        try:
            mailbox = mailbox_path(self.root, rcpt)
        except UnsafeMailbox as e:
            self.log.warn(
                "Refusing unsafe Maildir recipient {recipient!r}: {reason}",
                recipient=rcpt, reason=str(e), queue_id=request.queue_id, connector=self.name,
            )
            return RecipientResult(
                rcpt, Outcome.FAILED, Reply.make(550, "5.1.3", f"Bad destination mailbox address: {e}")
            )
        try:
            name = self._write(mailbox, rcpt, sender, request.open_content, now)
        except OSError as e:
            self.log.error(
                "Maildir delivery to {mailbox} failed: {error}",
                mailbox=mailbox, error=str(e), queue_id=request.queue_id, connector=self.name,
            )
            return RecipientResult(
                rcpt, Outcome.DEFERRED, Reply.make(451, "4.3.0", f"Mailbox write failed: {e.strerror or e}")
            )
        return RecipientResult(rcpt, Outcome.DELIVERED, Reply.make(250, "2.0.0", f"Delivered to Maildir as {name}"))

    def _ensure_dirs(self, mailbox: str) -> None:
        """Create mailbox/{tmp,new,cur} and fsync each parent whose entries changed."""
        changed: set[str] = set()
        if not os.path.isdir(self.root):
            os.makedirs(self.root, 0o700, exist_ok=True)  # the first delivery ever
            changed.add(os.path.dirname(self.root))
        for path in (os.path.dirname(mailbox), mailbox):
            if not os.path.isdir(path):
                try:
                    os.mkdir(path, 0o700)
                except FileExistsError:
                    pass
                changed.add(os.path.dirname(path))
        for sub in ("tmp", "new", "cur"):
            path = os.path.join(mailbox, sub)
            if not os.path.isdir(path):
                try:
                    os.mkdir(path, 0o700)
                except FileExistsError:
                    pass
                changed.add(mailbox)
        for path in sorted(changed):
            self._fsync_dir(path)

    def _fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    def _unique(self, now: float) -> str:
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        return f"{sec}.M{usec}P{os.getpid()}Q{next(self._counter)}R{os.urandom(4).hex()}.{self._host}"

    def _write(self, mailbox: str, rcpt: str, sender: str, open_content: Callable[[], BinaryIO], now: float) -> str:
        self._ensure_dirs(mailbox)
        name = self._unique(now)
        tmp = os.path.join(mailbox, "tmp", name)
        head = f"Return-Path: <{sender}>\r\nDelivered-To: {_header_value(rcpt)}\r\n".encode("utf-8", "surrogateescape")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as out:
                out.write(head)
                content = open_content()
                try:
                    while chunk := content.read(_COPY_CHUNK):
                        out.write(chunk)
                finally:
                    content.close()
            self._fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(tmp, os.path.join(mailbox, "new", name))
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        self._fsync_dir(os.path.join(mailbox, "new"))
        return name
