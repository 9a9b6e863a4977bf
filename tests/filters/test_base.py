"""exmta.filters.base: the chain's ordering, timeouts and errors; header edits; the message view."""
from __future__ import annotations

import io

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer, provider
from zope.interface.verify import verifyObject

from exmta.filters import FilterBase, FilterChain, HeaderEdits, MessageView
from exmta.filters.base import FILTER_ERROR, header_block_length
from exmta.interfaces import IFilterFactory, IMessageFilter, IMessageView
from exmta.model import Action, Verdict
from exmta.testing import FilterHarness


class Fixed(FilterBase):
    def __init__(self, name: str, verdict: Verdict, log: list[str]) -> None:
        self.name, self.verdict, self.log = name, verdict, log

    def on_mail(self, session, sender, params):
        self.log.append(self.name)
        return self.verdict


def run(chain: FilterChain, phase: str = "mail", *args):
    results: list = []
    chain.run(phase, *(args or (None, None, None))).addBoth(results.append)
    return results


def test_filter_base_provides_the_interface_and_continues():
    f = FilterBase()
    assert verifyObject(IMessageFilter, f)
    assert f.on_connect(None) is Verdict.CONTINUE
    assert f.on_data(None, None, None) is Verdict.CONTINUE


def test_first_non_continue_wins_and_later_filters_do_not_run():
    log: list[str] = []
    chain = FilterChain([
        Fixed("a", Verdict.CONTINUE, log),
        Fixed("b", Verdict.ACCEPT, log),  # filters cannot accept: treated as CONTINUE
        Fixed("c", Verdict.reject(550, "5.7.1", "no"), log),
        Fixed("d", Verdict.tempfail(), log),
    ], Clock())
    [verdict] = run(chain)
    assert str(verdict.reply) == "550 5.7.1 no"
    assert log == ["a", "b", "c"]


def test_all_continue_and_accept_give_continue():
    log: list[str] = []
    chain = FilterChain([Fixed("a", Verdict.ACCEPT, log)], Clock())
    assert run(chain) == [Verdict.CONTINUE]
    assert run(FilterChain([], Clock())) == [Verdict.CONTINUE]


class Async(FilterBase):
    name = "async"

    def __init__(self) -> None:
        self.pending: Deferred | None = None

    async def on_helo(self, session):
        self.pending = Deferred()
        return await self.pending

    def on_mail(self, session, sender, params):
        raise RuntimeError("boom")

    def on_rcpt(self, session, txn, rcpt, params):
        return "reject"  # not a Verdict

    def on_data(self, session, txn, message):
        return succeed(Verdict.discard())


def test_coroutines_and_deferreds_are_awaited():
    f = Async()
    clock = Clock()
    chain = FilterChain([f], clock)
    results = run(chain, "helo", None)
    assert results == []
    f.pending.callback(Verdict.reject())
    assert results[0].action is Action.REJECT
    assert run(chain, "data", None, None, None)[0].action is Action.DISCARD


def test_timeout_gives_451_and_cancels_the_filter():
    f = Async()
    clock = Clock()
    chain = FilterChain([f], clock, timeout=5)
    results = run(chain, "helo", None)
    clock.advance(5)
    assert results == [FILTER_ERROR]
    assert str(FILTER_ERROR.reply).startswith("451 4.3.0")
    assert f.pending.called  # cancelled
    assert clock.getDelayedCalls() == []


def test_exceptions_and_bad_results_give_451_or_continue():
    chain = FilterChain([Async()], Clock())
    assert run(chain, "mail") == [FILTER_ERROR]
    assert run(chain, "rcpt", None, None, None, None) == [FILTER_ERROR]
    lenient = FilterChain([Async()], Clock(), on_error="continue")
    assert run(lenient, "mail") == [Verdict.CONTINUE]
    with pytest.raises(ValueError):
        FilterChain([], Clock(), on_error="ignore")
    with pytest.raises(ValueError):
        chain.run("quit")


# ------------------------------------------------------------ header edits and the view


def test_header_block_length():
    assert header_block_length(b"A: 1\r\nB: 2\r\n\r\nbody") == 12
    assert header_block_length(b"A: 1\r\n folded\r\n\r\n") == 15
    assert header_block_length(b"no header here\r\n") == 0
    assert header_block_length(b"A: 1\r\nnot a header\r\n") == 6
    assert header_block_length(b" leading space: x\r\n") == 0
    assert header_block_length(b"A: 1") == 0


