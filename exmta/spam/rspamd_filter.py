"""The ``rspamd`` filter plugin: every message through rspamd's /checkv2 at end of data, and its SCL.

What rspamd says becomes, in this order:

* its header changes (``milter.add_headers`` / ``remove_headers``, a DKIM
  signature) and, for ``rewrite subject``, its new Subject: all through the
  view's header journal (the core applies it once, byte-preserving); never a
  change to the ``X-MS-Exchange-*`` families, which only the core and this
  filter's SCL write;
* ``X-Spam-Status`` / ``X-Spam-Score`` / ``X-Spam-Symbols`` (``spam_headers``;
  the client's own fields of those names are removed first);
* the SCL (:mod:`exmta.spam.scl`): ``-1`` for a trusted source, else 0..9
  from the score, written as ``X-MS-Exchange-Organization-SCL``;
* the decision: ``soft reject`` is ``451 4.7.1``; ``greylist`` is
  ``on_greylist`` (accept, or ``451 4.7.1``); otherwise the connector's SCL
  thresholds: ``550 5.7.1`` at or above ``scl_reject``, the quarantine at or
  above ``scl_quarantine``, delivered with the SCL below. A trusted source
  (SCL -1) scanned with ``trusted = "scan"`` is refused only when rspamd itself
  says ``reject`` (outbound spam from a stolen account).

rspamd down, slow, answering HTTP errors or garbage gets ``on_failure``:
``tempfail`` (``451 4.7.1``, the default) or ``accept`` (delivered with
``X-Exmta-Spam-Scan: not scanned (...)``, no SCL). A scanner failure never
gives a 5xx. A message over ``max_size`` is not sent (delivered with that
header). Keep ``scan_timeout`` below the chain's per-filter ``timeout``
(30 s by default), which would otherwise answer ``451 4.3.0`` first.
"""
from __future__ import annotations

import email.header
import ipaddress
import re
from typing import Any, AsyncIterator

from twisted.logger import Logger
from zope.interface import provider

from exmta.filters.base import FilterBase
from exmta.interfaces import IFilterFactory
from exmta.config.reader import known_keys
from exmta.filters.bodychunks import body_chunks
from exmta.model import Verdict
from exmta.spam.rspamd import CHUNK, RspamdClient, RspamdUnavailable, RspamdVerdict, request_headers
from exmta.spam.scl import (DEFAULT_SPAM_SCORE, SclPolicy, connector_trusts_org_headers, existing_scl,
                            in_networks, scl_for_score, set_scl)

__all__ = ["HEADER", "KEYS", "RspamdFilter"]

log = Logger()

HEADER = "X-Exmta-Spam-Scan"
SPAM_HEADERS = ("X-Spam-Status", "X-Spam-Score", "X-Spam-Symbols")
KEYS = frozenset({
    "socket", "scan_timeout", "max_concurrent", "max_size", "on_failure", "on_greylist", "trusted",
    "trusted_networks", "settings_id", "rewrite_subject", "milter_headers", "spam_headers", "scl",
    "scl_reject", "scl_quarantine", "reject_text", "spam_score",
})
TEMPFAIL = Verdict.tempfail(451, "4.7.1", "Spam scanner unavailable, try again later")
#: header families rspamd may not touch: the organisation's own (the firewall's and the SCL's)
_PROTECTED = re.compile(r"x-ms-exchange-", re.IGNORECASE)
_FIELD = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")


def _ascii(text: str, limit: int = 200) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:limit]


