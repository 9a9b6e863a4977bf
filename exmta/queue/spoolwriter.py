"""The spool's message writer (:mod:`exmta.queue.spool`): content streams into ``tmp/`` until commit."""
from __future__ import annotations

import io
import os
import shutil
import threading
from typing import TYPE_CHECKING, BinaryIO

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from exmta.filemodes import private_opener
from exmta.interfaces import IMessageWriter
from exmta.queue.spoolfiles import _close_quiet, _unlink_quiet

if TYPE_CHECKING:
    from exmta.queue.spool import SpoolStore

__all__ = ["SpoolWriter"]

_COPY_CHUNK = 256 * 1024
_MAX_PENDING = 1024 * 1024    # octets a writer buffers while its file is being created
_CREATE_TIMEOUT = 30.0        # seconds to wait for that file when it is needed at once
_HEAD_KEEP = 64 * 1024        # octets of the start of a message a writer keeps in memory (see head)


@implementer(IMessageWriter)
class SpoolWriter:
    """A message being received: content streams into ``tmp/<id>.msg``.

    Creating a file costs an inode allocation (0.4-1.5 ms of kernel time on
    the benchmark VM), so the file is created by a thread pool job started in
    open_writer(); until it exists, writes, open_read() and replace_headers()
    work on an in-memory buffer (at most ``_MAX_PENDING`` octets; beyond that
    write() waits for the file).
    Writes are then buffered file writes on the caller's thread (page cache
    only); the fsync happens at commit, in the thread pool. After commit()
    has been called, abort() does nothing (a failed commit cleans up by itself).
    """

    def __init__(self, store: SpoolStore, queue_id: str, path: str) -> None:
        self.queue_id = queue_id
        self.size = 0
        self._store = store
        self._path = path
        self._generation = 0
        self._state = "open"  # open | committing | committed | aborted
        self._file: BinaryIO | None = None     # the content file, once adopted
        self._pending = bytearray()           # writes made before the file existed
        self._opened: BinaryIO | None = None   # set by the creation job
        self._open_error: BaseException | None = None
        self._ready = threading.Event()
        self._head = bytearray()              # the first _HEAD_KEEP octets, for head
        if store.inline_create:
            self._create()
            self._created: Deferred[None] = succeed(None)
        else:
            self._created = store._in_pool(self._create)

    def _create(self) -> None:
        """Create the content file (in the thread pool, or at once with inline_create)."""
        try:
            self._opened = open(self._path, "xb", opener=private_opener)  # 0600: mail content
        except BaseException as e:
            self._open_error = e
        finally:
            self._ready.set()

    def _adopt(self, wait: bool) -> BinaryIO | None:
        """The content file with every pending write in it; None if not created yet and not wait."""
        if self._file is None:
            if not self._ready.is_set():
                if not wait:
                    return None
                if not self._ready.wait(_CREATE_TIMEOUT):
                    raise OSError(f"spool file {self._path} was not created within {_CREATE_TIMEOUT} s")
            if self._open_error is not None:
                raise OSError(f"cannot create spool file {self._path}: {self._open_error}") from self._open_error
            assert self._opened is not None
            self._file, self._opened = self._opened, None
            if self._pending:
                self._file.write(self._pending)
                self._pending = bytearray()
        return self._file

    def _require_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"writer {self.queue_id} is {self._state}")

    @property
    def head(self) -> bytes:
        """A prefix of the content (the first 64 KiB, or less after a header rewrite), from
        memory: end of data reads the header block here, not from the file on the reactor thread."""
        return bytes(self._head)

    def write(self, data: bytes) -> None:
        self._require_open()
        if len(self._head) == self.size < _HEAD_KEEP:  # the head still holds everything written
            self._head += data[:_HEAD_KEEP - self.size]
        f = self._adopt(wait=len(self._pending) + len(data) > _MAX_PENDING)
        if f is None:
            self._pending += data
        else:
            f.write(data)
        self.size += len(data)

    def open_read(self) -> BinaryIO:
        if self._state == "committed":
            return self._store.open_content(self.queue_id)
        self._require_open()
        f = self._adopt(wait=False)
        if f is None:  # everything so far is still in memory
            return io.BytesIO(bytes(self._pending))
        f.flush()
        return open(self._path, "rb")

    def replace_headers(self, old_length: int, new_header_block: bytes) -> None:
        """Rewrite into a new temp file: new_header_block, then the content after old_length."""
        self._require_open()
        if not 0 <= old_length <= self.size:
            raise ValueError(f"old_length {old_length} outside 0..{self.size}")
        if old_length <= len(self._head):
            self._head[:old_length] = new_header_block
            del self._head[_HEAD_KEEP:]
        else:
            self._head = bytearray(new_header_block[:_HEAD_KEEP])
        f = self._adopt(wait=False)
        if f is None:  # everything so far is still in memory
            self._pending[:old_length] = new_header_block
            self.size = len(self._pending)
            return
        f.flush()
        self._generation += 1
        new_path = os.path.join(self._store._dirs["tmp"], f"{self.queue_id}.{self._generation}.msg")
        new = open(new_path, "xb", opener=private_opener)
        try:
            new.write(new_header_block)
            with open(self._path, "rb") as src:
                src.seek(old_length)
                shutil.copyfileobj(src, new, _COPY_CHUNK)
        except BaseException:
            _close_quiet(new)
            _unlink_quiet(new_path)
            raise
        f.close()
        _unlink_quiet(self._path)
        self._file, self._path = new, new_path
        self.size = self.size - old_length + len(new_header_block)

    def _content_file(self) -> BinaryIO:
        """Thread pool, at commit: the content file, waiting for its creation if need be."""
        f = self._adopt(wait=True)
        assert f is not None
        return f

    def abort(self) -> None:
        """Throw the partial content away; harmless when repeated or after commit."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._pending = bytearray()
        if self._ready.is_set():
            self._discard()
        else:
            self._created.addCallback(lambda _: self._discard())

    def _discard(self) -> None:
        """Close and unlink the content file. close() raises when its buffer cannot be flushed
        (ENOSPC): the file is unlinked all the same, else a full disk keeps it (issue 10 item 8)."""
        files, self._file, self._opened = (self._file, self._opened), None, None
        try:
            for f in files:
                if f is not None:
                    _close_quiet(f)
        finally:
            if self._open_error is None:
                _unlink_quiet(self._path)
