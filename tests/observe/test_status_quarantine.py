"""The status page lists the quarantine: the count and the newest entries (reason, sender, age) from the queue
sampler's listing, HTML-escaped, operator holds left out, no message content."""
from __future__ import annotations

from typing import Any

from twisted.internet import task

from exmta.admin.quarantine import OPERATOR_HOLD
from exmta.admin.status import render_status
from exmta.admin.status.quarantine import render_quarantine
from exmta.model import Envelope, Recipient
from exmta.observe import metrics as m
from exmta.observe.alerts import AlertManager, Sources
from exmta.observe.quarantine_view import NEWEST, summarize
from exmta.testing.memstore import MemoryStore

SECRET_BODY = b"Subject: quarterly numbers\r\n\r\nthe secret body text\r\n"


def _held(store: MemoryStore, clock: task.Clock, sender: str, reason: str, age: float) -> str:
    env = Envelope(sender=sender, recipients=[Recipient("bob@example.test")], received_at=clock.seconds() - age,
                   held_reason=reason)
    return store.submit(SECRET_BODY, env).result


def _page(clock: task.Clock, snap: m.QueueSnapshot | None) -> str:
    obs: Any = type("Obs", (), {})()
    obs.reactor = clock
    obs.config = type("C", (), {"hostname": "mx.example.test"})()
    obs.started, obs.stopping = True, False
    obs.sampler = type("S", (), {"snapshot": snap})()
    obs.alerts = AlertManager(clock, [], Sources())
    obs.throughput = m.Throughput(clock)
    obs.history = []
    obs.paths = {"tracking": "/nonexistent"}
    return render_status(obs)


def test_the_sampler_summarises_the_quarantine_and_the_page_shows_it() -> None:
    clock = task.Clock()
    clock.advance(1_800_000_000)
    store = MemoryStore(clock)
    old = _held(store, clock, "alice@example.org", "attachment filter in: true-type: run.exe", 7200)
    new = _held(store, clock, "<script>@evil.test",
                'attachment filter in: rtlo-name: <img src=x onerror="alert(1)">.exe', 90)
    _held(store, clock, "carol@example.org", OPERATOR_HOLD, 30)  # an operator's hold: not quarantine
    sampler = m.QueueSampler(store, None, clock, interval=15)
    sampler.start()
    snap = sampler.snapshot
    assert snap is not None and snap.by_queue["hold"] == 3
    assert snap.quarantine.count == 2 and [e.queue_id for e in snap.quarantine.newest] == [new, old]
    sampler.stop()

    page = _page(clock, snap)
    section = page[page.index('<div id="quarantine">'):]
    section = section[:section.index("</div>") + 6]
    assert 'data-count="2"' in section and old in section and new in section
    assert "alice@example.org" in section and "true-type: run.exe" in section and "2h" in section
    assert "&lt;script&gt;@evil.test" in section and "&lt;img src=x" in section
    assert "<script>" not in page and "<img" not in page
    assert "carol@example.org" not in section
    assert "quarterly numbers" not in page and "secret body" not in page  # no content


def test_empty_not_yet_listed_and_bounded() -> None:
    clock = task.Clock()
    assert "The quarantine is empty." in _page(clock, m.QueueSnapshot(0.0))
    assert "has not been listed yet" in render_quarantine(None, 0.0)
    many = [Envelope(sender=f"s{i}@x.test", recipients=[], queue_id=f"Q{i:03d}", received_at=float(i + 1),
                     held_reason="attachment filter: macro") for i in range(50)]
    summary = summarize(many, 100.0)
    assert summary.count == 50 and len(summary.newest) == NEWEST and summary.newest[0].queue_id == "Q049"
    html = render_quarantine(summary, 100.0)
    assert "<b>50</b> message(s) quarantined; the newest 10" in html and html.count('class="quarantined"') == 10
