"""Authentication-Results (RFC 8601), and the per-message results the auth filters share.

The SPF, DKIM, ARC and DMARC filters are independent plugins; they meet in
an :class:`AuthState` kept in the session (``session.state_for(AuthState)``),
so DMARC can use the SPF and DKIM results and this filter can report them.
The ``authres`` filter (place it after the others) removes every
Authentication-Results field that claims our authserv-id (RFC 8601 5: a
forgery, whoever added it) and prepends ours.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger
from zope.interface import provider

from exmta.filters.base import FilterBase
from exmta.interfaces import IFilterFactory
from exmta.model import Verdict

__all__ = [
    "ARCResult", "AuthResultsFilter", "AuthState", "DKIMResult", "DMARCResult", "SPFResult",
    "auth_state", "format_auth_results", "forged_pattern",
]

log = Logger()


@dataclass(frozen=True)
class SPFResult:
    """One SPF check (RFC 7208): result is pass/fail/softfail/neutral/none/temperror/permerror."""

    result: str
    identity: str          # "mailfrom" or "helo"
    domain: str            # the domain checked
    subject: str           # the address (mailfrom) or name (helo) reported
    explanation: str = ""


@dataclass(frozen=True)
class DKIMResult:
    """One DKIM-Signature's outcome (RFC 6376 / 8601 2.7.1)."""

    result: str            # pass/fail/neutral/temperror/permerror/policy
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b_prefix: str = ""     # header.b: first characters of the signature
    reason: str = ""
    identity: str = ""     # i=


@dataclass(frozen=True)
class DMARCResult:
    """The DMARC evaluation (RFC 7489) of one message."""

    result: str            # pass/fail/none/temperror/permerror
    from_domain: str = ""
    policy: str = "none"   # the published p (or sp) that applied
    disposition: str = "none"  # what we did: none/quarantine/reject (after pct and overrides)
    reason: str = ""
    org_domain: str = ""
    spf_aligned: bool = False
    dkim_aligned: bool = False
    record: dict[str, str] = field(default_factory=dict)
    policy_domain: str = ""  # where the record was found (the From: domain or its organisational domain)


@dataclass(frozen=True)
class ARCResult:
    """ARC chain validation (RFC 8617): pass/fail/none."""

    result: str
    reason: str = ""
    instances: int = 0


class AuthState:
    """Authentication results of the current session and message, shared by the auth filters."""

    def __init__(self) -> None:
        self.helo: SPFResult | None = None
        self.mailfrom: SPFResult | None = None
        self.mailfrom_sender: str | None = None   # the MAIL FROM that ``mailfrom`` is for
        self._txn: Any = None
        self.dkim: list[DKIMResult] | None = None
        self.arc: ARCResult | None = None
        self.dmarc: DMARCResult | None = None
        self.quarantined = False

    def for_message(self, txn: Any) -> AuthState:
        """Forget per-message results when ``txn`` is a new transaction."""
        if txn is not self._txn:
            self._txn = txn
            self.dkim = None
            self.arc = None
            self.dmarc = None
            sender = str(getattr(txn, "sender", ""))
            if self.mailfrom_sender != sender:
                self.mailfrom = None
        return self

    def spf_for(self, txn: Any) -> SPFResult | None:
        """The MAIL FROM SPF result, when it was computed for this transaction's sender."""
        if self.mailfrom is not None and self.mailfrom_sender == str(getattr(txn, "sender", "")):
            return self.mailfrom
        return None


def auth_state(session: Any) -> AuthState:
    """The AuthState of ``session`` (created on first use; STARTTLS clears it with the rest)."""
    slot = session.state_for(AuthState)
    state = slot.get("state")
    if state is None:
        state = slot["state"] = AuthState()
    return state


# ---------------------------------------------------------------- formatting

_TOKEN = re.compile(r"[^\x00-\x20\x7f()<>@,;:\\\"/\[\]?=]+\Z")
_PVALUE_ADDR = re.compile(r"[^\x00-\x20\x7f()<>,;:\\\"\[\]]+\Z")  # local@domain, UTF-8 allowed (RFC 8616)


