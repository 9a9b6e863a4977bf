"""DSN requests of anonymous senders are narrowed, so exmta is no backscatter source (issue 11 item 6).

A sender that is neither authenticated nor allowed to relay can put any
victim's address in MAIL FROM. For such sessions:

* ``RET=FULL`` (or none) becomes ``RET=HDRS``: a bounce never carries the
  original message back to a forged sender;
* ``NOTIFY=SUCCESS`` is dropped (``NOTIFY=SUCCESS`` alone becomes ``NEVER``):
  a success report would confirm a mailbox to whoever asked;
* when SPF (MAIL FROM) or DMARC failed for the message, every recipient
  gets ``NOTIFY=NEVER``: the sender is known to be forged, no DSN at all.

Recipients of accepted domains are validated at RCPT where a source exists
(exmta.receive.recipients, exmta.receive.directory), so most unknown
recipients never get as far as a bounce.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from exmta.model import MailParams, RcptParams

__all__ = ["anonymous", "forged_sender", "narrow_mail", "narrow_rcpt"]


def anonymous(session: Any, factory: Any) -> bool:
    """No AUTH, no relay right and no partner trust (``factory``: the ESMTPServerFactory): an unverified sender."""
    if getattr(session, "auth_identity", None) is not None:
        return False
    may_relay = getattr(factory.policy, "may_relay", None)
    return not (may_relay is not None and may_relay(session)) and not factory.trusted(session)


def narrow_mail(params: MailParams) -> MailParams:
    return params if params.ret == "HDRS" else dataclasses.replace(params, ret="HDRS")


def narrow_rcpt(params: RcptParams) -> RcptParams:
    notify = params.notify
    if not notify or "SUCCESS" not in {n.upper() for n in notify}:
        return params
    rest = tuple(n for n in notify if n.upper() != "SUCCESS")
    return dataclasses.replace(params, notify=rest or ("NEVER",))


def forged_sender(session: Any, txn: Any) -> str | None:
    """Why the sender of this message is known to be forged (SPF or DMARC fail), or None."""
    try:
        from exmta.filters.authres import auth_state
    except ImportError:  # pragma: no cover - the filters package is part of exmta
        return None
    if not hasattr(session, "state_for"):
        return None
    state = auth_state(session)
    spf = state.spf_for(txn)
    if spf is not None and spf.result == "fail":
        return f"SPF fail for {spf.domain}"
    if state.dmarc is not None and state._txn is txn and state.dmarc.result == "fail":
        return f"DMARC fail for {state.dmarc.from_domain}"
    return None
