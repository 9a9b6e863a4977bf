"""The spool's writer lock: recovery knows when no other process can still be writing.

``recover()`` removes temp files and content files that no envelope
references. That is only safe once no process of an earlier run can still
commit into the spool: a receive worker of a main process killed with
``kill -9`` gets SIGTERM (``PR_SET_PDEATHSIG``) and may finish a session for
a few seconds, renaming content into ``msg/`` just before its envelope.

So every receive worker holds a shared ``flock`` on ``<spool>/writers.lock``
for its whole life, and recovery takes the lock exclusively (bounded wait)
before it looks at the files. The kernel drops a process's locks when it
dies, whatever the signal, so nothing stale can block a restart. Recovery
that cannot get the lock in time falls back to leaving young files alone
(the caller decides), and says so.
"""
from __future__ import annotations

import fcntl
import os
import time
from typing import Callable

__all__ = ["LOCK_NAME", "WriterLock"]

LOCK_NAME = "writers.lock"
_POLL = 0.05  # seconds between two tries while another process holds the lock


def _pause(seconds: float) -> None:
    """Wait between two tries (a module function, so that a test can act while recovery waits)."""
    time.sleep(seconds)


class WriterLock:
    """One ``flock`` on ``root/writers.lock`` (an open file description of its own)."""

    def __init__(self, root: str, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = os.path.join(root, LOCK_NAME)
        self._monotonic = monotonic
        self._fd: int | None = None

    def _try(self, mode: int, timeout: float) -> bool:
        """Blocking (in a thread, or at process start): poll until ``timeout`` seconds have passed."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = self._monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._fd, mode | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if self._monotonic() >= deadline:
                    return False
                _pause(_POLL)

    def shared(self, timeout: float) -> bool:
        """Hold the lock as one of the writers; False if a recovery kept it for ``timeout`` s."""
        return self._try(fcntl.LOCK_SH, timeout)

    def exclusive(self, timeout: float) -> bool:
        """Hold the lock alone (recovery); False if writers kept it for ``timeout`` s."""
        return self._try(fcntl.LOCK_EX, timeout)

    def release(self) -> None:
        """Drop the lock and close the file (harmless when not held)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor of the description releases the flock
