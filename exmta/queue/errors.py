"""Errors a queue store raises that the rest of the server answers in a defined way."""
from __future__ import annotations


class StoreUnavailable(Exception):
    """The store cannot take or give mail right now (its database is away): a temporary failure.

    The SMTP server answers 451 4.3.0 and logs a warning without a traceback;
    the scheduler retries. Nothing acknowledged depends on the failed call.
    """


class ContentCorrupt(ValueError):
    """A stored message's content does not match its checksum: it is held, never delivered."""
