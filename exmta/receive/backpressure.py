"""Back pressure: stop taking new mail while the server is short of a resource.

Exchange's back pressure watches the queue database's disk, memory and the
queue length, and when one passes its limit new mail is refused with
``452 4.3.1 Insufficient system resources``; mail already accepted is
delivered as usual. exmta does the same at MAIL FROM, for three measures:

* free space on the file system of the queue directory below ``min_free_disk``;
* resident memory (RSS) of this process above ``max_memory``;
* messages in the queue (files in the spool's ``msg/``) above ``max_queued_messages``.

A limit of 0 switches that measure off. Measuring runs every
``check_interval`` seconds (in the thread pool when one is given: statvfs and
a directory listing may block on a busy disk). MAIL FROM reads the last
result, except for free disk space: a fast sender fills a small spool in less
than ``check_interval`` (64 MiB in 3 s, issue 10 item 9), so MAIL FROM also
takes a fresh ``statvfs`` when the last one is older than ``disk_refresh``
(0.1 s), and refuses a message whose declared SIZE would take the free space
below ``min_free_disk`` (``452 4.3.1 Insufficient system storage``). Each change of state is logged, and
:meth:`BackPressure.status` returns the numbers for a metric or a health check. Nothing here touches a
transaction already in progress or a message already acknowledged: a
``DATA`` that was started finishes (or fails with 451 if the disk is really
full), and the queue keeps delivering, which is what relieves the pressure.
"""
from __future__ import annotations

import os
import resource
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from exmta.model import Reply

__all__ = ["BackPressure", "BackPressureService", "free_disk_space", "process_rss", "spool_message_count"]

log = Logger()


