"""Append-only line logs with size- and age-based rotation and retention.

:class:`RotatingLog` is shared by the message tracking log and the protocol
logs. The live file is ``path``; when it reaches ``max_size`` octets, or
``max_age`` seconds after it was opened, it is renamed to
``path.YYYYMMDDTHHMMSS`` (UTC, ``-N`` added when the name is taken) and a new
file is started. Rotated files older than ``keep_age`` seconds are deleted,
and the oldest ones are deleted while the rotated files together exceed
``keep_size`` octets (Exchange's MaxAge and MaxDirectorySize). Every decision
uses the injected clock, so rotation is testable with ``task.Clock``.

Writes are synchronous and line buffered (one ``write`` per line; no fsync):
these are diagnostic logs, the queue itself is what is durable. Several
processes may append to one file (receive workers): only the main process
rotates, and a writer notices within a second that the file was renamed
under it and reopens ``path``.
:func:`log_files` lists a log's files oldest first, for readers such as
``exmta track``.
"""
from __future__ import annotations

import os
import re
import time
from typing import IO, Any

from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["RotatingLog", "log_files"]

_SUFFIX = re.compile(r"^\.(\d{8}T\d{6})(?:-(\d+))?$")


def log_files(path: str) -> list[str]:
    """The rotated files of ``path`` (oldest first), then ``path`` itself if it exists."""
    directory = os.path.dirname(path) or "."
    base = os.path.basename(path)
    rotated: list[tuple[str, int, str]] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        names = []
    for name in names:
        if not name.startswith(base):
            continue
        m = _SUFFIX.match(name[len(base):])
        if m:
            rotated.append((m.group(1), int(m.group(2) or 0), os.path.join(directory, name)))
    rotated.sort()
    out = [p for _, _, p in rotated]
    if os.path.exists(path):
        out.append(path)
    return out


class RotatingLog:
    """One live log file plus its rotated predecessors (see the module docstring).

    ``max_size`` / ``max_age`` of 0 disable that rotation trigger;
    ``keep_age`` / ``keep_size`` of 0 disable that retention rule.
    ``write_line`` never raises: a failure is logged once per streak and the
    file is reopened at the next line.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        clock: Any,
        *,
        max_size: int = 64 * 1024 * 1024,
        max_age: float = 86400.0,
        keep_age: float = 30 * 86400.0,
        keep_size: int = 1024 * 1024 * 1024,
        mode: int = 0o640,
        report_errors: bool = True,
    ) -> None:
        self.path = path
        self.clock = clock
        self.max_size = max_size
        self.max_age = max_age
        self.keep_age = keep_age
        self.keep_size = keep_size
        self.mode = mode
        self._file: IO[str] | None = None
        self._size = 0
        self._opened_at = 0.0
        self._checked_at = 0.0
        self.report_errors = report_errors
        self.failing = False
        self.last_failure: Failure | None = None
        self.written = 0
        self.rotations = 0

    # ------------------------------------------------------------ writing

    def _renamed(self) -> bool:
        """Has someone else (another process's rotation) renamed or removed ``path``? Checked once a second."""
        now = self.clock.seconds()
        if self._file is None or now - self._checked_at < 1.0:
            return False
        self._checked_at = now
        try:
            return os.stat(self.path).st_ino != os.fstat(self._file.fileno()).st_ino
        except OSError:
            return True

    def _open(self) -> IO[str]:
        if self._file is None:
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.mode)
            self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1, newline="\n")
            self._size = os.fstat(fd).st_size
            self._opened_at = self._checked_at = self.clock.seconds()
        return self._file

    def _due(self, extra: int) -> bool:
        if self._file is None or self._size == 0:
            return False
        if self.max_size and self._size + extra > self.max_size:
            return True
        return bool(self.max_age) and self.clock.seconds() - self._opened_at >= self.max_age

    def write_line(self, line: str) -> bool:
        """Append one line (a newline is added); rotate first when due. False when it failed."""
        data = line + "\n"
        try:
            encoded = len(data.encode("utf-8"))
            if self._file is None:
                self._open()
            elif self._renamed():
                self._close_quietly()  # rotated by another process: follow to the new file
                self._open()
            if self._due(encoded):
                self.rotate()
            self._open().write(data)
            self._size += encoded
        except Exception:
            self.last_failure = Failure()
            if not self.failing and self.report_errors:
                self.log.failure("Cannot write the log {path}", self.last_failure, path=self.path)
            self.failing = True
            self._close_quietly()
            return False
        self.failing = False
        self.written += 1
        return True

    def rotate(self) -> str | None:
        """Rename the live file aside now and apply retention; returns the new name (None if empty)."""
        self._close_quietly()
        target = None
        try:
            if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
                stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.clock.seconds()))
                target = f"{self.path}.{stamp}"
                n = 1
                while os.path.exists(target):
                    target = f"{self.path}.{stamp}-{n}"
                    n += 1
                os.rename(self.path, target)
                self.rotations += 1
        except OSError as e:
            self.log.error("Cannot rotate the log {path}: {error}", path=self.path, error=str(e))
            target = None
        self.prune()
        return target

    def prune(self) -> list[str]:
        """Delete rotated files past ``keep_age``, then the oldest beyond ``keep_size``; returns them."""
        now = self.clock.seconds()
        rotated = [p for p in log_files(self.path) if p != self.path]
        removed: list[str] = []
        sizes: dict[str, int] = {}
        for p in rotated:
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            if self.keep_age and now - st.st_mtime > self.keep_age:
                removed.append(p)
            else:
                sizes[p] = st.st_size
        if self.keep_size:
            total = sum(sizes.values())
            for p in list(sizes):  # oldest first
                if total <= self.keep_size:
                    break
                total -= sizes.pop(p)
                removed.append(p)
        for p in removed:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                self.log.error("Cannot delete the old log {path}: {error}", path=p, error=str(e))
        return removed

    def reopen(self) -> None:
        """Close the file; the next line opens ``path`` again (external rotation)."""
        self._close_quietly()

    def close(self) -> None:
        self._close_quietly()

    def _close_quietly(self) -> None:
        f, self._file = self._file, None
        self._size = 0
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
