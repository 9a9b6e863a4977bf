"""The rules parse and run on their bounded thread pool, never on the reactor thread."""
from __future__ import annotations

import queue
import threading

from support import mime_samples as S
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer, provider

from exmta.interfaces import IRuleCondition, IRuleExtension
from exmta.message import Limits, load_message
from exmta.rules.hook import TransportRules

SEEN: list[int] = []


@provider(IRuleExtension)
class RecordThread:
    kind = "condition"

    @staticmethod
    def build(value):
        @implementer(IRuleCondition)
        class Cond:
            recipient_scoped = False

            def match(self, context):
                SEEN.append(threading.get_ident())
                return True
        return Cond()


class ThreadCallReactor(Clock):
    """A Clock whose callFromThread hands the call to the test's thread through a queue."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args, **kw):
        self.calls.put((f, args, kw))

    def run_one(self, timeout: float = 30.0) -> None:
        f, args, kw = self.calls.get(timeout=timeout)  # bounded: a hung pool fails the test
        f(*args, **kw)


def result_of(d: Deferred, reactor: ThreadCallReactor):
    out: list = []
    d.addBoth(out.append)
    while not out:
        reactor.run_one()
    return out[0]


def test_rules_run_in_the_pool(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text('[[rule]]\nname = "t"\n[rule.conditions]\nRecordThread = true\n'
                    '[rule.actions]\nPrependSubject = "[T] "\n')
    reactor = ThreadCallReactor()
    pool = ThreadPool(minthreads=0, maxthreads=2, name="test-rules")
    pool.start()
    try:
        rules = TransportRules(str(path), reactor, reactor, pool,
                               plugins={"condition": {"RecordThread": RecordThread}, "action": {}})
        decision = result_of(Deferred.fromCoroutine(rules.evaluate(S.PLAIN, sender="a@b.test",
                                                                   recipients=("c@d.test",))), reactor)
        assert decision.header_ops == [("replace", "Subject", "[T] hello")]
        assert SEEN and SEEN[-1] != threading.get_ident()
        msg = result_of(Deferred.fromCoroutine(load_message(lambda: open(path, "rb"), Limits(), reactor, pool)),
                        reactor)
        assert msg.raw == path.read_bytes()
    finally:
        pool.stop()
