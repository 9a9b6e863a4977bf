"""Group commit for the spool's directory fsyncs, and Linux syncfs (:mod:`exmta.queue.spool`).

One fsync of a directory serves every rename done before it started; with
``sync="syncfs"`` one syncfs call stands for every fsync of a round. The spool's
module docstring says what each mode costs and when to choose it.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from exmta.coroutines import run_coroutine

__all__ = ["DirectorySyncError", "FsyncFn", "GroupSync", "TwoPhaseJob", "fsync_directory", "libc_syncfs"]

FsyncFn = Callable[[int], None]


def fsync_directory(path: str, fsync: FsyncFn = os.fsync) -> None:
    """Make the entries of directory ``path`` (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


class GroupSync:
    """Group commit for directory fsyncs.

    :meth:`sync` returns a Deferred that fires once each given directory has
    been fsynced by a round that *started after* the call, so every rename the
    caller finished before calling is durable. One round runs at a time (in the
    thread pool, via ``run``); calls made while it runs are collected and
    served together by the next round, which fsyncs each directory once.
    """

    def __init__(self, run: Callable[..., Deferred[Any]], fsync: FsyncFn = os.fsync,
                 clock: IReactorTime | None = None, syncfs: Callable[[], None] | None = None,
                 in_thread: Callable[[Callable[[], None]], Deferred[None]] | None = None) -> None:
        self._run = run
        self._fsync = fsync
        self._syncfs = syncfs  # given: one syncfs stands for every fsync of a round (SpoolStore sync="syncfs")
        self._in_thread = in_thread  # runs the syncfs calls off the reactor thread (None: here, blocking)
        self._clock = clock  # given: a round starts at the end of this reactor iteration (inline I/O)
        self._pending_start: Any = None
        self._paths: set[str] = set()
        self._waiters: list[tuple[Deferred[Any], Callable[[], Any] | None]] = []
        self._busy = False
        self.rounds = 0   # fsync rounds started
        self.fsyncs = 0   # directory fsyncs done
        self.requests = 0  # sync() calls served

    def sync(self, paths: Iterable[str], job: Callable[[], Any] | None = None) -> Deferred[Any]:
        """Fires once ``paths`` are fsynced. ``job`` (file writes and renames) runs first, in the
        same round: the Deferred fires with its result, or fails with its error (and then the
        directories are not waited for), or with :class:`DirectorySyncError`."""
        d: Deferred[Any] = Deferred()
        self._paths.update(paths)
        self._waiters.append((d, job))
        self.requests += 1
        if not self._busy:
            self._start()
        return d

    def _start(self) -> None:
        if self._clock is not None:
            # inline: wait for the rest of this iteration's renames, then one round serves them all
            if self._pending_start is None:
                self._pending_start = self._clock.callLater(0, self._start_now)
            return
        self._start_now()

    def _start_now(self) -> None:
        self._pending_start = None
        if self._busy or not self._waiters:
            return
        paths, waiters = sorted(self._paths), self._waiters
        self._paths, self._waiters = set(), []
        self._busy = True
        self.rounds += 1
        self.fsyncs += len(paths)
        jobs = [job for _, job in waiters]
        if self._syncfs is not None:
            d = run_coroutine(self._syncfs_round(jobs))
        else:
            # one job for the round (one thread hand-off): its commits, then each directory once
            d = self._run(self._round, paths, jobs)
        d.addBoth(self._finished, [w for w, _ in waiters])

    def _round(self, paths: list[str], jobs: list[Any]) -> list[tuple[bool, Any]]:
        results = [_attempt(job) for job in jobs]
        if any(ok for ok, _ in results):
            try:
                for path in paths:
                    fsync_directory(path, self._fsync)
            except OSError as e:
                results = _all_failed(results, DirectorySyncError(e.errno, f"directory fsync failed: {e}"))
        return results

    def _call_syncfs(self) -> Deferred[None]:
        assert self._syncfs is not None
        if self._in_thread is not None:
            return self._in_thread(self._syncfs)
        try:
            return succeed(self._syncfs())
        except BaseException:
            return fail()

    async def _syncfs_round(self, jobs: list[Any]) -> list[tuple[bool, Any]]:
        """Write every job's files, one syncfs, publish (rename) them all, one more syncfs.

        The first syncfs makes the files' contents durable before any rename
        can reach the journal; the second makes the renames durable (what the
        directory fsyncs do in the other mode): two journal commits per round
        instead of two per message plus two per round. The writes and renames
        are quick and run here; the syncfs calls, which wait for the disk, run
        in a thread, so the reactor serves other sessions meanwhile (one
        hand-off per syncfs, not one per file).
        """
        staged = [_attempt(job.prepare) if isinstance(job, TwoPhaseJob) else (True, None) for job in jobs]
        if any(ok and isinstance(job, TwoPhaseJob) for job, (ok, _) in zip(jobs, staged)):
            try:
                await self._call_syncfs()  # the files' contents, before any rename
            except OSError as e:
                for job, (ok, value) in zip(jobs, staged):
                    if ok and isinstance(job, TwoPhaseJob):
                        job.discard(value)
                return _all_failed(staged, e)
        results = [
            (ok, value) if not ok
            else _attempt(job.publish, value) if isinstance(job, TwoPhaseJob)
            else _attempt(job)
            for job, (ok, value) in zip(jobs, staged)
        ]
        if any(ok for ok, _ in results):
            try:
                await self._call_syncfs()
            except OSError as e:
                results = _all_failed(results, DirectorySyncError(e.errno, f"syncfs failed: {e}"))
        return results

    def _finished(self, outcome: object, waiters: list[Deferred[Any]]) -> None:
        self._busy = False
        for i, d in enumerate(waiters):
            if isinstance(outcome, Failure):  # the round itself broke (not a job's error)
                d.errback(outcome)
                continue
            ok, value = outcome[i]  # type: ignore[index]
            if ok:
                d.callback(value)
            else:
                d.errback(value)
        if self._waiters and not self._busy:
            self._start()


def _attempt(job: Callable[..., Any] | None, *args: Any) -> tuple[bool, Any]:
    """One job's outcome in a round: (True, its result) or (False, its Failure); no job: (True, None)."""
    if job is None:
        return True, None
    try:
        return True, job(*args)
    except BaseException:
        return False, Failure()


def _all_failed(results: list[tuple[bool, Any]], error: BaseException) -> list[tuple[bool, Any]]:
    """The outcomes after a step every job depended on failed with ``error``."""
    failure = Failure(error)
    return [(False, failure) if ok else (ok, r) for ok, r in results]


class DirectorySyncError(OSError):
    """A directory fsync failed: the renames before it may not be durable."""


@dataclass(frozen=True)
class TwoPhaseJob:
    """A commit in a syncfs round: prepare() writes files, publish(prepared) renames them,
    discard(prepared) removes them when the round cannot make them durable."""

    prepare: Callable[[], Any]
    publish: Callable[[Any], Any]
    discard: Callable[[Any], None]


_LIBC: Any = None


def libc_syncfs(fd: int) -> None:
    """Linux syncfs(2): every file and directory of fd's filesystem durable, in one journal commit.

    ctypes releases the GIL for the call, as os.fsync does."""
    global _LIBC
    import ctypes

    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    try:
        call = _LIBC.syncfs
    except AttributeError:
        raise OSError(errno.ENOSYS, "syncfs is not available here") from None
    if call(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")
