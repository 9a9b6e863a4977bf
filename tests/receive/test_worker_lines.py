"""LineBatcher: a receive worker's lines to the main process, one write per reactor iteration."""
from __future__ import annotations

import os

from twisted.internet.task import Clock

from exmta.receive.worker import LineBatcher


def test_lines_of_one_iteration_share_one_write_in_order(monkeypatch):
    r, w = os.pipe()
    try:
        clock = Clock()
        lines = LineBatcher(clock, w)
        writes = []
        real_write = os.write

        def counting_write(fd, data):
            writes.append(bytes(data))
            return real_write(fd, data)

        lines.announce("Q1")
        lines.write(b'{"t":"track","q":"Q1"}\n')
        lines.announce("Q2")
        with monkeypatch.context() as m:
            m.setattr(os, "write", counting_write)
            assert len(clock.getDelayedCalls()) == 1
            clock.advance(0)
        assert writes == [b'Q1\n{"t":"track","q":"Q1"}\nQ2\n']
        assert os.read(r, 1000) == writes[0]
        assert not clock.getDelayedCalls()
        lines.announce("Q3")
        lines.flush()  # at shutdown: written at once, the pending call cancelled
        assert os.read(r, 1000) == b"Q3\n" and not clock.getDelayedCalls()
    finally:
        os.close(r)
        os.close(w)


def test_worker_log_lines_are_relayed_whole_and_verbatim():
    from twisted.logger import formatEvent, globalLogPublisher

    from exmta.receive.workers import _WorkerProtocol

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        proto = _WorkerProtocol(owner=None, index=1)
        proto.errReceived(b"[exmta.smtp#info] session a end {not a field}\n[exmta.sm")
        proto.errReceived(b"tp#info] second\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [formatEvent(e) for e in events if e.get("index") == 1]
    assert texts == ["worker[1] [exmta.smtp#info] session a end {not a field}", "worker[1] [exmta.smtp#info] second"]
