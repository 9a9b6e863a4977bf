"""The spool's on-disk vocabulary (:mod:`exmta.queue.spool`): states, directories, queue ids,
envelope files, and the quiet file helpers its writer and store share."""
from __future__ import annotations

import json
import os
import re
from typing import BinaryIO

from exmta.model import Envelope

__all__ = ["STATES"]

STATES = ("incoming", "active", "deferred", "hold")
_DIRS = ("tmp", "msg", *STATES, "corrupt")
_QUEUE_ID = re.compile(r"^[0-9A-Za-z]{1,64}$")


def _read_file(path: str) -> bytes:
    """A whole small file with plain reads (no fstat, isatty and lseek of a Python file object)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            if len(chunk) < 65536:  # a short read of a regular file is its end: no read for EOF
                break
        return b"".join(chunks)
    finally:
        os.close(fd)


def _unlink_quiet(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _close_quiet(f: BinaryIO) -> None:
    """Close a file whose unwritten buffer is being thrown away; a failed flush (ENOSPC) is moot."""
    try:
        f.close()
    except OSError:
        try:
            f.close()  # the first close stopped at the flush; this one releases the descriptor
        except OSError:
            pass


def _check_id(queue_id: str) -> str:
    if not isinstance(queue_id, str) or not _QUEUE_ID.match(queue_id):
        raise ValueError(f"not a queue id: {queue_id!r}")
    return queue_id


def _encode(envelope: Envelope, next_attempt: float | None) -> bytes:
    data = envelope.to_json()
    data["spool"] = {"next_attempt": next_attempt}
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _decode(raw: bytes, queue_id: str) -> tuple[Envelope, float | None]:
    """Parse an envelope file; ValueError with a readable reason when it is unusable."""
    try:
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        envelope = Envelope.from_json(data)
        spool = data.get("spool") or {}
        next_attempt = spool.get("next_attempt")
        next_attempt = None if next_attempt is None else float(next_attempt)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"unreadable envelope: {type(e).__name__}: {e}") from None
    if envelope.queue_id != queue_id:
        raise ValueError(f"envelope names queue id {envelope.queue_id!r}")
    return envelope, next_attempt

