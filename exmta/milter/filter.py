"""The ``milter`` filter plugin: a list of milters run at end of data, as Postfix runs smtpd_milters.

At end of data each milter in turn is connected and told the whole SMTP
conversation of the message: connect, HELO, MAIL, each acknowledged RCPT,
DATA, the headers, end of headers, the body and end of message, each with
its macros. Replaying the conversation at end of data keeps the SMTP
server unaware of milters; the cost is that a milter cannot refuse at RCPT
time (a refusal of any recipient refuses the whole message, as Postfix
does for its non-SMTP milters).

A milter's answer becomes a Verdict: reject (``550 5.7.1``), tempfail
(``451 4.7.1``), its own reply (SMFIR_REPLYCODE), discard, or no objection.
Its modifications go through the core's APIs only: header changes into the
view's byte-preserving journal, a new body through ``replace_body``,
recipients through ``add_recipient`` / ``delete_recipient`` (applied by the
server to the envelope it commits) and quarantine into the hold queue
(``exmta quarantine``). Each milter sees the message as received, not the
edits of the milters before it.

A milter that is down, slow or answering garbage gets its
``default_action``: ``tempfail`` (451 4.7.1, the default), ``accept`` (as if
the milter were not there; its modifications are dropped), ``reject``
(550 5.7.1: the only way a milter failure gives a 5xx) or ``quarantine``.
"""
from __future__ import annotations

import re
from typing import Any, AsyncIterator

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import provider

from exmta.config.reader import parse_duration
from exmta.filters.base import FilterBase, HeaderEdits
from exmta.interfaces import IFilterFactory
from exmta.milter.client import (DEFAULT_ACTIONS, DEFAULT_MACROS, MessageFacts, MilterFailed, MilterSettings,
                                 Outcome, check_macro_name, converse, parse_socket)
from exmta.milter.protocol import STAGES
from exmta.model import Action, Reply, Verdict

__all__ = ["MilterFilter", "parse_settings", "verdict_for_reply"]

log = Logger()

READ_CHUNK = 64 * 1024
FILTER_KEYS = frozenset({"milters"})
MILTER_KEYS = frozenset({"name", "socket", "connect_timeout", "command_timeout", "content_timeout",
                         "default_action", "macros"})
REJECTED = Verdict.reject(550, "5.7.1", "Command rejected")
TEMPFAILED = Verdict.tempfail(451, "4.7.1", "Service unavailable - try again later")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")
_FIELD_END = re.compile(rb"\r\n(?![ \t])")


def _seconds(table: dict[str, Any], key: str, default: float, where: str) -> float:
    value = table.get(key, default)
    if isinstance(value, str):
        value = parse_duration(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{where}.{key} must be a positive number of seconds or a duration such as \"30s\"")
    return float(value)


def _macros(value: Any, where: str) -> dict[str, tuple[str, ...]]:
    out = dict(DEFAULT_MACROS)
    if value is None:
        return out
    if not isinstance(value, dict):
        raise ValueError(f"{where}.macros must be a table of stage = [macro names]")
    for stage, names in value.items():
        if stage not in STAGES:
            raise ValueError(f"{where}.macros: unknown stage {stage!r} (known: {', '.join(STAGES)})")
        if isinstance(names, str):
            names = names.split()
        if not isinstance(names, list) or not all(isinstance(n, str) and check_macro_name(n) for n in names):
            raise ValueError(f'{where}.macros.{stage} must be a list of macro names such as "i" or "{{auth_authen}}"')
        out[stage] = tuple(names)
    return out


