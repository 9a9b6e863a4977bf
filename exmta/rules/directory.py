"""Group membership for FromMemberOf / SentToMemberOf, from the directory SMTP AUTH uses.

``[transport_rules] directory = "corp"`` names an ``[auth.corp]`` LDAP back
end; its connection settings (TLS, CA, lookup account) are reused. A
person is found by ``mail`` or ``proxyAddresses`` (``smtp:`` any case); a
group by its DN, ``mail``, ``proxyAddresses`` or ``cn``; membership is read
from the group's ``member``/``uniqueMember`` values, following nested
groups a few levels down (Exchange expands nested groups too). Answers are
cached for ``ttl`` seconds. The calls block: they run on the rules' thread
pool. A directory that cannot be reached raises, and the message gets
``451 4.3.0`` rather than a rule decided on missing facts.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from ldap3.utils.conv import escape_filter_chars

__all__ = ["DirectoryGroups", "DirectoryUnavailable"]


class DirectoryUnavailable(Exception):
    """The directory could not answer (connection, TLS, bind or search failure)."""


class DirectoryGroups:
    """``member_of(address, group)`` answered from LDAP/AD (see the module docstring)."""

    def __init__(self, checker: Any, ttl: float = 300.0, max_depth: int = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.checker = checker  # exmta.auth.ldap.LDAPChecker: its settings and its _open (TLS, bind)
        self.ttl = ttl
        self.max_depth = max_depth
        self.clock = clock
        self._cache: dict[tuple[str, str], tuple[float, bool]] = {}
        self._lock = threading.Lock()

    def member_of(self, address: str, group: str) -> bool:
        key = (address.lower(), group.lower())
        now = self.clock()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        answer = self._ask(*key)
        with self._lock:
            self._cache[key] = (now, answer)
        return answer

    # -- blocking

    def _ask(self, address: str, group: str) -> bool:
        from exmta.auth.avatar import TemporaryAuthFailure
        from exmta.auth.ldap import _close
        s = self.checker.settings
        try:
            conn = self.checker._open(s.bind_dn, s.bind_password)
        except TemporaryAuthFailure as e:
            raise DirectoryUnavailable(str(e)) from None
        if conn is False:
            raise DirectoryUnavailable(f"{s.uri}: the lookup account was refused")
        try:
            user = self._find(conn, address, by_name=False)
            if user is None:
                return False
            target = group if "=" in group else self._find(conn, group, by_name=True)
            if target is None:
                return False
            return self._contains(conn, target.lower(), user.lower(), self.max_depth, set())
        finally:
            _close(conn)

    def _search(self, conn: Any, base: str, flt: str, scope: str = "SUBTREE") -> list[dict[str, Any]]:
        import ldap3
        ok = conn.search(base, flt, search_scope=getattr(ldap3, scope), attributes=["member", "uniqueMember"],
                         size_limit=2)
        outcome = (conn.result or {}).get("description")
        if not ok and outcome not in ("success", "noSuchObject", "sizeLimitExceeded"):
            raise DirectoryUnavailable(f"{self.checker.settings.uri}: search failed: {conn.result}")
        return [e for e in conn.response or () if e.get("type") == "searchResEntry"]

    def _find(self, conn: Any, name: str, by_name: bool) -> str | None:
        v = escape_filter_chars(name)
        alternatives = f"(mail={v})(proxyAddresses=smtp:{v})" + (f"(cn={v})" if by_name else "")
        entries = self._search(conn, self.checker.settings.base_dn, f"(|{alternatives})")
        return entries[0]["dn"] if len(entries) == 1 else None  # none, or ambiguous: not a member

    def _contains(self, conn: Any, group_dn: str, user_dn: str, depth: int, seen: set[str]) -> bool:
        if depth < 0 or group_dn in seen:
            return False
        seen.add(group_dn)
        entries = self._search(conn, group_dn, "(objectClass=*)", scope="BASE")
        if not entries:
            return False
        attrs = entries[0].get("attributes") or {}
        members = [str(m).lower() for m in list(attrs.get("member") or ()) + list(attrs.get("uniqueMember") or ())]
        if user_dn in members:
            return True
        return any(self._contains(conn, m, user_dn, depth - 1, seen) for m in members if len(seen) < 200)
