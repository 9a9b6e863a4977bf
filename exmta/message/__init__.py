"""The MIME message model shared by transport rules and content filters.

Public API::

    from exmta.message import MimeMessage, Limits, load_message

    msg = await load_message(open_content, limits, reactor, threadpool)  # parsed off the reactor
    msg.subject, msg.header_values("To")          # decoded (RFC 2047 / RFC 6532)
    for part in msg.attachments():                 # the tree is parsed on first use
        part.filename, part.content_type, part.true_type, part.size, part.text()
    msg.could_not_be_inspected, msg.problems       # a hard limit passed, or unreadable

and the body edits of :mod:`exmta.message.edit` (disclaimer, attachment removal).
"""
from exmta.message.content import ArchiveInfo, html_to_text, is_executable, sniff_type
from exmta.message.edit import BodyEdit, DisclaimerRejected, apply_disclaimer, remove_parts
from exmta.message.limits import LimitExceeded, Limits
from exmta.message.parse import MimeMessage, Part
from exmta.message.pool import load_message, read_content

__all__ = [
    "ArchiveInfo", "BodyEdit", "DisclaimerRejected", "LimitExceeded", "Limits", "MimeMessage", "Part",
    "apply_disclaimer", "html_to_text", "is_executable", "load_message", "read_content", "remove_parts",
    "sniff_type",
]
