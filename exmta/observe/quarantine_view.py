"""What the status page shows of the quarantine: a count and the newest entries, no content.

Built from the hold queue's envelopes the queue sampler lists anyway (every
15 s), so the page itself never lists the store. A message an operator
suspended is not quarantine (:data:`exmta.admin.quarantine.OPERATOR_HOLD`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from exmta.admin.quarantine import OPERATOR_HOLD

__all__ = ["NEWEST", "QuarantineEntry", "QuarantineSummary", "summarize"]

NEWEST = 10  #: entries kept for the page


@dataclass(frozen=True)
class QuarantineEntry:
    """One quarantined message as the page shows it (envelope facts and the reason only)."""

    queue_id: str
    received_at: float
    sender: str
    recipients: int
    reason: str


@dataclass
class QuarantineSummary:
    """How many messages are quarantined, the newest first."""

    count: int = 0
    newest: list[QuarantineEntry] = field(default_factory=list)


def summarize(envelopes: Iterable[Any], now: float, keep: int = NEWEST,
              received_of: Callable[[Any], float | None] | None = None) -> QuarantineSummary:
    """The summary of the hold queue's ``envelopes`` (operator holds left out); ``received_of(env)`` is
    when a message arrived (the sampler's rule), ``env.received_at`` by default."""
    entries = []
    for env in envelopes:
        reason = env.held_reason or ""
        if not reason or reason == OPERATOR_HOLD:
            continue
        received = (received_of(env) if received_of is not None else env.received_at) or now
        entries.append(QuarantineEntry(env.queue_id, received, env.sender or "", len(env.recipients), reason[:300]))
    entries.sort(key=lambda e: e.received_at, reverse=True)
    return QuarantineSummary(len(entries), entries[:keep])
