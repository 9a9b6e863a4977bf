"""exmta.receive.ratelimit.RateCounter on a task.Clock."""
from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from exmta.receive.ratelimit import RateCounter


def test_limit_within_a_minute_then_the_window_slides():
    clock = Clock()
    c = RateCounter(3, clock)
    for _ in range(3):
        assert c.allows("a")
        c.add("a")
    assert not c.allows("a")
    assert c.allows("b")
    clock.advance(30)
    assert not c.allows("a")
    clock.advance(31)          # a new fixed window; the old one still weighs (1 - 1/60) * 3
    assert not c.allows("a")
    clock.advance(30)          # 31 s into the new window: 3 * (1 - 31/60) events estimated
    assert c.allows("a") and c.current("a") == pytest.approx(1.45)
    clock.advance(120)
    assert c.current("a") == 0.0


def test_no_burst_of_twice_the_limit_at_a_window_boundary():
    clock = Clock()
    c = RateCounter(10, clock)
    clock.advance(59)
    for _ in range(10):
        c.add("a")
    clock.advance(2)           # just past the boundary of the fixed window
    assert not c.allows("a")


def test_zero_means_no_limit_and_nothing_is_kept():
    c = RateCounter(0, None)
    for _ in range(1000):
        assert c.allows("a")
        c.add("a")
    assert len(c) == 0


def test_memory_is_bounded():
    clock = Clock()
    c = RateCounter(5, clock, max_keys=100)
    for i in range(1000):
        c.add(f"k{i}")
    assert len(c) <= 100
    clock.advance(200)
    c.add("fresh")             # idle keys are swept once a window
    assert len(c) == 1
