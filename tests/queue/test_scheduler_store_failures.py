"""Issue 10 items 2 and 7: a DSN that cannot be queued and a state that cannot be stored are never dropped."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from twisted.internet import defer

from exmta.model import Envelope, Outcome, RecipientStatus
from exmta.queue import outcomes as scheduler_module  # make_dsn of the DSN path (exmta.queue.outcomes)

# the Harness of test_scheduler.py (tests run with --import-mode=importlib: load it by path)
_spec = importlib.util.spec_from_file_location("_scheduler_harness", Path(__file__).with_name("test_scheduler.py"))
assert _spec is not None and _spec.loader is not None
_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_harness)
Harness, NO_SUCH_USER, START = _harness.Harness, _harness.NO_SUCH_USER, _harness.START


def failing_dsn_submits(h: Harness, failures: int) -> list[float]:
    """Make the first ``failures`` submits of a DSN fail as on a full disk; returns when they were tried."""
    real_submit = h.store.submit
    tried: list[float] = []

    def submit(content: bytes, env: Envelope) -> defer.Deferred[Any]:
        if env.kind == "dsn" and len(tried) < failures:
            tried.append(h.clock.seconds() - START)
            return defer.fail(OSError(28, "No space left on device"))
        return real_submit(content, env)

    h.store.submit = submit  # type: ignore[method-assign]
    return tried


def test_bounce_that_cannot_be_queued_keeps_the_message_and_is_retried() -> None:
    h = Harness(dsn_retry=60.0)
    tried = failing_dsn_submits(h, 2)
    qid = h.submit("nobody@remote.example")
    h.turn()
    h.out.answer(outcome=Outcome.FAILED, reply=NO_SUCH_USER)
    # the recipient is final, but its bounce is not queued: the message stays, with the DSN owed
    assert h.store.queue_of(qid) == "deferred"
    [r] = h.store.envelope(qid).recipients
    assert r.status is RecipientStatus.FAILED and r.dsn_due == "failed"
    assert h.dsns() == []
    h.at(60)
    assert h.store.queue_of(qid) == "deferred" and h.dsns() == []
    h.at(120)
    [(_, dsn_env, _)] = h.dsns()
    assert [x.address for x in dsn_env.recipients] == ["a@sender.example"]
    assert h.store.queue_of(qid) is None  # removed once the DSN was committed
    assert tried == [0.0, 60.0]
    assert h.tracker.ids(qid) == ["FAIL", "DSN"]  # the recipient is not tried again
    assert len(h.out.pending()) == 1 and h.out.pending()[0][0].envelope.kind == "dsn"
    h.out.answer()
    h.stop()


def test_bounce_that_cannot_be_built_is_kept_and_ends_in_hold(monkeypatch) -> None:
    h = Harness(dsn_retry=60.0)

    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("bug in make_dsn")

    monkeypatch.setattr(scheduler_module, "make_dsn", broken)
    qid = h.submit("nobody@remote.example")
    h.turn()
    h.out.answer(outcome=Outcome.FAILED, reply=NO_SUCH_USER)
    assert h.store.queue_of(qid) == "deferred"
    for step in range(1, 6):
        h.at(60 * step)
    # poison_threshold is 3: held for an operator, the bounce still owed
    assert h.store.queue_of(qid) == "hold"
    [r] = h.store.envelope(qid).recipients
    assert r.dsn_due == "failed"
    h.stop()


def test_state_that_cannot_be_stored_for_minutes_is_retried_until_stored() -> None:
    h = Harness(claim_retry=5.0)
    real_update = h.store.update
    failures: list[float] = []

    def full_disk_update(queue_id: str, env: Envelope, next_attempt: float | None) -> defer.Deferred[Any]:
        if h.clock.seconds() - START < 300:  # the disk stays full for five minutes
            failures.append(h.clock.seconds() - START)
            return defer.fail(OSError(28, "No space left on device"))
        return real_update(queue_id, env, next_attempt)

    h.store.update = full_disk_update  # type: ignore[method-assign]
    qid = h.submit("a@remote.example")
    h.turn()
    h.out.answer(outcome=Outcome.DEFERRED)
    for t in range(0, 400, 5):
        h.at(t)
    # backoff 5, 10, 20, 40, then at most 60 s between tries; never given up
    assert failures[:6] == [0.0, 5.0, 15.0, 35.0, 75.0, 135.0]
    assert len(failures) >= 7
    # stored at 315 s (deferred, due at 300 s), so claimed and tried again at once: not stranded
    [(request, _, _)] = h.out.pending()
    assert request.queue_id == qid and request.recipients[0].attempts == 2
    h.out.answer()
    assert h.store.queue_of(qid) is None
    h.stop()


def test_waiting_state_write_is_tried_at_once_when_a_commit_shows_space() -> None:
    h = Harness(claim_retry=5.0)
    real_update = h.store.update
    full = {"disk": True}
    tried: list[float] = []

    def update(queue_id: str, env: Envelope, next_attempt: float | None) -> defer.Deferred[Any]:
        tried.append(h.clock.seconds() - START)
        if full["disk"]:
            return defer.fail(OSError(28, "No space left on device"))
        return real_update(queue_id, env, next_attempt)

    h.store.update = update  # type: ignore[method-assign]
    qid = h.submit("a@remote.example")
    h.turn()
    h.out.answer()
    h.at(5)
    h.at(7)
    assert tried == [0.0, 5.0]  # the next try would be at 15 s
    full["disk"] = False
    h.submit("b@remote.example")  # a commit succeeded: there is space again
    h.at(7)
    assert tried == [0.0, 5.0, 7.0]
    assert h.store.queue_of(qid) is None
    h.out.answer()
    h.stop()
