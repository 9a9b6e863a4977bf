"""The status page's quarantine section: the count and the newest entries, HTML-escaped, no content.

Everything shown comes from other hosts (sender, and file names inside the
reason), so every value is escaped; the message itself is never read here.
``exmta quarantine`` works the entries.
"""
from __future__ import annotations

import html
from typing import Any

from exmta.admin.client import age_text

__all__ = ["render_quarantine"]


def render_quarantine(summary: Any, now: float) -> str:
    """``<h2>Quarantine</h2>`` and its table, from a :class:`exmta.observe.quarantine_view.QuarantineSummary`."""
    e = html.escape
    out = ['<h2>Quarantine</h2><div id="quarantine">']
    if summary is None:
        out.append("<p>The queue has not been listed yet.</p></div>")
        return "".join(out)
    if not summary.count:
        out.append('<p class="none" id="quarantine-count" data-count="0">The quarantine is empty.</p></div>')
        return "".join(out)
    shown = len(summary.newest)
    out.append(f'<p id="quarantine-count" data-count="{summary.count}"><b>{summary.count}</b> message(s) '
               f"quarantined{f'; the newest {shown}' if shown < summary.count else ''}. "
               "<code>exmta quarantine list</code> lists them all.</p>")
    out.append("<table><tr><th>Queue id</th><th>Age</th><th>Sender</th><th>Recipients</th><th>Reason</th></tr>")
    for entry in summary.newest:
        out.append(f'<tr class="quarantined"><td>{e(entry.queue_id)}</td>'
                   f"<td>{e(age_text(max(0.0, now - entry.received_at)))}</td>"
                   f"<td>{e(entry.sender or '<>')}</td><td>{entry.recipients}</td>"
                   f"<td>{e(entry.reason)}</td></tr>")
    out.append("</table></div>")
    return "".join(out)