def free_disk_space(path: str) -> int:
    """Octets available to an unprivileged writer on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def process_rss() -> int:
    """Resident memory of this process in octets (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def spool_message_count(queue_dir: str) -> int:
    """Messages in an embedded spool: its committed content files in ``msg/``."""
    try:
        with os.scandir(os.path.join(queue_dir, "msg")) as it:
            return sum(1 for _ in it)
    except FileNotFoundError:
        return 0


def _fmt(octets: int) -> str:
    return f"{octets / 1048576:.1f} MiB"


class BackPressure:
    """The measured state and the refusal for MAIL FROM; see the module docstring."""

    def __init__(
        self,
        queue_dir: str,
        *,
        min_free_disk: int = 0,
        max_memory: int = 0,
        max_queued_messages: int = 0,
        free_space: Callable[[str], int] = free_disk_space,
        rss: Callable[[], int] = process_rss,
        queued: Callable[[str], int] = spool_message_count,
        clock: Any = None,
        disk_refresh: float = 0.1,
    ) -> None:
        self.queue_dir = queue_dir
        self.min_free_disk = min_free_disk
        self.max_memory = max_memory
        self.max_queued_messages = max_queued_messages
        self._free_space = free_space
        self._rss = rss
        self._queued = queued
        self.clock = clock
        self.free_disk: int | None = None
        self.memory: int | None = None
        self.queued_messages: int | None = None
        self.reasons: tuple[str, ...] = ()
        self.since: float | None = None      # when the current pressure began
        self.checked_at: float | None = None
        self.refused = 0                     # MAIL FROM commands refused so far
        self.disk_refresh = disk_refresh
        self._disk_at: float | None = None   # when free_disk was last measured

    @property
    def enabled(self) -> bool:
        return bool(self.min_free_disk or self.max_memory or self.max_queued_messages)

    def measure(self) -> tuple[int | None, int | None, int | None]:
        """Take the three measurements (blocking: statvfs, /proc, a directory listing)."""
        free = rss = queued = None
        try:
            free = self._free_space(self.queue_dir) if self.min_free_disk else None
        except OSError as e:
            log.error("back pressure: cannot measure free space of {path}: {error}", path=self.queue_dir, error=e)
        rss = self._rss() if self.max_memory else None
        try:
            queued = self._queued(self.queue_dir) if self.max_queued_messages else None
        except OSError as e:
            log.error("back pressure: cannot count messages in {path}: {error}", path=self.queue_dir, error=e)
        return free, rss, queued

    def update(self, measured: tuple[int | None, int | None, int | None]) -> None:
        """Adopt new measurements; log when the state changes."""
        self.free_disk, self.memory, self.queued_messages = measured
        if self.clock is not None and self.free_disk is not None:
            self._disk_at = self.clock.seconds()
        reasons = []
        if self.free_disk is not None and self.free_disk < self.min_free_disk:
            reasons.append(f"free disk space {_fmt(self.free_disk)} below {_fmt(self.min_free_disk)}")
        if self.memory is not None and self.memory > self.max_memory:
            reasons.append(f"memory {_fmt(self.memory)} above {_fmt(self.max_memory)}")
        if self.queued_messages is not None and self.queued_messages > self.max_queued_messages:
            reasons.append(f"{self.queued_messages} messages in the queue, above {self.max_queued_messages}")
        now = self.clock.seconds() if self.clock is not None else None
        self.checked_at = now
        new = tuple(reasons)
        if new and not self.reasons:
            self.since = now
            log.warn("back pressure ON, new mail refused with 452 4.3.1: {reasons}", reasons="; ".join(new),
                     free_disk=self.free_disk, memory=self.memory, queued=self.queued_messages)
        elif new and new != self.reasons:
            log.warn("back pressure changed: {reasons}", reasons="; ".join(new))
        elif not new and self.reasons:
            log.info("back pressure OFF, taking new mail again (was: {reasons})", reasons="; ".join(self.reasons),
                     free_disk=self.free_disk, memory=self.memory, queued=self.queued_messages)
            self.since = None
        self.reasons = new

    def check(self) -> None:
        """Measure now, on this thread, and update."""
        self.update(self.measure())

    def _refresh_disk(self) -> None:
        """A fresh statvfs (a few µs) when the last free-space figure is older than disk_refresh."""
        if not self.min_free_disk or self.clock is None:
            return
        now = self.clock.seconds()
        if self._disk_at is not None and now - self._disk_at < self.disk_refresh:
            return
        self._disk_at = now
        try:
            free = self._free_space(self.queue_dir)
        except OSError as e:
            log.error("back pressure: cannot measure free space of {path}: {error}", path=self.queue_dir, error=e)
            return
        if free != self.free_disk:
            self.update((free, self.memory, self.queued_messages))

    def refusal(self, size: int | None = None) -> Reply | None:
        """The reply for a new MAIL FROM while under pressure (or whose declared ``size`` does not fit
        above the free-space reserve), else None."""
        self._refresh_disk()
        if not self.reasons:
            if size and self.min_free_disk and self.free_disk is not None \
                    and self.free_disk - size < self.min_free_disk:
                self.refused += 1
                return Reply.make(452, "4.3.1", f"Insufficient system storage for a message of {size} octets, "
                                                "try again later")
            return None
        self.refused += 1
        return Reply.make(452, "4.3.1", f"Insufficient system resources ({self.reasons[0]}), try again later")

    def status(self) -> dict[str, Any]:
        """Plain numbers for an operator's metrics: 1/0 pressure, measurements, limits, reasons."""
        return {
            "pressure": 1 if self.reasons else 0,
            "reasons": list(self.reasons),
            "since": self.since,
            "checked_at": self.checked_at,
            "free_disk_bytes": self.free_disk,
            "min_free_disk_bytes": self.min_free_disk,
            "memory_bytes": self.memory,
            "max_memory_bytes": self.max_memory,
            "queued_messages": self.queued_messages,
            "max_queued_messages": self.max_queued_messages,
            "refused_mail_commands": self.refused,
        }


class BackPressureService(Service):
    """Measures every ``interval`` seconds (in ``threadpool`` when given) while running."""

    def __init__(self, pressure: BackPressure, clock: Any, interval: float, reactor: Any = None,
                 threadpool: Any = None) -> None:
        self.pressure = pressure
        self.clock = clock
        self.interval = interval
        self.reactor = reactor
        self.threadpool = threadpool
        self._loop: LoopingCall | None = None

    def _tick(self) -> Deferred[None]:
        if self.threadpool is not None:
            d = deferToThreadPool(self.reactor, self.threadpool, self.pressure.measure)
        else:
            d = succeed(self.pressure.measure())
        d.addCallback(self.pressure.update)
        d.addErrback(lambda f: log.failure("back pressure check failed", f))
        return d

    def startService(self) -> None:
        super().startService()
        if not self.pressure.enabled:
            return
        self.pressure.check()  # the first answer before any client connects
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