def parse_settings(name: str, config: dict[str, Any]) -> list[MilterSettings]:
    """The milters of one ``[filters.NAME]`` table (ValueError naming the bad key)."""
    unknown = set(config) - FILTER_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(FILTER_KEYS))}; "
                         "each milter is a [[filters.NAME.milters]] table)")
    milters = config.get("milters")
    if not isinstance(milters, list) or not milters or not all(isinstance(m, dict) for m in milters):
        raise ValueError("milters must be a non-empty list of tables ([[filters.NAME.milters]])")
    out: list[MilterSettings] = []
    seen: set[str] = set()
    for i, table in enumerate(milters):
        where = f"milters[{i}]"
        unknown = set(table) - MILTER_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(MILTER_KEYS))})")
        mname = table.get("name", f"milter{i + 1}")
        if not isinstance(mname, str) or not mname or mname in seen:
            raise ValueError(f"{where}.name must be a unique, non-empty string")
        seen.add(mname)
        socket = table.get("socket")
        if not isinstance(socket, str):
            raise ValueError(f'{where}.socket is required: "inet:HOST:PORT" or "unix:/path"')
        parse_socket(socket)
        action = table.get("default_action", "tempfail")
        if action not in DEFAULT_ACTIONS:
            raise ValueError(f"{where}.default_action must be one of {', '.join(DEFAULT_ACTIONS)}, not {action!r}")
        out.append(MilterSettings(
            name=mname, socket=socket,
            connect_timeout=_seconds(table, "connect_timeout", 30.0, where),
            command_timeout=_seconds(table, "command_timeout", 30.0, where),
            content_timeout=_seconds(table, "content_timeout", 300.0, where),
            default_action=action, macros=_macros(table.get("macros"), where)))
    return out


def verdict_for_reply(text: str) -> Verdict:
    """The Verdict for a milter's SMFIR_REPLYCODE ("550 5.7.1 text", possibly multi-line)."""
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line]
    code = int(lines[0][:3])
    status = None
    texts = []
    for line in lines:
        rest = line[4:] if line[:3].isdigit() else line
        word, _, tail = rest.partition(" ")
        if _STATUS.match(word):
            status = status or word
            rest = tail
        texts.append(_ascii(rest))
    klass = "5" if code >= 500 else "4"
    if status is None or status[0] != klass:
        status = f"{klass}.7.1"
    action = Action.REJECT if code >= 500 else Action.TEMPFAIL
    return Verdict(action, Reply.make(code, status, *(texts or ["Rejected" if code >= 500 else "Try again later"])))


def _ascii(text: str, limit: int = 400) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:limit]


def _crlf(value: str) -> str:
    return re.sub(r"\r?\n", "\r\n", value)


def header_fields(block: bytes) -> list[tuple[bytes, bytes]]:
    """(name, value) per field of a raw header block, as milters get them: no space after the colon,
    folding kept with LF line ends."""
    out: list[tuple[bytes, bytes]] = []
    for raw in _FIELD_END.split(block)[:-1] if block else ():
        if raw[:1] in (b" ", b"\t") and out:
            name, value = out[-1]
            out[-1] = (name, value + b"\n" + raw)
            continue
        name, _, value = raw.partition(b":")
        out.append((name.rstrip(b" \t"), value.lstrip(b" \t").replace(b"\r\n", b"\n")))
    return out


