"""Recipient validation for authoritative accepted domains (Exchange's recipient filtering).

Exchange refuses an unknown recipient of an authoritative domain at RCPT
with ``550 5.1.1`` instead of accepting it and bouncing later (backscatter).
exmta asks, in order, the directory lookup hooks (e.g. an LDAP search; each
answers True, False, or None for "don't know") and then the recipient list
file. The postmaster address is always accepted (RFC 5321 4.5.1).

The recipient list is a text file, one entry per line, ``#`` starts a
comment::

    alice@example.com          # one address (case does not matter)
    *@sales.example.com        # every address of a domain
    team-*@example.com         # shell-style wildcards: * and ?

It is read again when it changes (checked at most every ``check_interval``
seconds, by modification time, size and inode), so an operator edits it or
replaces it atomically with a rename and no restart. A file that cannot be
read keeps the last good list (and is logged); when there never was one,
the answer is a temporary failure, not a bounce.
"""
from __future__ import annotations

import fnmatch
import os
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from exmta.interfaces import IRecipientLookup
from exmta.model import Address

__all__ = ["RecipientList", "RecipientValidator", "parse_recipient_list"]

log = Logger()

Lookup = Callable[[Address], "bool | None | Deferred[bool | None]"]


def parse_recipient_list(text: str, source: str = "<text>") -> tuple[frozenset[str], tuple[str, ...]]:
    """(exact addresses, wildcard patterns), lower case; bad lines are logged and skipped."""
    exact: set[str] = set()
    patterns: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if entry.count("@") != 1 or entry.startswith("@") or entry.endswith("@") or any(c.isspace() for c in entry):
            log.warn("{source}:{line}: {entry!r} is not an address or pattern (user@domain, *@domain); skipped",
                     source=source, line=number, entry=entry)
            continue
        if any(c in entry for c in "*?["):
            patterns.append(entry)
        else:
            exact.add(entry)
    return frozenset(exact), tuple(patterns)


class RecipientList:
    """The recipient list file, reloaded when it changes."""

    def __init__(self, path: str, clock: Any, check_interval: float = 2.0, reactor: Any = None,
                 threadpool: Any = None) -> None:
        self.path = path
        self.clock = clock
        self.check_interval = check_interval
        self.reactor = reactor
        self.threadpool = threadpool
        self.exact: frozenset[str] = frozenset()
        self.patterns: tuple[str, ...] = ()
        self.loaded = False
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at: float | None = None
        self.reloads = 0

    def _read_if_changed(self) -> tuple[tuple[int, int, int], str] | None:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return None
        with open(self.path, encoding="utf-8", errors="replace") as f:
            return stamp, f.read()

    async def refresh(self) -> None:
        """Re-read the file if it changed since the last look (at most every check_interval)."""
        now = self.clock.seconds()
        if self._checked_at is not None and now - self._checked_at < self.check_interval:
            return
        self._checked_at = now
        try:
            if self.threadpool is not None:
                got = await deferToThreadPool(self.reactor, self.threadpool, self._read_if_changed)
            else:
                got = self._read_if_changed()
        except OSError as e:
            log.error("recipient list {path} cannot be read ({error}); keeping the last good list",
                      path=self.path, error=e.strerror or str(e))
            return
        if got is None:
            return
        self._stamp, text = got
        self.exact, self.patterns = parse_recipient_list(text, self.path)
        self.loaded = True
        self.reloads += 1
        log.info("recipient list {path} loaded: {count} address(es), {patterns} pattern(s)",
                 path=self.path, count=len(self.exact), patterns=len(self.patterns))

    def contains(self, address: str) -> bool:
        a = address.lower()
        return a in self.exact or any(fnmatch.fnmatchcase(a, p) for p in self.patterns)


@implementer(IRecipientLookup)
class RecipientValidator:
    """Whether a recipient of an accepted domain exists: lookup hooks (the directory), then the list."""

    def __init__(self, recipient_list: RecipientList | None = None, lookups: Sequence[Lookup] = (),
                 postmaster: str = "postmaster") -> None:
        self.recipient_list = recipient_list
        self.lookups: list[Lookup] = list(lookups)
        self.postmaster = postmaster.lower()

    @property
    def enabled(self) -> bool:
        return self.recipient_list is not None or bool(self.lookups)

    def validates(self, kind: str) -> bool:
        """Whether recipients of an accepted domain of ``kind`` are checked: authoritative ones by the
        lookups or the list, internal_relay ones by the lookups (the directory knows them too)."""
        if kind == "authoritative":
            return self.enabled
        return kind == "internal_relay" and bool(self.lookups)

    async def exists(self, rcpt: Address, kind: str = "authoritative") -> bool | None:
        """True or False; None when nothing could answer (no list could ever be read)."""
        if rcpt.local.lower() == self.postmaster:
            return True
        for lookup in self.lookups:
            answer = await maybeDeferred(lookup, rcpt)
            if answer is not None:
                return bool(answer)
        if kind != "authoritative":
            return None if self.lookups else True
        if self.recipient_list is None:
            return None if self.lookups else True
        await self.recipient_list.refresh()
        if not self.recipient_list.loaded:
            return None
        return self.recipient_list.contains(f"{rcpt.local}@{rcpt.domain_key}")
