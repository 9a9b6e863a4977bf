"""run_coroutine: Deferred.fromCoroutine's contract without its set-up cost (exmta.coroutines)."""
from __future__ import annotations


def _outcome(d):
    out = []
    d.addBoth(out.append)
    return out


def test_run_coroutine_that_never_waits_fires_at_once():
    from exmta.coroutines import run_coroutine

    async def quick():
        return 7

    assert _outcome(run_coroutine(quick())) == [7]


def test_run_coroutine_resumes_with_results_and_raises_failures_at_the_await():
    from twisted.internet.defer import Deferred

    from exmta.coroutines import run_coroutine

    first, second = Deferred(), Deferred()

    async def two_waits():
        got = await first
        try:
            await second
        except KeyError as e:
            return (got, "caught " + str(e))

    out = _outcome(run_coroutine(two_waits()))
    assert out == []
    first.callback("one")
    assert out == []
    second.errback(KeyError("k"))
    assert out == [("one", "caught 'k'")]
    assert _outcome(second) == [None], "the failure was handed to the coroutine, not left unhandled"


def test_run_coroutine_failure_and_cancellation_and_bad_awaitable():
    import asyncio

    from twisted.internet.defer import CancelledError, Deferred
    from twisted.python.failure import Failure

    from exmta.coroutines import run_coroutine

    pending = Deferred()

    async def fails_after_wait():
        await pending
        raise ValueError("boom")

    out = _outcome(run_coroutine(fails_after_wait()))
    pending.callback(None)
    assert isinstance(out[0], Failure) and out[0].check(ValueError)

    never = Deferred()

    async def waits_forever():
        await never

    d = run_coroutine(waits_forever())
    d.cancel()
    out = _outcome(d)
    assert isinstance(out[0], Failure) and out[0].check(CancelledError)
    assert never.called, "cancelling the run cancels what it awaits"

    async def awaits_a_future():
        await asyncio.sleep(0)

    out = _outcome(run_coroutine(awaits_a_future()))
    assert isinstance(out[0], Failure) and out[0].check(TypeError)
