"""File descriptors for sessions: raise ``RLIMIT_NOFILE`` at start and keep sessions below it (issue 11 item 9).

The default ``max_connections = 5000`` was above the usual soft limit of
1024, and exmta never raised it: idle sessions filled the descriptors and
every other client, the spool and the deliveries got EMFILE. At start the
soft limit is raised to the hard limit; if the connectors' ``max_connections``
together still do not fit in three quarters of it (the rest is for the
spool, logs, DNS and deliveries), one process-wide cap on open sessions
keeps them there, with a warning naming the figures.
"""
from __future__ import annotations

import resource
from typing import Any, Sequence

from twisted.logger import Logger

__all__ = ["raise_nofile", "session_budget"]

log = Logger()


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warn("cannot raise the open files limit from {soft} to {hard}: {error}", soft=soft, hard=hard,
                     error=e)
    return soft, hard


def session_budget(connectors: Sequence[Any], soft: int) -> int:
    """The most sessions the process may hold open at once (0 = no cap needed)."""
    usable = soft * 3 // 4 if soft != resource.RLIM_INFINITY else 0
    if not usable:
        return 0
    wanted = sum(rc.max_connections for rc in connectors) if all(rc.max_connections for rc in connectors) else 0
    if wanted and wanted <= usable:
        return 0
    log.warn("open files limit {soft}: sessions capped at {cap} in this process (max_connections asks for "
             "{wanted}); raise the limit (LimitNOFILE= in systemd) to allow more",
             soft=soft, cap=usable, wanted=wanted or "no limit")
    return usable
