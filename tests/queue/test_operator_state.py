"""Issue 10 item 6: an operator's queue suspension and redirect survive a restart of the scheduler."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from exmta.queue.operator_state import OperatorStateFile

# the Harness of test_scheduler.py (tests run with --import-mode=importlib: load it by path)
_spec = importlib.util.spec_from_file_location("_scheduler_harness_ops", Path(__file__).with_name("test_scheduler.py"))
assert _spec is not None and _spec.loader is not None
_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_harness)
Harness, FakeConnector = _harness.Harness, _harness.FakeConnector


def restarted(tmp_path: Path, made: list[tuple[str, int]] | None = None) -> Any:
    """A new scheduler (a restart) that reads the operator state from tmp_path."""
    h = Harness()
    h.scheduler.stopService()  # restore before start, as exmta.service does
    redirect = FakeConnector("redirect")
    redirect.clock = h.clock

    def make(host: str, port: int) -> FakeConnector:
        if made is not None:
            made.append((host, port))
        return redirect

    h.scheduler.restore_operator_state(OperatorStateFile(str(tmp_path)), make)
    h.scheduler.startService()
    h.redirect = redirect
    return h


def test_a_suspended_queue_stays_suspended_after_a_restart(tmp_path: Path) -> None:
    before = Harness()
    before.scheduler.restore_operator_state(OperatorStateFile(str(tmp_path)))
    before.scheduler.suspend_destination("out", "remote.example", "incident 42")
    before.stop()

    after = restarted(tmp_path)
    assert after.scheduler.suspended_destinations() == {("out", "remote.example"): "incident 42"}
    held = after.submit("u@remote.example")
    other = after.submit("w@other.example")
    after.turn()
    assert [c[0].queue_id for c in after.out.pending()] == [other]  # nothing to the suspended queue
    after.out.answer()
    assert after.store.queue_of(held) == "deferred"
    # resuming is remembered too
    after.scheduler.resume_destination("out", "remote.example")
    assert restarted(tmp_path).scheduler.suspended_destinations() == {}


def test_a_redirect_stays_in_force_after_a_restart(tmp_path: Path) -> None:
    before = Harness()
    before.scheduler.restore_operator_state(OperatorStateFile(str(tmp_path)))
    before.scheduler.set_redirect("redirect", FakeConnector("redirect"), "[192.0.2.7]:2525")
    before.stop()
    assert json.loads((tmp_path / "operator.json").read_text())["redirect"] == {
        "name": "redirect", "target": "[192.0.2.7]:2525"}

    made: list[tuple[str, int]] = []
    after = restarted(tmp_path, made)
    assert made == [("192.0.2.7", 2525)]
    assert after.scheduler.redirect == ("redirect", "[192.0.2.7]:2525")
    qid = after.submit("u@remote.example")
    after.turn()
    assert after.out.pending() == []
    [(request, _, _)] = after.redirect.pending()
    assert request.queue_id == qid and request.nexthop == "[192.0.2.7]:2525"
    after.scheduler.set_redirect(None)
    assert restarted(tmp_path).scheduler.redirect is None


def test_an_unreadable_state_file_restores_nothing_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "operator.json").write_text("{not json")
    h = restarted(tmp_path)
    assert h.scheduler.suspended_destinations() == {} and h.scheduler.redirect is None
