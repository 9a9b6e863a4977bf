"""Exchange's spam confidence level (SCL) from a spam verdict, and what a connector does with it.

Exchange files a message in Junk by ``X-MS-Exchange-Organization-SCL``:
``-1`` for trusted sources (it skipped spam filtering), ``0``-``1`` not spam,
``5``-``6`` spam, ``7``-``9`` high confidence spam (Outlook's junk threshold
is 4 by default). :func:`scl_for_score` maps a scanner's score onto that
scale relative to the scanner's own thresholds (documented in docs/spam.rst)::

    score <= 0                     -> 0
    0 < score < spam               -> 1 .. 4   (linear)
    spam <= score < reject         -> 5 .. 6   (linear)
    score >= reject                -> 7, then one more per (reject - spam) above it, at most 9

and never below the scanner's own action: ``reject`` is at least 7, ``add
header`` and ``rewrite subject`` at least 5. :class:`SclPolicy` holds a
connector's thresholds (reject at or above R, quarantine at or above Q).

Trust: the header firewall in the SMTP server removes the organisation
header families from every session its connector does not trust *before*
filters run, so a client's own SCL never passes from an untrusted source;
:func:`connector_trusts_org_headers` reads that decision back from the view's
header journal, and the SCL a filter writes comes after the firewall's removal
in the journal, so it is the one that stays.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["ORG_PREFIX", "SCL_HEADER", "SclPolicy", "connector_trusts_org_headers", "existing_scl",
           "in_networks", "scl_for_score", "set_scl"]

SCL_HEADER = "X-MS-Exchange-Organization-SCL"
ORG_PREFIX = "X-MS-Exchange-Organization-"
#: rspamd's default "add header" threshold, the start of "spam" when a scanner gives no other
DEFAULT_SPAM_SCORE = 6.0


def scl_for_score(score: float, spam_score: float, reject_score: float, action: str | None = None) -> int:
    """The SCL (0..9) of ``score`` given the scanner's spam and reject thresholds (module docstring)."""
    reject = reject_score if reject_score > 0 else 15.0
    spam = spam_score if 0 < spam_score < reject else reject * 0.4
    if score <= 0:
        scl = 0
    elif score < spam:
        scl = 1 + int(4 * score / spam)
    elif score < reject:
        scl = 5 + int(2 * (score - spam) / (reject - spam))
    else:
        scl = 7 + int((score - reject) / (reject - spam))
    scl = max(0, min(9, scl))
    if action == "reject":
        scl = max(scl, 7)
    elif action in ("add header", "rewrite subject"):
        scl = max(scl, 5)
    return scl


@dataclass(frozen=True)
class SclPolicy:
    """One connector's SCL thresholds: reject at or above ``reject_at``, quarantine at or above
    ``quarantine_at`` (None: never), deliver with the SCL header otherwise."""

    reject_at: int | None = 7
    quarantine_at: int | None = None

    def outcome(self, scl: int) -> str:
        """"reject", "quarantine" or "deliver" for a message of this SCL (-1 is always delivered)."""
        if scl < 0:
            return "deliver"
        if self.reject_at is not None and scl >= self.reject_at:
            return "reject"
        if self.quarantine_at is not None and scl >= self.quarantine_at:
            return "quarantine"
        return "deliver"


def connector_trusts_org_headers(view: Any) -> bool:
    """Whether the receive connector let this session bring X-MS-Exchange-Organization-* headers.

    The server journals ``remove_prefix X-MS-Exchange-Organization-`` for
    every session its connector does not trust (Exchange's
    Ms-Exch-Accept-Headers-Organization), before any filter runs.
    """
    for op in getattr(getattr(view, "edits", None), "ops", ()):
        if op[0] == "remove_prefix" and ORG_PREFIX.lower().startswith(str(op[1]).lower()):
            return False
    return True


def existing_scl(view: Any) -> int | None:
    """A valid SCL the message already carries (-1..9), or None."""
    for value in view.field_values(SCL_HEADER):
        try:
            scl = int(str(value).strip())
        except ValueError:
            continue
        if -1 <= scl <= 9:
            return scl
    return None


def set_scl(view: Any, scl: int) -> None:
    """Write the SCL into the view's header journal (every earlier SCL field goes)."""
    view.edits.remove_header(SCL_HEADER)
    view.edits.add_header(SCL_HEADER, str(int(scl)))


def in_networks(ip: str, networks: Iterable[Any]) -> bool:
    """Whether ``ip`` (text, IPv4-mapped IPv6 allowed) is in one of ``networks`` (ip_network objects)."""
    try:
        addr = ipaddress.ip_address(re.sub(r"^::ffff:(?=\d+\.)", "", ip or "", flags=re.IGNORECASE))
    except ValueError:
        return False
    return any(addr.version == net.version and addr in net for net in networks)