def _choice(config: dict[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = config.get(key, default)
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}, not {value!r}")
    return str(value)


def _flag(config: dict[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false")
    return value


def _threshold(config: dict[str, Any], key: str, default: int | None) -> int | None:
    """An SCL threshold 0..9, or false (never)."""
    value = config.get(key, default if default is not None else False)
    if value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 9:
        raise ValueError(f"{key} must be an SCL from 0 to 9, or false (never)")
    return value


def _encoded(text: str) -> str:
    """A header value: as is when ASCII, else RFC 2047 encoded words (UTF-8)."""
    text = text.replace("\r", " ").replace("\n", " ")
    return text if text.isascii() else email.header.Header(text, "utf-8").encode()


def _fold(items: list[str], width: int = 76) -> str:
    """Comma-separated ``items`` folded onto continuation lines (no line near the 998 limit)."""
    lines: list[str] = []
    line = ""
    for item in items:
        piece = item if not line else ", " + item
        if line and len(line) + len(piece) > width:
            lines.append(line + ",")
            line = item
        else:
            line += piece
    lines.append(line)
    return "\r\n\t".join(lines)


_OUR_RECEIVED = re.compile(r"\(exmta\) with [A-Z0-9]+ id ([A-Za-z0-9._-]+)")


def _queue_id(view: Any) -> str | None:
    """The queue id of the message: the view's, else from the Received field this server put first."""
    queue_id = getattr(view, "queue_id", None)
    if queue_id:
        return str(queue_id)
    first = next(iter(view.field_values("Received")), "")
    m = _OUR_RECEIVED.search(re.sub(r"\r\n[ \t]+", " ", first))
    return m.group(1) if m else None


@provider(IFilterFactory)
class RspamdFilter(FilterBase):
    """Scans each message with rspamd and stamps Exchange's SCL (see the module docstring)."""

    def __init__(self, name: str, client: RspamdClient, *, hostname: str = "localhost",
                 max_size: int = 20 * 1024 * 1024, on_failure: str = "tempfail", on_greylist: str = "accept",
                 trusted: str = "skip", trusted_networks: tuple[Any, ...] = (), settings_id: str | None = None,
                 rewrite_subject: bool = True, milter_headers: bool = True, spam_headers: bool = True,
                 scl: bool = True, scl_policy: SclPolicy | None = None,
                 reject_text: str = "Message rejected as spam", spam_score: float = DEFAULT_SPAM_SCORE,
                 reactor: Any = None, threadpool: Any = None) -> None:
        self.name = name
        self.client = client
        self.hostname = hostname
        self.max_size = max_size
        self.on_failure = on_failure
        self.on_greylist = on_greylist
        self.trusted = trusted
        self.trusted_networks = tuple(trusted_networks)
        self.settings_id = settings_id
        self.rewrite_subject = rewrite_subject
        self.milter_headers = milter_headers
        self.spam_headers = spam_headers
        self.scl = scl
        self.scl_policy = scl_policy if scl_policy is not None else SclPolicy()
        self.reject_text = reject_text
        self.spam_score = spam_score
        self.reactor = reactor
        self.threadpool = threadpool

    # ------------------------------------------------------------ configuration

    @classmethod
    def parse(cls, name: str, config: dict[str, Any]) -> dict[str, Any]:
        """The constructor's keyword arguments from a ``[filters.NAME]`` table (ValueError names the key)."""
        from exmta.config.reader import parse_duration, parse_size

        known_keys(config, KEYS)
        socket = config.get("socket")
        if not isinstance(socket, str) or not socket.startswith(("unix:", "tcp:")):
            raise ValueError('socket must be a client endpoint such as "tcp:127.0.0.1:11333" '
                             'or "unix:/run/rspamd/normal.sock"')
        try:  # Twisted's own parser, as at start (without a reactor)
            from twisted.internet.endpoints import clientFromString

            clientFromString(object(), socket)
        except Exception as e:
            raise ValueError(f"socket {socket!r} is not a valid client endpoint: {e}") from None
        if socket == "unix:":
            raise ValueError("socket unix: needs a path")
        timeout = parse_duration(config.get("scan_timeout", 15))
        if timeout <= 0:
            raise ValueError("scan_timeout must be positive")
        limit = config.get("max_concurrent", 8)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("max_concurrent must be a positive integer")
        max_size = parse_size(config.get("max_size", "20MiB"))
        if max_size < 1:
            raise ValueError("max_size must be positive")
        networks = config.get("trusted_networks", [])
        if not isinstance(networks, list):
            raise ValueError("trusted_networks must be a list of CIDRs")
        try:
            parsed = tuple(ipaddress.ip_network(str(n).strip(), strict=False) for n in networks)
        except ValueError as e:
            raise ValueError(f"trusted_networks: {e}") from None
        settings_id = config.get("settings_id")
        if settings_id is not None and (not isinstance(settings_id, str) or not re.fullmatch(r"[\w.-]{1,64}",
                                                                                              settings_id)):
            raise ValueError("settings_id must be an rspamd settings id (letters, digits, _ . -)")
        text = config.get("reject_text", "Message rejected as spam")
        if not isinstance(text, str) or not text.strip() or _ascii(text, 400) != text:
            raise ValueError("reject_text must be one line of printable ASCII")
        spam_score = config.get("spam_score", DEFAULT_SPAM_SCORE)
        if isinstance(spam_score, bool) or not isinstance(spam_score, (int, float)) or spam_score <= 0:
            raise ValueError("spam_score must be a positive number (rspamd's add_header threshold)")
        reject_at = _threshold(config, "scl_reject", 7)
        quarantine_at = _threshold(config, "scl_quarantine", None)
        if reject_at is not None and quarantine_at is not None and quarantine_at >= reject_at:
            raise ValueError("scl_quarantine must be below scl_reject (at or above scl_reject is a reject)")
        return dict(
            socket=socket, timeout=timeout, max_concurrent=limit, max_size=max_size,
            on_failure=_choice(config, "on_failure", ("tempfail", "accept"), "tempfail"),
            on_greylist=_choice(config, "on_greylist", ("accept", "tempfail"), "accept"),
            trusted=_choice(config, "trusted", ("skip", "scan"), "skip"),
            trusted_networks=parsed, settings_id=settings_id,
            rewrite_subject=_flag(config, "rewrite_subject", True),
            milter_headers=_flag(config, "milter_headers", True),
            spam_headers=_flag(config, "spam_headers", True),
            scl=_flag(config, "scl", True), scl_policy=SclPolicy(reject_at, quarantine_at),
            reject_text=text, spam_score=float(spam_score),
        )

    @classmethod
    def check_config(cls, name: str, config: dict[str, Any]) -> None:
        cls.parse(name, config)

    @classmethod
    def from_config(cls, name: str, config: dict[str, Any], env: Any) -> RspamdFilter:
        options = cls.parse(name, config)
        client = RspamdClient(env.reactor, options.pop("socket"), options.pop("timeout"),
                              options.pop("max_concurrent"), clock=env.clock)
        return cls(name, client, hostname=env.hostname, reactor=env.reactor, threadpool=env.threadpool, **options)

    # ------------------------------------------------------------ the scan

    def _chunks(self, view: Any) -> AsyncIterator[bytes]:
        """The message in chunks, read from the spool on the thread pool (inline without one)."""
        return body_chunks(view, self.reactor, self.threadpool, CHUNK)

    def is_trusted(self, session: Any, view: Any) -> bool:
        """Authenticated, in ``trusted_networks``, or trusted by the connector with organisation headers."""
        if getattr(session, "auth_identity", None):
            return True
        if self.trusted_networks and in_networks(getattr(session, "peer_ip", ""), self.trusted_networks):
            return True
        return connector_trusts_org_headers(view)

    async def on_data(self, session: Any, txn: Any, message: Any) -> Verdict:  # type: ignore[override]
        trusted = self.is_trusted(session, message)
        if trusted and self.trusted == "skip":
            self._trusted_scl(message)
            return Verdict.CONTINUE
        if message.size > self.max_size:
            self._not_scanned(message, f"larger than {self.max_size} octets", "too-large")
            if trusted:
                self._trusted_scl(message)
            return Verdict.CONTINUE
        queue_id = _queue_id(message)
        headers = request_headers(session, txn, queue_id, self.hostname, self.settings_id)
        try:
            verdict = await self.client.check_stream(self._chunks(message), message.size, headers)
        except RspamdUnavailable as e:
            log.warn("rspamd {filter_name}: scan of {queue_id} failed: {error}", filter_name=self.name,
                     error=str(e), queue_id=queue_id, session_id=getattr(session, "session_id", ""),
                     connector=getattr(session, "connector", ""))
            if self.on_failure == "tempfail":
                return TEMPFAIL
            self._not_scanned(message, f"scanner failed: {e}", "scanner-failed")
            if trusted:
                self._trusted_scl(message)
            return Verdict.CONTINUE
        if verdict.skipped:  # rspamd's settings said not to scan: no score, so no SCL from it
            if self.milter_headers:
                self._rspamd_edits(message, verdict)
            self._not_scanned(message, "skipped by rspamd's settings", "skipped")
            if trusted:
                self._trusted_scl(message)
            return Verdict.CONTINUE
        return self._apply(session, message, verdict, trusted)

    # ------------------------------------------------------------ what the verdict becomes

    def _apply(self, session: Any, view: Any, verdict: RspamdVerdict, trusted: bool) -> Verdict:
        if self.milter_headers:
            self._rspamd_edits(view, verdict)
        if self.rewrite_subject and verdict.action == "rewrite subject" and verdict.subject:
            view.edits.replace_header("Subject", _encoded(verdict.subject))
        scl = -1 if trusted else scl_for_score(verdict.score, self.spam_score, verdict.required_score,
                                                verdict.action)
        if self.spam_headers:
            self._spam_headers(view, verdict)
        if self.scl:
            if trusted:
                self._trusted_scl(view)
            else:
                set_scl(view, scl)
        outcome = self.scl_policy.outcome(scl)
        if trusted and verdict.action == "reject":
            outcome = "reject"
        symbols = ", ".join(verdict.symbol_names()[:8])
        finding = (f"{verdict.action} score={verdict.score:.2f}/{verdict.required_score:.2f} scl={scl}"
                   f"{' symbols=' + symbols if symbols else ''}")
        log.info("rspamd {filter_name}: {queue_id} from {peer_ip}: {finding}", filter_name=self.name,
                 finding=finding, peer_ip=getattr(session, "peer_ip", ""), scl=scl, score=verdict.score,
                 action=verdict.action, queue_id=_queue_id(view), session_id=getattr(session, "session_id", ""),
                 connector=getattr(session, "connector", ""))
        if verdict.action == "soft reject":
            return Verdict.tempfail(451, "4.7.1", _ascii(verdict.message or "Try again later", 200))
        if verdict.action == "greylist" and self.on_greylist == "tempfail" and not trusted:
            return Verdict.tempfail(451, "4.7.1", "Greylisted, try again later")
        if outcome == "reject":
            return Verdict.reject(550, "5.7.1", self.reject_text)
        if outcome == "quarantine":
            view.quarantine(_ascii(f"rspamd {self.name}: SCL {scl}: {finding}", 480))
        self._note(view, "spam-verdict", finding, "quarantine" if outcome == "quarantine" else "header")
        return Verdict.CONTINUE

    def _rspamd_edits(self, view: Any, verdict: RspamdVerdict) -> None:
        """rspamd's requested header changes, through the journal; the organisation's families are refused."""
        for name, index in verdict.remove_headers:
            if not _FIELD.match(name) or _PROTECTED.match(name):
                log.warn("rspamd {filter_name}: refused to remove header {header!r}", filter_name=self.name,
                         header=name[:80])
                continue
            # only fields the message arrived with (by value), never one another filter added here
            values = view.field_values(name)
            if index != 0:
                values = [values[index - 1] if index > 0 else values[index]] if abs(index) <= len(values) else []
            for value in dict.fromkeys(re.sub(r"\r\n(?=[ \t])", "", v).strip() for v in values):
                view.edits.remove_header_matching(name, r"^\s*" + re.escape(value) + r"\s*$")
        adds = [(name, value, order) for name, value, order in verdict.add_headers]
        adds += [("DKIM-Signature", sig, 0) for sig in verdict.dkim_signatures]
        for name, value, order in adds:
            if _PROTECTED.match(name):
                log.warn("rspamd {filter_name}: refused to add header {header!r}", filter_name=self.name,
                         header=name[:80])
                continue
            try:
                if order >= 0:
                    view.edits.insert_header(name, value)
                else:
                    view.edits.add_header(name, value)
            except ValueError as e:
                log.warn("rspamd {filter_name}: header {header!r} not added: {error}", filter_name=self.name,
                         header=name[:80], error=str(e))

    def _spam_headers(self, view: Any, verdict: RspamdVerdict) -> None:
        spam = verdict.action in ("reject", "rewrite subject", "add header")
        symbols = [f"{s.name}({s.score:.2f})" for s in verdict.symbols if s.score != 0] or ["none"]
        values = (
            f"{'Yes' if spam else 'No'}, score={verdict.score:.2f} required={verdict.required_score:.2f}"
            f" action={verdict.action.replace(' ', '_')}",
            f"{verdict.score:.2f}",
            _fold([_ascii(s, 120) for s in symbols[:60]]),
        )
        for name, value in zip(SPAM_HEADERS, values):
            view.edits.remove_header(name)  # the client's own, and any rspamd asked for: ours is the one
            view.edits.add_header(name, value)

    def _trusted_scl(self, view: Any) -> None:
        """SCL -1, unless the connector let the source bring organisation headers and it brought an SCL."""
        if not self.scl:
            return
        if connector_trusts_org_headers(view) and existing_scl(view) is not None:
            return
        set_scl(view, -1)

    def _not_scanned(self, view: Any, why: str, check: str) -> None:
        view.edits.remove_header(HEADER)
        view.edits.add_header(HEADER, _ascii(f"not scanned ({why})", 300))
        self._note(view, check, why, "header")

    def _note(self, view: Any, check: str, detail: str, action: str) -> None:
        """What decided, for the AGENTINFO tracking event of this message."""
        details = getattr(view, "agent_details", None)
        if details is not None:
            details[self.name] = {"check": _ascii(f"{check}: {detail}", 300), "action": action}
