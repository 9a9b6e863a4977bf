"""The embedded durable queue: one directory tree, JSON envelopes, fsync + rename.

Layout under ``root`` (every file is named by its queue id; ids are time-ordered)::

    tmp/       work in progress, never a message: writers' content
               (``<id>.msg``, ``<id>.<n>.msg`` after header edits) and envelope
               temp files (``<id>.<random>.json``). recover() empties it.
    msg/       committed content, ``<id>``. It never moves after commit and is
               removed together with the message.
    incoming/  ``<id>.json``: committed new mail, due now (first come, first served).
    active/    ``<id>.json``: claimed by the scheduler (delivery in progress).
    deferred/  ``<id>.json``: waiting for its retry time (``"spool": {"next_attempt": t}``
               inside the JSON).
    hold/      ``<id>.json``: held (poison message or operator); never claimed.
    corrupt/   envelopes that could not be read (``<id>.json``) and their content
               (``<id>.msg``), kept for an operator; never read again.

The envelope file *is* the message: a message exists exactly when its envelope
is in one of incoming/, active/, deferred/ or hold/, and the directory is its
state. Content is renamed into msg/ before the envelope is renamed into
incoming/, so whenever an envelope is visible its content is as well. A state
change is one atomic rename of the envelope. Rewriting an envelope writes a
temp file, fsyncs it, renames it over the current name (atomic replace) and
then renames it across directories, so an envelope is never in two places.

Commit (what the 250 waits for): fsync the content file, write and fsync the
envelope temp file, rename content into msg/, rename the envelope into
incoming/, then fsync msg/ and incoming/. The directory fsyncs go through
:class:`GroupSync`: one fsync of a directory serves every rename done before it
started, so with N concurrent commits a message costs two file fsyncs plus
about 2/N directory fsyncs. Claims are plain renames without fsync (a lost
claim leaves the message due, which recover() would do anyway); updates,
holds, releases and removals fsync the directories they touched (grouped).

Durability comes either from fsync (``sync="fsync"``, the default: each file,
then each directory touched) or from Linux's syncfs (``sync="syncfs"``): a
group-commit round writes every waiting message's files, calls syncfs once,
renames them all into place, and calls syncfs again, so a round of k messages
costs two journal commits instead of 2k + 2 (measured on the benchmark VM:
0.33 ms against 1.06 ms blocked for k = 2, 0.40 against 1.76 for k = 4). The
catch: syncfs flushes everything dirty on that filesystem, so a spool that
shares its filesystem with a heavy writer should use fsync.

Blocking steps run either in a thread pool (``io="threads"``, the default) or
on the calling thread (``io="inline"``). Inline is what a receive worker
process uses (and a main process that has workers): it saves the thread
hand-offs (futex wake-ups, GIL switches and context switches were a quarter
of a worker's CPU, benchmarks/PERFORMANCE.rst); with ``sync="fsync"`` it
blocks on its own fsyncs, with ``sync="syncfs"`` only the two syncfs calls of
a round go to a thread. Inline directory fsyncs are still
grouped: a round starts at the end of the reactor iteration (``callLater(0)``
on the injected clock) and serves every rename made in that iteration.

Several processes may commit into one spool (receive workers) while a single
process claims (the scheduler's). Workers construct their store with
``claims=False``; the main process learns of their messages through
:meth:`SpoolStore.notice` and :meth:`SpoolStore.scan_incoming`. recover() deletes
every temp file and every content file that no envelope references: the
listeners of this process accept no session before recovery has run
(:mod:`exmta.receive.gated`), and the receive workers of an earlier process
are waited for through the writer lock (:mod:`exmta.queue.writerlock`; they
hold it shared, recovery takes it exclusively). Only when that lock cannot be
had within ``recover_wait`` seconds are files younger than the store object
(minus one second) left alone, as before. ``tmp_grace`` leaves files younger
than that many seconds alone in any case.

This module holds the store (commit, updates, holds and releases, reading);
its other jobs have modules of their own: group commit and syncfs
(:mod:`exmta.queue.groupsync`), the writer (:mod:`exmta.queue.spoolwriter`),
the on-disk vocabulary (:mod:`exmta.queue.spoolfiles`), and, as mixins of
:class:`SpoolStore`, the index of due mail and claims
(:mod:`exmta.queue.spoolindex`), the operator's actions
(:mod:`exmta.queue.spooladmin`) and recovery (:mod:`exmta.queue.spoolrecovery`).
"""
from __future__ import annotations

