"""No OAuth2 token for an XOAUTH2 login: raised by the token source (:mod:`exmta.send.oauth2`) and
turned into a deferral by the SMTP login (:mod:`exmta.smtp.xoauth2`), which both import it from here.
"""
from __future__ import annotations

from exmta.model import Reply

__all__ = ["TokenError"]


class TokenError(Exception):
    """No token.  ``reason`` is a bounded label (unreachable, refused, unavailable, bad_response)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def reply(self) -> Reply:
        """What the recipients' DEFERRED result carries (and the tracking log shows)."""
        return Reply.make(451, "4.7.0", f"XOAUTH2 token not available: {self}")
