"""Recipient validation against LDAP / Active Directory (issue 10 item 13), cached.

An Exchange edge knows the organisation's recipients and refuses unknown
ones at RCPT (``550 5.1.1``) rather than accepting and bouncing later. Here
the directory of an ``[auth.NAME]`` LDAP back end (``[server]
recipient_directory``) is searched with the lookup account for an entry
whose ``mail`` or ``proxyAddresses`` (``smtp:``, any case) is the recipient.
Answers are cached for ``recipient_cache_ttl`` seconds (both kinds, at most
:data:`MAX_CACHED` addresses; concurrent lookups of one address share one
search). A directory that cannot be reached raises, and the policy answers
``451 4.3.0``: never a bounce for a lookup that did not happen.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from exmta.model import Address

__all__ = ["DirectoryRecipients", "MAX_CACHED"]

log = Logger()
MAX_CACHED = 50_000


class DirectoryRecipients:
    """A RecipientValidator lookup: ``lookup(rcpt)`` -> Deferred[bool] (exists in the directory)."""

    def __init__(self, search: Callable[[str], bool], run_blocking: Callable[..., Deferred], clock: Any,
                 ttl: float = 60.0) -> None:
        """``search(address)`` blocks (on ``run_blocking``'s pool) and says whether an entry has it."""
        self.search = search
        self.run_blocking = run_blocking
        self.clock = clock
        self.ttl = ttl
        self._cache: OrderedDict[str, tuple[bool, float]] = OrderedDict()
        self._pending: dict[str, list[Deferred[bool]]] = {}
        self.searches = 0

    def __call__(self, rcpt: Address) -> Deferred[bool]:
        return self.lookup(f"{rcpt.local}@{rcpt.domain_key}")

    def lookup(self, address: str) -> Deferred[bool]:
        key = address.lower()
        now = self.clock.seconds()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            self._cache.move_to_end(key)
            return succeed(hit[0])
        waiter: Deferred[bool] = Deferred()
        waiting = self._pending.get(key)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._pending[key] = [waiter]
        self.searches += 1
        d = self.run_blocking(self.search, address)
        d.addCallbacks(self._found, self._failed, callbackArgs=(key,), errbackArgs=(key,))
        return waiter

    def _found(self, exists: bool, key: str) -> None:
        self._cache[key] = (bool(exists), self.clock.seconds() + self.ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        for d in self._pending.pop(key, ()):
            d.callback(bool(exists))

    def _failed(self, failure: Any, key: str) -> None:
        log.error("recipient directory lookup failed: {error}", error=failure.getErrorMessage())
        for d in self._pending.pop(key, ()):
            d.errback(failure)
