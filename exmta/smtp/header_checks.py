"""Header checks at end of data, before send-as and the filters: the mail loop and the header firewall.

* A message with more ``Received`` fields than the connector's ``max_hops`` (ours included) is a
  mail loop: refused with 554 5.4.6 (Exchange's MaxHopCount, 30 by default; 0 switches it off).
* Exchange's header firewall: the organisation, forest and hybrid attribution headers are believed
  from trusted peers only; a session that is not trusted has them removed (as header edits, applied
  with the filters' edits before the commit). The outbound half is :mod:`exmta.send.header_firewall`.
"""
from __future__ import annotations

from exmta.filters.base import MessageView

__all__ = ["FIREWALLED_HEADER_PREFIXES", "mail_loop", "strip_firewalled_headers"]

#: Exchange's header firewall: organisation, forest and hybrid attribution headers are only
#: believed from trusted peers (EXCHANGE.md section 5)
FIREWALLED_HEADER_PREFIXES = ("X-MS-Exchange-Organization-", "X-MS-Exchange-Forest-", "X-MS-Exchange-CrossPremises-")


def mail_loop(view: MessageView, max_hops: int) -> str | None:
    """Why the message is a mail loop (more than ``max_hops`` Received fields; 0: no check), else None."""
    hops = len(view.field_values("Received"))
    if max_hops and hops > max_hops:
        return f"{hops} Received headers (mail loop)"
    return None


def strip_firewalled_headers(view: MessageView, prefixes: tuple[str, ...]) -> None:
    """Remove every header field whose name starts with one of ``prefixes`` (an edit on ``view``)."""
    for prefix in prefixes:
        view.edits.remove_headers_with_prefix(prefix)
