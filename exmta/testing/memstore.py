"""An in-memory :class:`~exmta.interfaces.IQueueStore` for tests and plugins.

``MemoryStore`` keeps every message in dictionaries, so the scheduler,
the SMTP server and third-party code can be tested without a disk and
without the global reactor. It follows the IQueueStore contract of the
real spool: a message is in exactly one of the queues ``incoming``,
``active``, ``deferred`` or ``hold``; ``claim`` leases due messages by
moving them to ``active``; ``update`` puts them back to ``deferred`` or
removes them; ``recover`` returns leased messages to ``incoming``.

Envelopes cross the store boundary as JSON round trips (as they do on
disk), so a caller that mutates an envelope after handing it over, or a
claimed copy before calling ``update``, does not change what is stored.

Differences from a durable store, on purpose: nothing survives the
process, and ``commit`` fires synchronously.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from exmta.interfaces import IMessageWriter, IQueueAdmin, IQueueStore
from exmta.model import Envelope, QueueEntry, new_queue_id

QUEUES = ("incoming", "active", "deferred", "hold")

_log = Logger(namespace="exmta.testing.memstore")


def _copy(envelope: Envelope) -> Envelope:
    """A deep copy made the way a real store would: through JSON."""
    return Envelope.from_json(envelope.to_json())


@implementer(IMessageWriter)
class MemoryWriter:
    """A message being received into a :class:`MemoryStore`."""

    def __init__(self, store: MemoryStore, queue_id: str) -> None:
        self.queue_id = queue_id
        self._store = store
        self._buffer = bytearray()
        self.aborted = False
        self.committed = False

    @property
    def size(self) -> int:
        return len(self._buffer)

    def write(self, data: bytes) -> None:
        if self.aborted or self.committed:
            raise ValueError(f"writer {self.queue_id} is closed")
        self._buffer += data

    def open_read(self) -> BinaryIO:
        return io.BytesIO(bytes(self._buffer))

    def replace_headers(self, old_length: int, new_header_block: bytes) -> None:
        if self.aborted or self.committed:
            raise ValueError(f"writer {self.queue_id} is closed")
        if not 0 <= old_length <= len(self._buffer):
            raise ValueError(f"old_length {old_length} outside 0..{len(self._buffer)}")
        self._buffer[:old_length] = new_header_block

    def abort(self) -> None:
        """Drop the partial message; harmless after commit or a second abort."""
        if not self.committed:
            self.aborted = True
            self._buffer = bytearray()

    def getvalue(self) -> bytes:
        return bytes(self._buffer)


@dataclass
class _Stored:
    envelope: Envelope
    content: bytes
    queue: str
    due: float
    seq: int


@implementer(IQueueStore, IQueueAdmin)
class MemoryStore:
    """IQueueStore in memory; see the module docstring.

    Extra inspection helpers for tests: :meth:`queue_of`, :meth:`envelope`,
    :meth:`content`, :meth:`queue_ids` and :attr:`claims` (one entry per
    ``claim`` call: ``(now, limit, returned ids)``).
    """

    def __init__(self, clock: IReactorTime, *, count_crashes: bool = False) -> None:
        self._clock = clock
        self._count_crashes = count_crashes
        self._messages: dict[str, _Stored] = {}
        self._listeners: list[Callable[[str], Any]] = []
        self._seq = 0
        self._prefer_deferred = False
        self.claims: list[tuple[float, int, list[str]]] = []

    # ------------------------------------------------------------ receiving

    def open_writer(self) -> MemoryWriter:
        return MemoryWriter(self, self._new_id())

    def commit(self, writer: MemoryWriter, envelope: Envelope) -> defer.Deferred[str]:
        if writer.aborted:
            return defer.fail(ValueError(f"writer {writer.queue_id} was aborted"))
        if writer.committed:
            return defer.fail(ValueError(f"writer {writer.queue_id} already committed"))
        writer.committed = True
        return defer.succeed(self._add(writer.queue_id, writer.getvalue(), envelope))

    def submit(self, content: bytes, envelope: Envelope) -> defer.Deferred[str]:
        return defer.succeed(self._add(self._new_id(), bytes(content), envelope))

    def add_listener(self, callback: Callable[[str], Any]) -> None:
        self._listeners.append(callback)

    def _new_id(self) -> str:
        while True:
            qid = new_queue_id(self._clock.seconds())
            if qid not in self._messages:
                return qid

    def _add(self, queue_id: str, content: bytes, envelope: Envelope) -> str:
        env = _copy(envelope)
        env.queue_id = queue_id
        env.size = env.size or len(content)
        now = self._clock.seconds()
        if not env.received_at:
            env.received_at = now
        self._seq += 1
        queue = "hold" if env.held_reason else "incoming"  # a filter's quarantine
        self._messages[queue_id] = _Stored(env, content, queue, now, self._seq)
        if queue == "incoming":
            self._notify(queue_id)
        return queue_id

    def _notify(self, queue_id: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(queue_id)
            except Exception:
                _log.failure("queue listener failed for {queue_id}", queue_id=queue_id)

    # ------------------------------------------------------------ scheduling

    def claim(self, now: float, limit: int) -> defer.Deferred[list[QueueEntry]]:
        """Lease up to ``limit`` due messages, alternating new and deferred mail."""
        new = sorted((s for s in self._messages.values() if s.queue == "incoming"), key=lambda s: s.seq)
        old = sorted(
            (s for s in self._messages.values() if s.queue == "deferred" and s.due <= now),
            key=lambda s: (s.due, s.seq),
        )
        picked: list[_Stored] = []
        while len(picked) < max(0, limit) and (new or old):
            first, second = (old, new) if self._prefer_deferred else (new, old)
            source = first if first else second
            picked.append(source.pop(0))
            if first and second:
                self._prefer_deferred = not self._prefer_deferred
        entries = []
        for s in picked:
            s.queue = "active"
            entries.append(QueueEntry(s.envelope.queue_id, _copy(s.envelope)))
        self.claims.append((now, limit, [e.queue_id for e in entries]))
        return defer.succeed(entries)

    def next_due(self) -> float | None:
        dues = [s.due for s in self._messages.values() if s.queue == "deferred"]
        return min(dues) if dues else None

    def open_content(self, queue_id: str) -> BinaryIO:
        return io.BytesIO(self._get(queue_id).content)

    def update(self, queue_id: str, envelope: Envelope, next_attempt: float | None) -> defer.Deferred[None]:
        try:
            stored = self._get(queue_id)
        except KeyError as e:
            return defer.fail(e)
        if stored.queue != "active":
            return defer.fail(ValueError(f"{queue_id} is {stored.queue}, not active"))
        if next_attempt is None:
            del self._messages[queue_id]
        else:
            stored.envelope = _copy(envelope)
            stored.envelope.queue_id = queue_id
            stored.queue = "deferred"
            stored.due = float(next_attempt)
        return defer.succeed(None)

    def hold(self, queue_id: str, envelope: Envelope | None, reason: str) -> defer.Deferred[None]:
        """Move a message from any queue to hold; envelope None keeps the stored one (operator hold)."""
        try:
            stored = self._get(queue_id)
        except KeyError as e:
            return defer.fail(e)
        stored.envelope = _copy(envelope if envelope is not None else stored.envelope)
        stored.envelope.queue_id = queue_id
        stored.envelope.held_reason = reason
        stored.queue = "hold"
        return defer.succeed(None)

    def release(self, queue_id: str) -> defer.Deferred[None]:
        """Held -> incoming, due now; the crash count restarts so it gets a full set of tries."""
        try:
            stored = self._get(queue_id)
        except KeyError as e:
            return defer.fail(e)
        if stored.queue != "hold":
            return defer.fail(ValueError(f"{queue_id} is {stored.queue}, not held"))
        stored.envelope.held_reason = None
        stored.envelope.crashes = 0
        stored.queue = "incoming"
        stored.due = self._clock.seconds()
        self._notify(queue_id)
        return defer.succeed(None)

    def recover(self) -> defer.Deferred[int]:
        """Leased messages back to incoming; with count_crashes each one's crash count goes up."""
        count = 0
        for stored in self._messages.values():
            if stored.queue == "active":
                stored.queue = "incoming"
                if self._count_crashes:
                    stored.envelope.crashes += 1
                count += 1
        return defer.succeed(count)

    def list_messages(self, queue: str) -> defer.Deferred[list[Envelope]]:
        if queue not in QUEUES:
            return defer.fail(ValueError(f"unknown queue {queue!r}"))
        found = sorted((s for s in self._messages.values() if s.queue == queue), key=lambda s: s.seq)
        return defer.succeed([_copy(s.envelope) for s in found])

    # ------------------------------------------------------------ operator actions (IQueueAdmin)

    def read(self, queue_id: str) -> defer.Deferred[tuple[str, Envelope]]:
        stored = self._messages.get(queue_id)
        if stored is None:
            return defer.fail(KeyError(queue_id))
        return defer.succeed((stored.queue, _copy(stored.envelope)))

    def remove(self, queue_id: str) -> defer.Deferred[Envelope]:
        stored = self._messages.get(queue_id)
        if stored is None:
            return defer.fail(KeyError(queue_id))
        if stored.queue == "active":
            return defer.fail(ValueError(f"{queue_id} is being delivered right now; try again in a moment"))
        del self._messages[queue_id]
        return defer.succeed(_copy(stored.envelope))

    def reschedule(self, queue_id: str, when: float) -> defer.Deferred[bool]:
        stored = self._messages.get(queue_id)
        if stored is None:
            return defer.fail(KeyError(queue_id))
        if stored.queue != "deferred":
            return defer.succeed(False)
        for r in stored.envelope.pending():
            if r.next_attempt is None or r.next_attempt > when:
                r.next_attempt = when
        stored.due = min(stored.due, when)
        self._notify(queue_id)
        return defer.succeed(True)

    def release_now(self, queue_id: str, when: float) -> defer.Deferred[None]:
        stored = self._messages.get(queue_id)
        if stored is not None and stored.queue == "hold":
            for r in stored.envelope.pending():
                r.next_attempt = when
        return self.release(queue_id)

    # ------------------------------------------------------------ inspection (tests)

    def _get(self, queue_id: str) -> _Stored:
        try:
            return self._messages[queue_id]
        except KeyError:
            raise KeyError(f"no message {queue_id}") from None

    def queue_of(self, queue_id: str) -> str | None:
        """The queue a message is in, or None once it has been removed."""
        stored = self._messages.get(queue_id)
        return stored.queue if stored else None

    def envelope(self, queue_id: str) -> Envelope:
        """A copy of the stored envelope."""
        return _copy(self._get(queue_id).envelope)

    def content(self, queue_id: str) -> bytes:
        return self._get(queue_id).content

    def due(self, queue_id: str) -> float:
        return self._get(queue_id).due

    def queue_ids(self, queue: str | None = None) -> list[str]:
        """Queue ids in commit order, optionally only those in one queue."""
        found = sorted(self._messages.values(), key=lambda s: s.seq)
        return [s.envelope.queue_id for s in found if queue is None or s.queue == queue]


__all__ = ["MemoryStore", "MemoryWriter", "QUEUES"]
