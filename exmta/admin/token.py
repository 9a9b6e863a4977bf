"""The admin API token: a random secret in a file only its owner can read (mode 0600).

Generated on first start (``secrets.token_urlsafe(32)``, 256 bits) into
``[admin] token_file`` (default ``<data_dir>/admin.token``); an existing file
is kept, and tightened to 0600 if group or others could read it. ``exmta
queue`` reads the same file, so whoever can read the data directory can
administer the server, as with Postfix's ``postqueue``.
"""
from __future__ import annotations

import os
import secrets
import stat

from twisted.logger import Logger

__all__ = ["ensure_token", "read_token", "token_path"]

log = Logger()


def token_path(data_dir: str, configured: str | None) -> str:
    return os.path.abspath(configured) if configured else os.path.join(os.path.abspath(data_dir), "admin.token")


def read_token(path: str) -> str:
    """The token in ``path`` (surrounding whitespace removed); OSError when unreadable, ValueError when empty."""
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"{path} is empty")
    return token


def ensure_token(path: str) -> str:
    """Read the token, creating the file (0600, exclusively) when it does not exist yet."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            log.warn("admin token file {path} was readable by others (mode {mode:o}); now 0600",
                     path=path, mode=mode)
            os.chmod(path, 0o600)
        return read_token(path)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    log.info("admin API token generated in {path}", path=path)
    return token