import functools
import os
import random
import time
from collections import OrderedDict
from typing import Any, BinaryIO, Callable, Iterable, TypeVar

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from exmta.coroutines import run_coroutine
from exmta.interfaces import IIncomingFeed, IQueueAdmin, IQueueStore
from exmta.model import Envelope, new_queue_id
from exmta.queue.groupsync import (
    DirectorySyncError,
    FsyncFn,
    GroupSync,
    TwoPhaseJob,
    fsync_directory,
    libc_syncfs,
)
from exmta.queue.spooladmin import SpoolAdmin
from exmta.queue.spoolfiles import (
    _DIRS,
    _QUEUE_ID,
    STATES,
    _check_id,
    _decode,
    _encode,
    _read_file,
    _unlink_quiet,
)
from exmta.queue.spoolindex import SpoolIndex
from exmta.queue.spoolrecovery import SpoolRecovery
from exmta.queue.spoolwriter import SpoolWriter
from exmta.queue.writerlock import WriterLock

__all__ = ["GroupSync", "SpoolStore", "SpoolWriter", "STATES", "fsync_directory"]

# the buffer of a content file object: below glibc's mmap threshold (128 KiB), else every message
# costs an mmap/munmap pair and, with the syncfs thread alive, TLB shootdowns (measured: +1 ms sys)
_FILE_BUFFER = 64 * 1024

T = TypeVar("T")