def _value(text: str, address: bool = False) -> str:
    """A pvalue: the text itself when it is a token/address, else a quoted-string."""
    if text and (_PVALUE_ADDR if address else _TOKEN).match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    clean = re.sub(r"[()\\\r\n]", " ", text).strip()
    return f" ({clean})" if clean else ""


def _reason(text: str) -> str:
    return f" reason={_value(text[:200])}" if text else ""


def format_auth_results(authserv_id: str, state: AuthState, txn: Any = None) -> str:
    """The folded value of an Authentication-Results field for ``state``."""
    parts: list[str] = []
    spf = state.spf_for(txn) if txn is not None else state.mailfrom
    if spf is not None:
        parts.append(f"spf={spf.result}{_comment(spf.explanation)} smtp.mailfrom={_value(spf.subject, True)}")
    if state.helo is not None and (spf is None or spf.identity != "helo"):
        h = state.helo
        parts.append(f"spf={h.result}{_comment(h.explanation)} smtp.helo={_value(h.subject, True)}")
    for d in state.dkim or ():
        props = ""
        if d.domain:
            props += f" header.d={_value(d.domain)}"
        if d.identity:
            props += f" header.i={_value(d.identity, True)}"
        if d.selector:
            props += f" header.s={_value(d.selector)}"
        if d.algorithm:
            props += f" header.a={_value(d.algorithm)}"
        if d.b_prefix:
            props += f" header.b={_value(d.b_prefix)}"
        parts.append(f"dkim={d.result}{_reason(d.reason)}{props}")
    if state.dkim == []:
        parts.append("dkim=none")
    if state.arc is not None:
        parts.append(f"arc={state.arc.result}{_comment(state.arc.reason)}")
    if state.dmarc is not None:
        m = state.dmarc
        comment = f"p={m.policy} dis={m.disposition}" if m.record else m.reason
        props = f" header.from={_value(m.from_domain)}" if m.from_domain else ""
        parts.append(f"dmarc={m.result}{_comment(comment)}{props}")
    if not parts:
        return f"{authserv_id}; none"
    return f"{authserv_id};\r\n\t" + ";\r\n\t".join(parts)


def forged_pattern(authserv_id: str) -> str:
    """Regex for an Authentication-Results value whose authserv-id is ours (CFWS allowed before it)."""
    return r"^\s*(?:\([^)]*\)\s*)*" + re.escape(authserv_id.rstrip(".")) + r"\.?\s*(?:[;(]|\s|$)"


# ---------------------------------------------------------------- the filter


@provider(IFilterFactory)
class AuthResultsFilter(FilterBase):
    """``plugin = "authres"``: strip forged Authentication-Results, add ours.

    Keys: ``authserv_id`` (default: the server hostname).
    """

    KEYS = frozenset({"authserv_id"})

    def __init__(self, name: str, authserv_id: str) -> None:
        self.name = name
        self.authserv_id = authserv_id
        self._forged = forged_pattern(authserv_id)

    @classmethod
    def from_config(cls, name: str, config: dict[str, Any], env: Any) -> AuthResultsFilter:
        unknown = set(config) - cls.KEYS
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}")
        authserv_id = config.get("authserv_id", env.hostname)
        if not isinstance(authserv_id, str) or not _TOKEN.match(authserv_id):
            raise ValueError("authserv_id must be a host name (a token without spaces or ';')")
        return cls(name, authserv_id)

    def on_data(self, session: Any, txn: Any, message: Any) -> Verdict:
        state = auth_state(session).for_message(txn)
        forged = [v for k, v in message.headers.items() if k.lower() == "authentication-results"
                  and re.search(self._forged, re.sub(r"\r?\n(?=[ \t])", "", str(v)), re.IGNORECASE)]
        if forged:
            log.info("{filter_name}: removed {count} Authentication-Results claiming {authserv_id}",
                     filter_name=self.name, count=len(forged), authserv_id=self.authserv_id)
        message.edits.remove_header_matching("Authentication-Results", self._forged)
        message.edits.insert_header("Authentication-Results", format_auth_results(self.authserv_id, state, txn))
        return Verdict.CONTINUE
