"""The avatar an SMTP AUTH login yields: who the user is and whom they may send as."""
from __future__ import annotations

from dataclasses import dataclass, field

from twisted.cred.error import UnauthorizedLogin
from zope.interface import Attribute, Interface, implementer

from exmta.auth.sendas import SendAsGrants

__all__ = ["BadPassword", "ISubmitter", "Submitter", "TemporaryAuthFailure"]


class ISubmitter(Interface):
    """An authenticated mail submitter (the twisted.cred avatar interface of SMTP AUTH)."""

    identity = Attribute("str: the canonical user name, recorded as the session's auth_identity")
    grants = Attribute("SendAsGrants: the envelope senders and From: addresses the user may use")


@implementer(ISubmitter)
@dataclass(frozen=True)
class Submitter:
    identity: str
    grants: SendAsGrants = field(default_factory=SendAsGrants)


class TemporaryAuthFailure(Exception):
    """The back end could not decide (directory down, file unreadable): 454 4.7.0, not a failed login."""


class BadPassword(UnauthorizedLogin):
    """A known user with a wrong password; ``identity`` is what a success would have given.

    The lockout counts it for that identity too, so name variants that resolve
    to one user (``alice``, ``alice@example.test``) share one lock.
    """

    def __init__(self, message: str, identity: str) -> None:
        super().__init__(message)
        self.identity = identity
