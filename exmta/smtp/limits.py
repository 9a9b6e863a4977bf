"""Abuse limits of an SMTP session that are not protocol syntax (issue 11 items 1, 7, 12).

* The header block and each header field have a size limit, checked at end
  of data before anything parses the header block: over it, ``552 5.3.4``
  (Postfix ``header_size_limit``, Exchange ``MaxHeaderSize``). The limit also
  keeps the whole block within what filters and header controls see.
* Refused recipients (5xx at RCPT: relay denied, unknown user) count per
  session: after ``tarpit_after`` each further refusal is delayed, and at
  ``limit`` the session gets ``421 4.7.0`` and is closed (Postfix
  ``smtpd_soft_error_limit`` / ``smtpd_hard_error_limit``). Only the first
  few are tracked one by one; the session's end line gives the count.
"""
from __future__ import annotations

from typing import Any

from exmta.filters.base import longest_field
from exmta.model import Reply

__all__ = ["HEADER_TOO_BIG", "TRACKED_REFUSALS", "RefusedRecipients", "header_refusal", "too_many_refused"]

HEADER_TOO_BIG = Reply.make(552, "5.3.4", "Error: message header size exceeds limit")
#: refused recipients of one session tracked one by one (the rest only counted)
TRACKED_REFUSALS = 10


def too_many_refused(hostname: str) -> Reply:
    return Reply.make(421, "4.7.0", f"{hostname} Error: too many refused recipients, closing connection")


def header_refusal(view: Any, max_block: int, max_field: int) -> str | None:
    """Why the header block of ``view`` is over a limit (for the log), or None when it is not."""
    if not view.header_complete or view.header_length > max_block:
        size = view.header_length if view.header_complete else f"more than {view.header_length}"
        return f"header block of {size} octets (limit {max_block})"
    if view.header_length <= max_field:
        return None  # no field can be longer than the block (the usual case: no scan)
    longest = longest_field(view.raw_headers)
    if longest > max_field:
        return f"a header field of {longest} octets (limit {max_field})"
    return None


class RefusedRecipients:
    """Counts one session's 5xx RCPT replies and says what to do about the next one."""

    __slots__ = ("limit", "tarpit_after", "tarpit", "count")

    def __init__(self, limit: int, tarpit_after: int, tarpit: float) -> None:
        self.limit = limit
        self.tarpit_after = tarpit_after
        self.tarpit = tarpit
        self.count = 0

    def refused(self) -> tuple[float, bool]:
        """Count one refusal: (seconds to delay its reply, whether the session must now be closed)."""
        self.count += 1
        if self.limit and self.count >= self.limit:
            return 0.0, True
        if self.tarpit > 0 and self.count > self.tarpit_after:
            return self.tarpit, False
        return 0.0, False

    @property
    def tracked(self) -> bool:
        """Whether the refusal just counted is tracked one by one."""
        return self.count <= TRACKED_REFUSALS
