# -*- test-case-name: tests.admin.test_status_search -*-
"""The status page's tracking search: newest records first, bounded, meant for a thread.

``exmta track`` reads every rotated file forwards and sorts; a web page must
not: 300k records cost a 2.4 s stall and 663 MB when that ran on the reactor
thread. :func:`search_newest` reads the live file and then its rotated
predecessors *backwards* in blocks, stops at ``limit`` matches or after
``max_bytes`` read (whichever comes first), and holds only the matches and
one block. It blocks: the page runs it on a thread pool.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

from exmta.observe.rotation import log_files

__all__ = ["BLOCK", "MAX_BYTES", "SearchResult", "reversed_lines", "search_newest"]

BLOCK = 64 * 1024
MAX_LINE = 1024 * 1024  # a longer "line" is skipped, never accumulated
#: octets of tracking log one search reads at most (newest first); older history: `exmta track`
MAX_BYTES = 64 * 1024 * 1024


class SearchResult(tuple):
    """(records newest first, unreadable lines skipped, True when the byte cap stopped the search)."""

    __slots__ = ()

    def __new__(cls, records: list[dict[str, Any]], bad: int, truncated: bool) -> SearchResult:
        return super().__new__(cls, (records, bad, truncated))


def reversed_lines(path: str, budget: list[int], block: int = BLOCK) -> Iterator[bytes]:
    """The lines of ``path`` from the last to the first; ``budget[0]`` octets at most (decremented)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        if not f.seekable():  # a pipe: read forwards, up to the budget
            data = f.read(max(budget[0], 0))
            budget[0] -= len(data)
            yield from reversed(data.split(b"\n"))
            return
        pos = f.seek(0, os.SEEK_END)
        tail = b""
        while pos > 0 and budget[0] > 0:
            step = min(block, pos, budget[0])
            pos -= step
            f.seek(pos)
            data = f.read(step) + tail
            budget[0] -= step
            lines = data.split(b"\n")
            tail = lines[0]  # maybe the end of a line that starts in the previous block
            for line in reversed(lines[1:]):
                yield line
            if len(tail) > MAX_LINE:
                tail = b""  # one absurdly long line: skipped, never accumulated
        if pos == 0 and tail:
            yield tail


def search_newest(path: str, matches: Callable[[dict[str, Any]], bool], limit: int = 100,
                  max_bytes: int = MAX_BYTES, maybe: Callable[[bytes], bool] | None = None) -> SearchResult:
    """Matching records of the log at ``path`` and its rotated files, newest first (blocking).

    ``maybe(line)``, when given, is a cheap test on a raw ``{...}`` line:
    False means the record cannot match, and it is not parsed.
    """
    out: list[dict[str, Any]] = []
    bad = 0
    budget = [max_bytes]
    for name in reversed(log_files(path)):
        for raw in reversed_lines(name, budget):
            line = raw.strip()
            if not line:
                continue
            if maybe is not None and line[:1] == b"{" and line[-1:] == b"}" and not maybe(line):
                continue  # a whole record that cannot match (a cut or corrupt line is still counted)
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError:
                bad += 1
                continue
            if matches(record):
                out.append(record)
                if len(out) >= limit:
                    return SearchResult(out, bad, False)
        if budget[0] <= 0:
            return SearchResult(out, bad, True)
    return SearchResult(out, bad, False)