@implementer(IQueueStore, IQueueAdmin, IIncomingFeed)
class SpoolStore(SpoolIndex, SpoolAdmin, SpoolRecovery):
    """IQueueStore on a local directory tree (layout in the module docstring).

    ``threadpool`` runs every blocking step (fsync, renames in bulk, directory
    listings); ``fsync`` is injectable so tests can record it. ``claims=False``
    makes a commit-only store for receive worker processes (no in-memory
    index). ``tmp_grace`` (seconds): recover() leaves orphan temp and content
    files younger than this alone. ``count_crashes``: recover() adds one to
    ``Envelope.crashes`` of each message it finds in active/ (Exchange-style
    poison detection for a crash of the whole process). ``io``: "threads" or
    "inline" (module docstring). ``sync``: "fsync" (each file, then each
    directory) or "syncfs" (two syncfs calls per group-commit round, in the
    thread pool; ``syncfs`` is injectable for tests). A writer's file is
    created on the calling thread unless ``io="threads"`` with ``sync="fsync"``.
    ``writer_lock``: hold the spool's writer lock shared while this object
    lives (receive worker processes); ``recover_wait``: seconds recover() waits
    for such writers of an earlier run to exit (module docstring).
    """

    log = Logger()

    def __init__(
        self,
        root: str,
        reactor: Any,
        threadpool: Any,
        clock: IReactorTime | None = None,
        *,
        fsync: FsyncFn = os.fsync,
        claims: bool = True,
        tmp_grace: float = 0.0,
        count_crashes: bool = False,
        io: str = "threads",
        sync: str = "fsync",
        syncfs: Callable[[], None] | None = None,
        writer_lock: bool = False,
        recover_wait: float = 30.0,
    ) -> None:
        if io not in ("threads", "inline"):
            raise ValueError(f"io must be 'threads' or 'inline', not {io!r}")
        if sync not in ("fsync", "syncfs"):
            raise ValueError(f"sync must be 'fsync' or 'syncfs', not {sync!r}")
        self.root = os.path.abspath(root)
        self._reactor = reactor
        self._pool = threadpool
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._fsync = fsync
        self._claims = claims
        self._tmp_grace = tmp_grace
        self._created_at = time.time()  # recover() removes only temp and content files older than this
        self._count_crashes = count_crashes
        self.io = io
        #: create a writer's file on the calling thread (a few µs) rather than in the pool
        self.inline_create = io == "inline" or sync == "syncfs"
        self._dirs = {name: os.path.join(self.root, name) for name in _DIRS}
        created = not os.path.isdir(self.root)
        for path in self._dirs.values():
            if not os.path.isdir(path):
                os.makedirs(path, mode=0o700, exist_ok=True)
                created = True
        if created:
            fsync_directory(self.root, fsync)
            fsync_directory(os.path.dirname(self.root), fsync)
        self.sync = sync
        self._root_fd: int | None = None
        if sync == "syncfs" and syncfs is None:
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            syncfs = functools.partial(libc_syncfs, self._root_fd)
            try:
                syncfs()
            except OSError as e:
                self.log.warn("spool: syncfs unusable ({error}); using fsync per file", error=e)
                os.close(self._root_fd)
                self._root_fd, syncfs, self.sync = None, None, "fsync"
        self.syncer = GroupSync(self._in_pool, fsync, self._clock if io == "inline" else None,
                                syncfs if self.sync == "syncfs" else None, self._in_thread)
        self._new: OrderedDict[str, None] = OrderedDict()   # due new mail, FIFO
        self._retry: dict[str, float] = {}                 # deferred id -> next attempt
        self._heap: list[tuple[float, str]] = []           # (next attempt, id), lazily cleaned
        self._prefer_new = True
        self._listeners: list[Callable[[str], Any]] = []
        self._tails: dict[str, Deferred[None]] = {}       # per-id operation in flight
        self.last_recovery: dict[str, int] = {}
        self._recover_wait = recover_wait
        self._exclusive = False  # recover() holds the writer lock alone
        self._writer_lock: WriterLock | None = None
        if writer_lock:
            self._writer_lock = WriterLock(self.root)
            if not self._writer_lock.shared(recover_wait):
                self.log.warn("spool {root}: a recovery kept the writer lock; writing without it", root=self.root)

    # ------------------------------------------------------------ helpers

    def _in_thread(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """Always in the thread pool, whatever ``io`` says (the syncfs calls)."""
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def _in_pool(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run a blocking step: in the thread pool, or here and now with ``io="inline"``."""
        if self.io == "inline":
            try:
                return succeed(f(*args))
            except BaseException:
                return fail()
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def _env_path(self, state: str, queue_id: str) -> str:
        return os.path.join(self._dirs[state], queue_id + ".json")

    def _content_path(self, queue_id: str) -> str:
        return os.path.join(self._dirs["msg"], queue_id)

    def _write_temp(self, queue_id: str, data: bytes, sync: bool = True) -> str:
        """Write data to a new temp file and (unless ``sync`` is false) fsync it (thread pool)."""
        path = os.path.join(self._dirs["tmp"], f"{queue_id}.{random.getrandbits(32):08x}.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                self._fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quiet(path)
            raise
        os.close(fd)
        return path

    def _read_envelope(self, path: str, queue_id: str) -> tuple[Envelope, float | None]:
        return _decode(_read_file(path), queue_id)

    def _serial(self, ids: Iterable[str], op: Callable[[], Deferred[T]]) -> Deferred[T]:
        """Run op() after every earlier operation on any of ids; later ones wait for it."""
        ids = list(ids)
        before = [self._tails[i] for i in ids if i in self._tails]
        done: Deferred[None] = Deferred()
        for i in ids:
            self._tails[i] = done

        def finished(result: object) -> object:
            for i in ids:
                if self._tails.get(i) is done:
                    del self._tails[i]
            done.callback(None)
            return result

        if before:
            waits = []
            for prior in before:
                w: Deferred[None] = Deferred()
                prior.addBoth(lambda r, w=w: (w.callback(None), r)[1])
                waits.append(w)
            d: Deferred[Any] = gatherResults(waits).addCallback(lambda _: op())
        else:
            try:
                d = op()
            except BaseException:
                d = Deferred()
                d.errback(Failure())
        return d.addBoth(finished)

    def _notify(self, queue_id: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(queue_id)
            except Exception:
                self.log.failure("queue listener failed for {queue_id}", queue_id=queue_id)

    # ------------------------------------------------------------ writing

    def open_writer(self) -> SpoolWriter:
        queue_id = new_queue_id(self._clock.seconds())
        return SpoolWriter(self, queue_id, os.path.join(self._dirs["tmp"], queue_id + ".msg"))

    def commit(self, writer: SpoolWriter, envelope: Envelope) -> Deferred[str]:
        """Make writer's content and envelope durable in incoming/; fires with the queue id.

        Sets ``envelope.queue_id`` and, when it is 0, ``envelope.size``. An
        envelope with ``held_reason`` (a filter's quarantine) goes to hold/
        instead, never due until released.
        """
        if not isinstance(writer, SpoolWriter) or writer._store is not self:
            raise TypeError("commit() needs a writer from this store's open_writer()")
        writer._require_open()
        envelope.queue_id = writer.queue_id
        if not envelope.size:
            envelope.size = writer.size
        data = _encode(envelope, None)
        writer._state = "committing"
        state = "hold" if envelope.held_reason else "incoming"
        return run_coroutine(self._commit(writer, data, state))

    async def _commit(self, writer: SpoolWriter, data: bytes, state: str = "incoming") -> str:
        queue_id = writer.queue_id
        try:
            # the files are written and renamed in the directory round that makes them durable
            if self.sync == "syncfs":
                job: Any = TwoPhaseJob(functools.partial(self._commit_write, writer, data, False),
                                       functools.partial(self._commit_publish, writer, state=state),
                                       functools.partial(self._commit_discard, writer))
            else:
                job = functools.partial(self._commit_files, writer, data, state)
            await self.syncer.sync((self._dirs["msg"], self._dirs[state]), job)
        except DirectorySyncError:
            # not durable: take it back so that the sender's retry is not a duplicate
            writer._state = "aborted"
            self.log.error("directory fsync failed; rolling back {queue_id}", queue_id=queue_id)
            await self._in_pool(self._remove_files, queue_id, (state,))
            raise
        except Exception:
            writer._state = "aborted"
            raise
        writer._state = "committed"
        if state == "hold":
            self.log.info("{queue_id} committed to hold (quarantine)", queue_id=queue_id)
            return queue_id
        self._due_now(queue_id)
        self._notify(queue_id)
        return queue_id

    def _commit_files(self, writer: SpoolWriter, data: bytes, state: str = "incoming") -> None:
        """fsync content, write + fsync envelope, rename content then envelope (thread pool)."""
        self._commit_publish(writer, self._commit_write(writer, data, sync=True), state)

    def _commit_write(self, writer: SpoolWriter, data: bytes, sync: bool) -> str:
        """Close the content file and write the envelope's temp file, each fsynced if ``sync``."""
        content_tmp = writer._path
        try:
            f = writer._content_file()
            try:
                f.flush()
                if sync:
                    self._fsync(f.fileno())
            finally:
                f.close()
                writer._file = None
            return self._write_temp(writer.queue_id, data, sync)
        except BaseException:
            _unlink_quiet(content_tmp)
            raise

    def _commit_publish(self, writer: SpoolWriter, env_tmp: str, state: str) -> None:
        """Rename content into msg/, then the envelope into ``state``/ (that rename commits)."""
        content_tmp, queue_id = writer._path, writer.queue_id
        try:
            content = self._content_path(queue_id)
            os.rename(content_tmp, content)
            try:
                os.rename(env_tmp, self._env_path(state, queue_id))
            except BaseException:
                os.rename(content, content_tmp)
                raise
        except BaseException:
            _unlink_quiet(content_tmp)
            _unlink_quiet(env_tmp)
            raise

    def _commit_discard(self, writer: SpoolWriter, env_tmp: str) -> None:
        _unlink_quiet(writer._path)
        _unlink_quiet(env_tmp)

    def submit(self, content: bytes, envelope: Envelope) -> Deferred[str]:
        """Commit a complete message held in memory (DSNs, pickup)."""
        writer = self.open_writer()
        try:
            writer.write(content)
        except BaseException:
            writer.abort()
            raise
        return self.commit(writer, envelope)

    def add_listener(self, callback: Callable[[str], Any]) -> None:
        """callback(queue_id) whenever a message becomes due in this process.

        That is after each commit and submit here, a release, and a notice() or
        scan_incoming() that found an id not indexed yet.
        """
        self._listeners.append(callback)

    # ------------------------------------------------------------ after an attempt

    def _locate(self, queue_id: str, states: Iterable[str]) -> str | None:
        for state in states:
            if os.path.exists(self._env_path(state, queue_id)):
                return state
        return None

    def _move_rewritten(self, queue_id: str, data: bytes, source: str, target: str) -> None:
        """Atomically replace source/<id>.json with data, then rename it into target/."""
        tmp = self._write_temp(queue_id, data)
        try:
            os.replace(tmp, self._env_path(source, queue_id))
        except BaseException:
            _unlink_quiet(tmp)
            raise
        if source != target:
            os.rename(self._env_path(source, queue_id), self._env_path(target, queue_id))

    def _remove_files(self, queue_id: str, states: Iterable[str]) -> str | None:
        """Unlink the envelope (the message is gone from then on), then the content."""
        for state in states:
            if _unlink_quiet(self._env_path(state, queue_id)):
                _unlink_quiet(self._content_path(queue_id))
                return state
        return None

    def update(self, queue_id: str, envelope: Envelope, next_attempt: float | None) -> Deferred[None]:
        """Store the state after an attempt: remove (next_attempt None) or defer until next_attempt.

        The message must be active (claimed). A message held meanwhile stays
        held with the new envelope.
        """
        _check_id(queue_id)
        envelope.queue_id = queue_id
        self._forget(queue_id)
        if next_attempt is None:
            return self._serial([queue_id], lambda: run_coroutine(self._remove(queue_id)))
        when = float(next_attempt)
        return self._serial(
            [queue_id], lambda: run_coroutine(self._defer(queue_id, envelope, when))
        )

    async def _remove(self, queue_id: str) -> None:
        state = await self._in_pool(self._remove_files, queue_id, ("active", "hold"))
        if state is None:
            raise self._missing(queue_id, "active")
        await self.syncer.sync([self._dirs[state]])

    async def _defer(self, queue_id: str, envelope: Envelope, next_attempt: float) -> None:
        def work() -> str | None:
            # deferred/ too: an earlier try that renamed but failed its directory sync (full disk) is retried
            source = self._locate(queue_id, ("active", "hold", "deferred"))
            if source is None:
                return None
            if source == "hold" and not envelope.held_reason:
                envelope.held_reason = "held during delivery"
            target = "hold" if source == "hold" else "deferred"
            self._move_rewritten(queue_id, _encode(envelope, next_attempt), source, target)
            return source

        source = await self._in_pool(work)
        if source is None:
            raise self._missing(queue_id, "active")
        target = "hold" if source == "hold" else "deferred"
        await self.syncer.sync({self._dirs[source], self._dirs[target]})
        if target == "deferred":
            self._schedule(queue_id, next_attempt)

    def _missing(self, queue_id: str, expected: str) -> Exception:
        where = self._locate(queue_id, STATES)
        if where is None:
            return KeyError(queue_id)
        return ValueError(f"{queue_id} is {where}, not {expected}")

    def hold(self, queue_id: str, envelope: Envelope | None, reason: str) -> Deferred[None]:
        """Move a message (wherever it is) to hold/ with held_reason=reason.

        envelope None keeps the stored envelope (operator holds).
        """
        _check_id(queue_id)
        self._forget(queue_id)

        async def run() -> None:
            def work() -> str | None:
                source = self._locate(queue_id, ("active", "incoming", "deferred", "hold"))
                if source is None:
                    return None
                env = envelope
                if env is None:
                    env, _ = self._read_envelope(self._env_path(source, queue_id), queue_id)
                env.queue_id = queue_id
                env.held_reason = reason
                self._move_rewritten(queue_id, _encode(env, None), source, "hold")
                return source

            source = await self._in_pool(work)
            if source is None:
                raise KeyError(queue_id)
            await self.syncer.sync({self._dirs[source], self._dirs["hold"]})

        return self._serial([queue_id], lambda: run_coroutine(run()))

    def release(self, queue_id: str) -> Deferred[None]:
        """Bring a held message back to incoming/, due now, with its crash count reset."""
        return self._release(queue_id, None)

    def _release(self, queue_id: str, when: float | None) -> Deferred[None]:
        """release(); with ``when``, every pending recipient's next attempt is set to it too."""
        _check_id(queue_id)

        async def run() -> None:
            def work() -> None:
                path = self._env_path("hold", queue_id)
                if not os.path.exists(path):
                    raise self._missing(queue_id, "hold")
                env, _ = self._read_envelope(path, queue_id)
                env.held_reason = None
                env.crashes = 0
                if when is not None:
                    for r in env.pending():
                        r.next_attempt = when
                self._move_rewritten(queue_id, _encode(env, None), "hold", "incoming")

            await self._in_pool(work)
            await self.syncer.sync({self._dirs["hold"], self._dirs["incoming"]})
            self._due_now(queue_id)
            self._notify(queue_id)

        return self._serial([queue_id], lambda: run_coroutine(run()))

    # ------------------------------------------------------------ reading

    def open_content(self, queue_id: str) -> BinaryIO:
        # an explicit buffer size spares the isatty() ioctl of the default (one per delivery)
        return open(self._content_path(_check_id(queue_id)), "rb", buffering=_FILE_BUFFER)

    def list_messages(self, queue: str) -> Deferred[list[Envelope]]:
        """Envelopes in queue (incoming, active, deferred, hold), oldest id first."""
        if queue not in STATES:
            return fail(ValueError(f"unknown queue {queue!r}"))

        def work() -> tuple[list[Envelope], list[str]]:
            envelopes, problems = [], []
            for name in sorted(os.listdir(self._dirs[queue])):
                queue_id = name[:-5]
                if not name.endswith(".json") or not _QUEUE_ID.match(queue_id):
                    continue
                try:
                    envelopes.append(self._read_envelope(self._env_path(queue, queue_id), queue_id)[0])
                except FileNotFoundError:
                    continue
                except (OSError, ValueError) as e:
                    problems.append(f"{self._env_path(queue, queue_id)}: {e}")
            return envelopes, problems

        def done(result: tuple[list[Envelope], list[str]]) -> list[Envelope]:
            for problem in result[1]:
                self.log.warn("list_messages skipped {problem}", problem=problem)
            return result[0]

        return self._in_pool(work).addCallback(done)