def test_edits_keep_untouched_fields_byte_exact():
    block = b"Received: x\r\nSubject: old\r\nDKIM-Signature: v=1;\r\n\tb=abc\r\nsubject: second\r\n"
    edits = HeaderEdits()
    edits.replace_header("Subject", "new")
    edits.insert_header("Authentication-Results", "mx; none")
    edits.add_header("X-Tag", "1")
    edits.remove_header("Received")
    assert edits.apply(block) == (
        b"Authentication-Results: mx; none\r\nSubject: new\r\nDKIM-Signature: v=1;\r\n\tb=abc\r\n"
        b"subject: second\r\nX-Tag: 1\r\n"
    )
    edits2 = HeaderEdits()
    edits2.replace_header("X-Missing", "added")
    assert edits2.apply(b"A: 1\r\n") == b"A: 1\r\nX-Missing: added\r\n"


@pytest.mark.parametrize("name, value", [("Bad Name", "x"), ("X", "a\r\nBcc: evil@x"), ("X", "a\nb"), ("", "x")])
def test_edits_refuse_header_injection(name, value):
    with pytest.raises(ValueError):
        HeaderEdits().add_header(name, value)


class FakeWriter:
    def __init__(self, data: bytes) -> None:
        self.buf = bytearray(data)

    def replace_headers(self, old_length: int, new: bytes) -> None:
        self.buf[:old_length] = new


def test_message_view_from_bytes_and_from_an_opener():
    data = b"Subject: hello\r\nMessage-ID: <x@y>\r\n\r\nbody\r\n"
    view = MessageView(data)
    assert verifyObject(IMessageView, view)
    assert view.headers["Subject"] == "hello" and view.size == len(data)
    assert view.open_body().read() == data
    opened = MessageView(lambda: io.BytesIO(data), size=len(data))
    assert opened.headers["Message-ID"] == "<x@y>"
    opened.edits.replace_header("Subject", "[EXT] hello")
    writer = FakeWriter(data)
    assert opened.apply_edits(writer) == 6
    assert bytes(writer.buf) == b"Subject: [EXT] hello\r\nMessage-ID: <x@y>\r\n\r\nbody\r\n"
    assert MessageView(b"no headers\r\n").apply_edits(writer) == 0


# ------------------------------------------------------------ the harness (the plugin-author API)


@implementer(IMessageFilter)
@provider(IFilterFactory)
class SubjectTagger(FilterBase):
    def __init__(self, name: str, tag: str) -> None:
        self.name, self.tag = name, tag

    @classmethod
    def from_config(cls, name, config, env):
        assert env.hostname and env.clock is not None
        return cls(name, config.get("tag", "[EXTERNAL]"))

    async def on_data(self, session, txn, message):
        if session.auth_identity is None:
            subject = message.headers.get("Subject", "")
            if not subject.startswith(self.tag):
                message.edits.replace_header("Subject", f"{self.tag} {subject}")
        return Verdict.CONTINUE

    def on_helo(self, session):
        return Deferred()  # never answers

    def on_mail(self, session, sender, params):
        raise KeyError("bug")


def test_harness_runs_the_architecture_example():
    h = FilterHarness(SubjectTagger, {"tag": "[EXT]"})
    msg = MessageView(b"Subject: hello\r\n\r\nbody\r\n")
    verdict = h.run("data", h.session(), h.transaction("a@x.test", "b@y.test"), msg)
    assert verdict.action is Action.CONTINUE
    assert msg.edits.ops == [("replace", "Subject", "[EXT] hello")]


def test_harness_timeouts_and_raw_errors():
    h = FilterHarness(SubjectTagger("t", "[X]"), timeout=3)
    assert h.run("helo", h.session()) == FILTER_ERROR
    assert h.run("mail", h.session(), None, None) == FILTER_ERROR
    with pytest.raises(KeyError):
        h.run("mail", h.session(), None, None, raw=True)
    with pytest.raises(Exception):
        h.run("helo", h.session(), raw=True)  # cancelled after the timeout
    assert h.clock.getDelayedCalls() == []


def test_per_filter_timeout_and_on_error_override_the_chain():
    slow, broken = Async(), Async()
    slow.name, broken.name = "slow", "broken"
    clock = Clock()
    chain = FilterChain([slow], clock, timeout=30, per_filter={
        "slow": {"plugin": "x", "timeout": 2, "on_error": "continue"},
        "other": {"plugin": "y"},
    })
    results = run(chain, "helo", None)
    clock.advance(2)
    assert results == [Verdict.CONTINUE]
    assert chain.settings_for(broken) == (30, "tempfail")
    with pytest.raises(ValueError):
        FilterChain([], clock, per_filter={"x": {"on_error": "explode"}})
    with pytest.raises(ValueError):
        FilterChain([], clock, per_filter={"x": {"timeout": 0}})


def test_remove_headers_with_prefix():
    edits = HeaderEdits()
    edits.remove_headers_with_prefix("X-MS-Exchange-Organization-")
    block = b"x-ms-exchange-organization-scl: 1\r\nX-MS-Exchange-Organization-AuthAs: x\r\n continued\r\nA: 1\r\n"
    assert edits.apply(block) == b"A: 1\r\n"

