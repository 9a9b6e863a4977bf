"""Synchronous stand-ins for unit tests: a reactor, a thread pool and a blocking-call runner that run work at once.

``deferToThreadPool(SyncReactor(), SyncPool(), f)`` then fires before it
returns, so tests of thread-pool code (the spool, maildir, pickup) need no
real threads and no global reactor; ``result``/``failure`` read the outcome
of an already fired Deferred.
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure


class SyncReactor:
    """Runs callFromThread at once (stand-in reactor for deferToThreadPool)."""

    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:
        f(*a, **kw)


class SyncPool:
    """A thread pool stand-in that runs each job at once, on the calling thread; counts jobs."""

    def __init__(self) -> None:
        self.jobs = 0

    def callInThreadWithCallback(
        self, on_result: Callable[..., Any], f: Callable[..., Any], *a: Any, **kw: Any
    ) -> None:
        self.jobs += 1
        try:
            r = f(*a, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, r)


def result(d: Deferred[Any]) -> Any:
    """The value of an already fired Deferred; re-raises its failure."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def failure(d: Deferred[Any]) -> Failure:
    """The Failure of an already fired Deferred (asserts that it failed)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out and isinstance(out[0], Failure), f"expected a failure, got {out}"
    return out[0]


def run_inline(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """A blocking-call runner (what ``exmta.auth.smtp.blocking_runner`` returns) that runs ``f`` at once."""
    return maybeDeferred(f, *args)
