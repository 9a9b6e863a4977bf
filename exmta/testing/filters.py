"""Test helpers for filter plugin authors: run a filter phase without a network or a reactor.

Example::

    from exmta.model import Action, Address, Session, Transaction
    from exmta.testing import FilterHarness, MessageView

    def test_external_subject_tagged():
        h = FilterHarness(SubjectTagger, {"tag": "[EXT]"})
        msg = MessageView(b"Subject: hello\\r\\n\\r\\nbody\\r\\n")
        verdict = h.run("data", h.session(), h.transaction("a@x.test", "b@y.test"), msg)
        assert verdict.action is Action.CONTINUE
        assert msg.edits.ops == [("replace", "Subject", "[EXT] hello")]

The harness runs the filter through the same :class:`FilterChain` as the
server (so a timeout or an exception becomes ``451 4.3.0`` exactly as in
production) on a :class:`twisted.internet.task.Clock`. Use ``raw=True`` to
see a filter's exception instead.
"""
from __future__ import annotations

from typing import Any, Mapping

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from exmta.filters.base import FilterChain, MessageView, call_hook
from exmta.model import Address, MailParams, RcptParams, Session, Transaction, TransactionView, Verdict

__all__ = ["FilterHarness", "HarnessEnv", "MessageView"]


class HarnessEnv:
    """What ``from_config`` gets as ``env`` in tests: the clock as reactor, no thread pool."""

    def __init__(self, clock: Clock, hostname: str = "mx.example.test", data_dir: str = ".") -> None:
        self.reactor = clock
        self.clock = clock
        self.threadpool = None
        self.hostname = hostname
        self.data_dir = data_dir


class FilterHarness:
    """Builds one filter and runs its phases synchronously.

    ``filter_or_factory`` is a filter instance, or a factory (anything with
    ``from_config(name, config, env)``) that is built with ``config``.
    """

    def __init__(
        self,
        filter_or_factory: Any,
        config: Mapping[str, Any] | None = None,
        *,
        name: str = "test",
        timeout: float = 30.0,
        on_error: str = "tempfail",
        clock: Clock | None = None,
        hostname: str = "mx.example.test",
    ) -> None:
        self.clock = clock or Clock()
        self.env = HarnessEnv(self.clock, hostname)
        if isinstance(filter_or_factory, type) or config is not None:
            self.filter = filter_or_factory.from_config(name, dict(config or {}), self.env)
        else:
            self.filter = filter_or_factory
        self.chain = FilterChain([self.filter], self.clock, timeout=timeout, on_error=on_error)

    def run(self, phase: str, *args: Any, raw: bool = False) -> Verdict:
        """Run ``on_<phase>`` and return its Verdict.

        With ``raw=False`` (the default) this is the chain's result: a
        filter that has not answered within ``timeout`` seconds of the
        harness clock, or raised, gives the chain's 451. With ``raw=True``
        the filter's own result or exception comes back unchanged.
        """
        if raw:
            d: Deferred[Any] = call_hook(getattr(self.filter, "on_" + phase), *args)
        else:
            d = self.chain.run(phase, *args)
        results: list[Any] = []
        d.addBoth(results.append)
        if not results:
            self.clock.advance(self.chain.timeout)
        if not results:
            d.cancel()
        result = results[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    # -- small builders for the arguments

    @staticmethod
    def session(peer_ip: str = "192.0.2.1", helo: str | None = "client.example.test", **kw: Any) -> Session:
        return Session(peer_ip=peer_ip, helo_name=helo, esmtp=True, session_id="test", **kw)

    @staticmethod
    def transaction(sender: str = "sender@example.test", *recipients: str,
                    params: MailParams | None = None) -> TransactionView:
        """The read-only view the server gives filters (a filter that edits it fails here too)."""
        return Transaction(
            Address.parse_simple(sender), params or MailParams(),
            [(Address.parse_simple(r), RcptParams()) for r in recipients],
        ).view()
