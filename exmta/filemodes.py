# -*- test-case-name: tests.queue.test_filemodes -*-
"""File modes of what exmta writes: mail content is private to the server's user.

Queued messages, exported messages and keys are created 0600 whatever the
umask (:func:`private_opener`); the process umask is tightened to at least
027 when the server starts (:func:`tighten_umask`: logs and directories are
then never readable by other users), and the data, log and pickup
directories lose any access by others they had from an older install
(:func:`close_directories`). Group access is left to the operator: a
pickup writer group or a log reader group is a deliberate choice.

``twistd --uid/--gid`` builds the service as root (so that it can bind port
25) and only then becomes the unprivileged user; :func:`hand_over` gives
that user what was created as root in between (the queue's directories).
"""
from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from twisted.logger import Logger

__all__ = ["SERVER_UMASK", "close_directories", "hand_over", "private_opener", "tighten_umask"]

log = Logger()

#: the least the server's umask masks: nothing for others, no group write
SERVER_UMASK = 0o027


def private_opener(path: str, flags: int) -> int:
    """``open(..., opener=private_opener)``: a new file is created 0600 (before the umask, which only removes)."""
    return os.open(path, flags, 0o600)


def tighten_umask(least: int = SERVER_UMASK) -> int:
    """Add ``least`` to the process umask (never loosens a stricter one); returns the new umask."""
    old = os.umask(least)
    new = old | least
    os.umask(new)
    return new


def close_directories(paths: Iterable[str]) -> list[str]:
    """Remove access by others from each existing directory we own; returns the ones changed."""
    changed = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or not mode & 0o007:
            continue
        try:
            os.chmod(path, mode & ~0o007)
        except OSError as e:
            log.warn("cannot restrict {path} (mode {mode:o}): {error}", path=path, mode=mode, error=str(e))
            continue
        log.info("restricted {path} from mode {mode:o} to {new:o}: other users may not read mail data",
                 path=path, mode=mode, new=mode & ~0o007)
        changed.append(path)
    return changed


def hand_over(tops: Iterable[str], trees: Iterable[str], uid: int, gid: int) -> int:
    """Chown to ``uid:gid`` what root owns: each of ``tops`` itself, and everything under ``trees``
    (run as root, before twistd drops privileges; links are not followed). Returns how many changed."""
    paths: list[str] = list(tops)
    for root in trees:
        for top, _dirs, files in os.walk(root):
            paths.append(top)
            paths.extend(os.path.join(top, n) for n in files)
    changed = 0
    for path in paths:
        try:
            if os.lstat(path).st_uid == 0:
                os.lchown(path, uid, gid)
                changed += 1
        except OSError as e:
            log.warn("cannot give {path} to uid {uid}: {error}", path=path, uid=uid, error=str(e))
    return changed


def replace_file(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to a new file (``mode``) beside ``path``, fsync it, rename it over ``path`` and
    fsync the directory: readers see the old bytes or the new ones, never a half-written file, and
    whoever holds the old file open keeps the old bytes (nothing is rewritten in place)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
