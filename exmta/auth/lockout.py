"""Failed-login throttling: a tarpit before each failure reply, and lockout past a threshold.

Failures are counted in a sliding window per source (an IPv4 address, or the
/64 an IPv6 address is in, since one host owns a whole /64) and per user
name (case-folded, stripped) and per resolved identity (the back end's name for
the user, so variants of one name share a lock). Past ``ip_threshold`` failures from one source, or
``user_threshold`` failures for one user, further attempts are refused for
``duration`` seconds without the password being checked (Exchange's
``MaxLogonFailures``; AD's account lockout). A success clears the user's
count but not the source's, so one valid account cannot launder a source.
State is in memory, per process, and bounded; :mod:`exmta.auth.lockstore`
shares it between connectors and processes.
"""
from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

__all__ = ["LockoutSettings", "LoginThrottle", "source_key"]


@dataclass(frozen=True)
class LockoutSettings:
    tarpit: float = 5.0          # delay before a 535 (Exchange AuthTarpitInterval)
    ip_threshold: int = 10       # failures per source within window; 0 = no source lockout
    user_threshold: int = 5      # failures per user within window; 0 = no user lockout
    window: float = 600.0
    duration: float = 900.0      # how long a locked source or user is refused


def source_key(ip: str) -> str:
    """The lockout key for a client address: the address, or its /64 for IPv6."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{addr}/64", strict=False))
    return str(addr)


class _Counter:
    """Failure times in the window and the end of a lockout, for one key."""

    __slots__ = ("failures", "locked_until")

    def __init__(self) -> None:
        self.failures: deque[float] = deque()
        self.locked_until = 0.0


class LoginThrottle:
    """Counts failures and says who is locked out. Time comes from the injected clock."""

    #: most keys kept per table; the least recently used ones are forgotten first
    MAX_KEYS = 100_000

    def __init__(self, clock: IReactorTime, settings: LockoutSettings) -> None:
        self.clock = clock
        self.settings = settings
        self._sources: OrderedDict[str, _Counter] = OrderedDict()
        self._users: OrderedDict[str, _Counter] = OrderedDict()

    def _get(self, table: OrderedDict[str, _Counter], key: str, create: bool) -> _Counter | None:
        counter = table.get(key)
        if counter is None:
            if not create:
                return None
            counter = table[key] = _Counter()
            while len(table) > self.MAX_KEYS:
                table.popitem(last=False)
        else:
            table.move_to_end(key)
        return counter

    def _remaining(self, table: OrderedDict[str, _Counter], key: str) -> float:
        counter = self._get(table, key, create=False)
        if counter is None:
            return 0.0
        left = counter.locked_until - self.clock.seconds()
        return left if left > 0 else 0.0

    def source_locked(self, ip: str) -> float:
        """Seconds the source stays locked out (0 when it is not)."""
        return self._remaining(self._sources, source_key(ip))

    def user_locked(self, user: str) -> float:
        return self._remaining(self._users, user.strip().casefold())

    def identity_locked(self, identity: str) -> float:
        """Seconds the resolved identity stays locked (it shares the user table: "id:" keys)."""
        return self._remaining(self._users, "id:" + identity.strip().casefold())

    def _fail(self, table: OrderedDict[str, _Counter], key: str, threshold: int) -> bool:
        if threshold <= 0:
            return False
        now = self.clock.seconds()
        counter = self._get(table, key, create=True)
        assert counter is not None
        counter.failures.append(now)
        while counter.failures and counter.failures[0] <= now - self.settings.window:
            counter.failures.popleft()
        if len(counter.failures) >= threshold:
            counter.locked_until = now + self.settings.duration
            counter.failures.clear()
            return True
        return False

    def record_failure(self, ip: str, user: str | None, identity: str | None = None) -> tuple[bool, bool]:
        """Count one failure; returns (source now locked, user or identity now locked)."""
        src = self._fail(self._sources, source_key(ip), self.settings.ip_threshold)
        usr = self._fail(self._users, user.strip().casefold(), self.settings.user_threshold) if user else False
        if identity:
            usr = self._fail(self._users, "id:" + identity.strip().casefold(), self.settings.user_threshold) or usr
        return src, usr

    def record_success(self, user: str, identity: str | None = None) -> None:
        self._users.pop(user.strip().casefold(), None)
        if identity:
            self._users.pop("id:" + identity.strip().casefold(), None)