@provider(IFilterFactory)
class MilterFilter(FilterBase):
    """Runs each configured milter at end of data (see the module docstring)."""

    def __init__(self, name: str, milters: list[MilterSettings], reactor: Any, clock: Any = None,
                 threadpool: Any = None, hostname: str = "localhost") -> None:
        self.name = name
        self.milters = milters
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.threadpool = threadpool
        self.hostname = hostname

    @classmethod
    def check_config(cls, name: str, config: dict[str, Any]) -> None:
        parse_settings(name, config)

    @classmethod
    def from_config(cls, name: str, config: dict[str, Any], env: Any) -> MilterFilter:
        return cls(name, parse_settings(name, config), env.reactor, env.clock, env.threadpool, env.hostname)

    # ------------------------------------------------------------ what the milters are told

    def facts(self, session: Any, txn: Any, view: Any) -> MessageFacts:
        """The conversation to replay (the body reader is added per milter)."""
        ip = getattr(session, "peer_ip", "") or ""
        sender = str(txn.sender)
        queue_id = getattr(view, "queue_id", None) or ""
        values = {
            "j": self.hostname, "v": "exmta", "{daemon_name}": getattr(session, "connector", "") or "exmta",
            "{daemon_addr}": getattr(session, "local_ip", "") or "",
            "{daemon_port}": str(getattr(session, "local_port", 0) or ""),
            "_": f"unknown [{ip}]", "{client_addr}": ip, "{client_port}": str(getattr(session, "peer_port", 0)),
            "{client_name}": "unknown", "{client_ptr}": "unknown",
            "{if_addr}": getattr(session, "local_ip", "") or "", "{if_name}": self.hostname,
            "{mail_addr}": sender, "{mail_host}": sender.rpartition("@")[2] if "@" in sender else "",
            "{mail_mailer}": "smtp",
        }
        if queue_id:
            values["i"] = queue_id
        tls = getattr(session, "tls", None)
        if tls is not None:
            values["{tls_version}"] = tls.version
            values["{cipher}"] = tls.cipher
            if tls.peer_certificate_subject:
                values["{cert_subject}"] = tls.peer_certificate_subject
        auth = getattr(session, "auth_identity", None)
        if auth:
            values["{auth_authen}"] = auth  # {auth_type}: the session does not keep the mechanism
        values = {k: v for k, v in values.items() if v}
        params = txn.params
        mail_args = []
        if params.size is not None:
            mail_args.append(f"SIZE={params.size}")
        body_value = getattr(params.body, "value", "")
        if body_value and body_value != "7BIT":
            mail_args.append(f"BODY={body_value}")
        if params.smtputf8:
            mail_args.append("SMTPUTF8")
        if params.ret:
            mail_args.append(f"RET={params.ret}")
        recipients = []
        rcpt_macros = []
        for address, rp in txn.recipients:
            rcpt = str(address)
            args = []
            if rp.notify:
                args.append("NOTIFY=" + ",".join(rp.notify))
            recipients.append((rcpt, tuple(args)))
            rcpt_macros.append({"{rcpt_addr}": rcpt, "{rcpt_host}": rcpt.rpartition("@")[2], "{rcpt_mailer}": "smtp"})
        return MessageFacts(
            client_ip=ip, client_port=int(getattr(session, "peer_port", 0) or 0),
            family="U" if not ip else ("6" if ":" in ip else "4"),
            helo=getattr(session, "helo_name", None), sender=sender, mail_args=tuple(mail_args),
            recipients=recipients, headers=header_fields(view.raw_headers), macros=values, rcpt_macros=rcpt_macros)

    async def _read(self, call: Any, *args: Any) -> Any:
        if self.threadpool is None:
            return call(*args)
        return await deferToThreadPool(self.reactor, self.threadpool, call, *args)

    async def body_chunks(self, view: Any) -> AsyncIterator[bytes]:
        """The body (after the header block and its empty line), read from the spool in chunks."""
        f = await self._read(view.open_body)
        try:
            await self._read(f.seek, view.header_length)
            start = await self._read(f.read, 2)
            if start != b"\r\n":
                await self._read(f.seek, view.header_length)
            while True:
                chunk = await self._read(f.read, READ_CHUNK)
                if not chunk:
                    return
                yield chunk
        finally:
            f.close()

    # ------------------------------------------------------------ end of data

    async def on_data(self, session: Any, txn: Any, message: Any) -> Verdict:  # type: ignore[override]
        facts = self.facts(session, txn, message)
        queue_id = getattr(message, "queue_id", None)
        for settings in self.milters:
            facts.body = self.body_chunks(message)
            try:
                outcome = await converse(settings, facts, self.reactor, self.clock)
                verdict = self.apply(settings, outcome, txn, message)
            except MilterFailed as e:
                log.warn("milter {milter}: {error}; default action {action} for {queue_id}",
                         milter=settings.name, error=str(e), action=settings.default_action, queue_id=queue_id)
                verdict = self.default_action(settings, message, str(e))
            if verdict is not None:
                return verdict
        return Verdict.CONTINUE

    def default_action(self, settings: MilterSettings, view: Any, why: str) -> Verdict | None:
        """The milter's ``default_action`` once it failed: a Verdict, or None to go on without it."""
        if settings.default_action == "tempfail":
            return TEMPFAILED
        if settings.default_action == "reject":
            return REJECTED
        check = _ascii(f"milter {settings.name} failed: {why}", 300)
        if settings.default_action == "quarantine":
            view.quarantine(check)
        details = getattr(view, "agent_details", None)
        if details is not None:
            details[self.name] = {"check": check, "action": settings.default_action}
        return None

    def apply(self, settings: MilterSettings, outcome: Outcome, txn: Any, view: Any) -> Verdict | None:
        """The Verdict for a milter's outcome, its modifications carried out through the view.

        Raises MilterFailed for a modification the core cannot take (e.g. a header
        value that would inject a line): then nothing of this milter is applied.
        """
        log.info("milter {milter}: {action} at {stage} with {count} modification(s) for {queue_id}",
                 milter=settings.name, action=outcome.action, stage=outcome.stage or "eom",
                 count=len(outcome.modifications), queue_id=getattr(view, "queue_id", None))
        if outcome.action == "discard":
            return Verdict.discard()
        if outcome.action in ("reject", "tempfail"):
            if outcome.reply:
                return verdict_for_reply(outcome.reply)
            return REJECTED if outcome.action == "reject" else TEMPFAILED
        journal = HeaderEdits()
        body: list[bytes] = []
        recipients: list[tuple[str, str, tuple[str, ...]]] = []
        quarantine = None
        try:
            for mod in outcome.modifications:
                if mod.kind == "addheader":
                    journal.add_header(mod.name, _crlf(mod.value))
                elif mod.kind == "insheader":
                    journal.insert_header_at(mod.index, mod.name, _crlf(mod.value))
                elif mod.kind == "chgheader":
                    journal.change_header(mod.name, mod.index, _crlf(mod.value))
                elif mod.kind == "replbody":
                    body.append(mod.body)
                elif mod.kind in ("addrcpt", "addrcpt_par"):
                    recipients.append(("add", mod.address, mod.args))
                elif mod.kind == "delrcpt":
                    recipients.append(("delete", mod.address, ()))
                elif mod.kind == "quarantine":
                    quarantine = quarantine or _ascii(f"milter {settings.name}: {mod.text}")
                else:
                    raise MilterFailed(f"modification {mod.kind} cannot be carried out")
        except ValueError as e:
            raise MilterFailed(f"modification refused: {e}") from None
        # everything checked: now onto the view, where the core applies it before commit
        trial = list(getattr(view, "recipient_edits", []))
        for kind, address, args in recipients:
            try:
                if kind == "add":
                    view.add_recipient(address, args)
                else:
                    view.delete_recipient(address)
            except ValueError as e:
                view.recipient_edits[:] = trial
                raise MilterFailed(f"modification refused: {e}") from None
        view.edits.ops.extend(journal.ops)
        if body:
            new = b"".join(body).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            view.replace_body(new)
        if quarantine:
            view.quarantine(quarantine)
        if recipients and not _remaining(txn, view):
            log.info("milter {milter} removed every recipient of {queue_id}: discarded", milter=settings.name,
                     queue_id=getattr(view, "queue_id", None))
            return Verdict.discard()
        return None


def _remaining(txn: Any, view: Any) -> list[str]:
    """The envelope recipients after the view's recipient edits."""
    addresses = [str(a).lower() for a, _ in txn.recipients]
    for kind, address, _args in view.recipient_edits:
        if kind == "delete":
            addresses = [a for a in addresses if a != address.lower()]
        elif address.lower() not in addresses:
            addresses.append(address.lower())
    return addresses
