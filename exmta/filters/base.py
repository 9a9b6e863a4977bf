"""The filter chain, the base class for filters, and the message view they see.

Filters narrow what the receive policy allowed; they never accept. The
chain runs the filters of one phase in order and the first verdict that is
not CONTINUE wins (Haraka's hook order, typed). Each call goes through
``maybeDeferred``/``Deferred.fromCoroutine`` with its own timeout on the
injected clock; a filter that raises or times out gives ``451 4.3.0``, or
is skipped when the chain runs with ``on_error="continue"``.

Header edits are a journal applied once at end of data, on the raw header
bytes, so untouched fields keep their exact bytes (DKIM signatures survive).
"""
from __future__ import annotations

import dataclasses
import email.message
import inspect
import io
import re
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any, BinaryIO, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from exmta.config.reader import parse_duration
from exmta.coroutines import run_coroutine
from exmta.interfaces import IMessageFilter, IMessageView
from exmta.model import Action, Reply, Verdict

__all__ = [
    "FILTER_ERROR", "FilterBase", "FilterChain", "HeaderEdits", "MessageView", "PHASES",
    "call_hook", "header_block_length", "longest_field",
]

log = Logger()

#: what a failing or slow filter turns into (never 5xx: principle 4)
FILTER_ERROR = Verdict(Action.TEMPFAIL, Reply.make(451, "4.3.0", "Error: temporary failure in message checks"))
PHASES = ("connect", "helo", "mail", "rcpt", "data")
#: largest header block a view parses (Postfix header_size_limit is 100 KiB per header)
MAX_HEADER_BLOCK = 1024 * 1024


@implementer(IMessageFilter)
class FilterBase:
    """A filter with no opinion: every phase returns CONTINUE. Override what you need."""

    name = "filter"

    def on_connect(self, session: Any) -> Verdict:
        return Verdict.CONTINUE

    def on_helo(self, session: Any) -> Verdict:
        return Verdict.CONTINUE

    def on_mail(self, session: Any, sender: Any, params: Any) -> Verdict:
        return Verdict.CONTINUE

    def on_rcpt(self, session: Any, txn: Any, rcpt: Any, params: Any) -> Verdict:
        return Verdict.CONTINUE

    def on_data(self, session: Any, txn: Any, message: Any) -> Verdict:
        return Verdict.CONTINUE


def _seconds(value: Any) -> float:
    """A filter's ``timeout``: seconds, or a duration string ("5s", as docs/filters.rst shows)."""
    if isinstance(value, str):
        return parse_duration(value)
    return float(value)


def _check_on_error(value: str) -> None:
    if value not in ("tempfail", "continue"):
        raise ValueError(f"on_error must be 'tempfail' or 'continue', not {value!r}")


def call_hook(method: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Call a hook that may return a value, a Deferred or a coroutine; always get a Deferred."""
    try:
        result = method(*args)
    except Exception:
        return fail()
    if isinstance(result, Deferred):
        return result
    if inspect.iscoroutine(result):
        return run_coroutine(result)
    return succeed(result)


class FilterChain:
    """Runs IMessageFilter providers phase by phase (see the module docstring)."""

    def __init__(
        self,
        filters: Sequence[Any],
        clock: IReactorTime,
        timeout: float = 30.0,
        on_error: str = "tempfail",
        per_filter: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """``per_filter`` maps a filter's name to overrides: ``{"timeout": s, "on_error": ...}``.

        Passing ``Config.filters`` (the ``[filters.NAME]`` tables) works: other keys are ignored.
        """
        _check_on_error(on_error)
        self.filters = tuple(filters)
        self.clock = clock
        self.timeout = timeout
        self.on_error = on_error
        self._settings: dict[str, tuple[float, str]] = {}
        #: called (filter name, phase, action) for each verdict other than CONTINUE (metrics)
        self.verdict_observer: Callable[[str, str, str], None] | None = None
        #: exmta.filters.admission.CheckAdmission shared by the process's chains, or None (no bound)
        self.admission: Any = None
        for name, table in (per_filter or {}).items():
            t = _seconds(table.get("timeout", timeout))
            e = str(table.get("on_error", on_error))
            _check_on_error(e)
            if t <= 0:
                raise ValueError(f"filter {name}: timeout must be positive")
            self._settings[name] = (t, e)

    def settings_for(self, flt: Any) -> tuple[float, str]:
        """(timeout, on_error) for one filter."""
        return self._settings.get(getattr(flt, "name", ""), (self.timeout, self.on_error))

    def __len__(self) -> int:
        return len(self.filters)

    def run(self, phase: str, *args: Any) -> Deferred[Verdict]:
        """-> Deferred[Verdict] for one phase ("connect", "helo", "mail", "rcpt", "data")."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        if not self.filters:
            return succeed(Verdict.CONTINUE)
        admission = self.admission
        if admission is None:
            return Deferred.fromCoroutine(self._run(phase, args))
        # bounded in flight, in total and per client (exmta.filters.admission)
        key = admission.enter(getattr(args[0], "peer_ip", "") or "")
        if key is None:
            log.warn("filter checks saturated: {phase} from {peer_ip} gets 451", phase=phase,
                     peer_ip=getattr(args[0], "peer_ip", ""))
            from exmta.filters.admission import BUSY

            return succeed(BUSY)
        d = Deferred.fromCoroutine(self._run(phase, args))

        def leave(result: Any) -> Any:
            admission.leave(key)
            return result

        return d.addBoth(leave)

    def on_connect(self, session: Any) -> Deferred[Verdict]:
        return self.run("connect", session)

    def on_helo(self, session: Any) -> Deferred[Verdict]:
        return self.run("helo", session)

    def on_mail(self, session: Any, sender: Any, params: Any) -> Deferred[Verdict]:
        return self.run("mail", session, sender, params)

    def on_rcpt(self, session: Any, txn: Any, rcpt: Any, params: Any) -> Deferred[Verdict]:
        return self.run("rcpt", session, txn, rcpt, params)

    def on_data(self, session: Any, txn: Any, message: Any) -> Deferred[Verdict]:
        return self.run("data", session, txn, message)

    async def _run(self, phase: str, args: tuple[Any, ...]) -> Verdict:
        for flt in self.filters:
            method = getattr(flt, "on_" + phase, None)
            if method is None:
                continue
            name = getattr(flt, "name", type(flt).__name__)
            timeout, on_error = self.settings_for(flt)
            mark = _view_mark(args[2]) if phase == "data" else None
            d = call_hook(method, *args)
            d.addTimeout(timeout, self.clock)
            try:
                verdict = await d
            except Exception:
                log.failure("filter {filter_name} failed in phase {phase}", filter_name=name, phase=phase)
                if on_error == "continue":
                    continue
                return dataclasses.replace(FILTER_ERROR, filter_name=name)
            if mark is not None:
                _note_agent(args[2], name, mark)
            if not isinstance(verdict, Verdict):
                log.error(
                    "filter {filter_name} returned {result!r} in phase {phase}, not a Verdict",
                    filter_name=name, result=verdict, phase=phase,
                )
                if on_error == "continue":
                    continue
                return dataclasses.replace(FILTER_ERROR, filter_name=name)
            if verdict.action in (Action.CONTINUE, Action.ACCEPT):
                continue  # filters cannot accept: ACCEPT means "no objection"
            log.info(
                "filter {filter_name} gave {action} in phase {phase}",
                filter_name=name, action=verdict.action.value, phase=phase,
            )
            if self.verdict_observer is not None:
                try:
                    self.verdict_observer(name, phase, verdict.action.value)
                except Exception:
                    log.failure("filter verdict observer failed")
            # the deciding filter's name travels with the verdict (the server tracks it as AGENTINFO)
            return verdict if verdict.filter_name else dataclasses.replace(verdict, filter_name=name)
        return Verdict.CONTINUE


def _view_mark(view: Any) -> tuple[int, str | None]:
    """What a filter may change on a message view: (number of header edits, quarantine reason)."""
    edits = getattr(view, "edits", None)
    return len(getattr(edits, "ops", ())), getattr(view, "quarantine_reason", None)


def _note_agent(view: Any, name: str, before: tuple[int, str | None]) -> None:
    """Record on the view that filter ``name`` edited headers or quarantined (tracking's AGENTINFO)."""
    after = _view_mark(view)
    notes = getattr(view, "agent_notes", None)
    if after != before and notes is not None:
        notes.append((name, after[0] - before[0], after[1] if after[1] != before[1] else None))


# ---------------------------------------------------------------- headers


_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+\Z")
_FIELD_NAME_STR = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")
#: a field line the email package and a plain scan read alike: name, colon at once
_SIMPLE_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")


def header_block_length(data: bytes) -> int:
    """Octets of the header block at the start of ``data`` (without the empty separator line).

    The block ends at the first empty line, or before the first line that is
    neither a field nor a continuation (a message without a separator).
    Only whole lines count: a final line without CRLF is not part of it.
    """
    pos = 0
    n = len(data)
    first = True
    while pos < n:
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        line = data[pos:end]
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if first:
                break
        else:
            name, colon, _ = line.partition(b":")
            if not colon or not _FIELD_NAME.match(name.rstrip(b" \t")):
                break
        first = False
        pos = end + 2
    return pos


def _split_fields(block: bytes) -> list[tuple[str, bytes]]:
    """Raw fields of a header block: (lower-case name, bytes including continuation lines)."""
    fields: list[tuple[str, bytes]] = []
    # a field and its continuation lines in one piece (CRLF not followed by a space or tab ends
    # a field); joining line by line was quadratic in the number of continuation lines
    for raw in _FIELD_END.split(block)[:-1] if block else []:
        if raw[:1] in (b" ", b"\t") and fields:  # continuation lines before any field: glued on
            name, prev = fields[-1]
            fields[-1] = (name, prev + raw + b"\r\n")
            continue
        name = raw.partition(b":")[0].rstrip(b" \t").decode("ascii", "replace").lower()
        fields.append((name, raw + b"\r\n"))
    return fields


#: the end of one field: CRLF not followed by folding white space
_FIELD_END = re.compile(rb"\r\n(?![ \t])")


def longest_field(block: bytes) -> int:
    """Octets of the longest field of a header block, continuation lines included (linear)."""
    if not block:
        return 0
    return max(map(len, _FIELD_END.split(block))) + 2


#: a line break inside a value is allowed only as folding: CRLF followed by a space or tab
_BAD_BREAK = re.compile(r"\r(?!\n[ \t])|(?<!\r)\n|\r\n(?![ \t])")


def _unfolded_value(raw: bytes) -> str:
    """The value of one raw field (after the colon), unfolded, as text."""
    value = raw.partition(b":")[2]
    return re.sub(rb"\r\n(?=[ \t])", b"", value).rstrip(b"\r\n").decode("utf-8", "replace")


def _check_field(name: str, value: str) -> None:
    if not _FIELD_NAME_STR.match(name):
        raise ValueError(f"bad header name {name!r}")
    if _BAD_BREAK.search(value) or value.endswith(("\r\n ", "\r\n\t")):
        raise ValueError("header values may contain CR LF only as folding before a space or tab (no injection)")


class HeaderEdits:
    """A journal of header changes made by filters; applied once, before commit.

    ``ops`` is a list of ("add", name, value) (append to the block),
    ("insert", name, value) (prepend), ("replace", name, value) (first
    occurrence, appended when missing), ("remove", name) (every occurrence),
    ("remove_prefix", prefix) (every field whose name starts so) and
    ("remove_matching", name, regex) (every field of that name whose
    unfolded value matches the regex, case-insensitively).
    Values may be folded ("CRLF" then a space or tab).
    """

    def __init__(self) -> None:
        self.ops: list[tuple[str, ...]] = []

    def __bool__(self) -> bool:
        return bool(self.ops)

    def add_header(self, name: str, value: str) -> None:
        _check_field(name, value)
        self.ops.append(("add", name, value))

    def insert_header(self, name: str, value: str) -> None:
        _check_field(name, value)
        self.ops.append(("insert", name, value))

    def replace_header(self, name: str, value: str) -> None:
        _check_field(name, value)
        self.ops.append(("replace", name, value))

    def remove_header(self, name: str) -> None:
        _check_field(name, "")
        self.ops.append(("remove", name))

    def change_header(self, name: str, index: int, value: str) -> None:
        """Set the ``index``-th (1-based) ``name`` field to ``value``; an empty value removes it.

        With fewer fields of that name, a non-empty value is appended (the milter protocol's rule).
        """
        _check_field(name, value)
        self.ops.append(("change", name, str(int(index)), value))

    def insert_header_at(self, position: int, name: str, value: str) -> None:
        """Insert a field before the ``position``-th field of the block (0: at the top; past the end: last)."""
        _check_field(name, value)
        self.ops.append(("insert_at", name, str(int(position)), value))

    def remove_header_matching(self, name: str, pattern: str) -> None:
        """Remove every ``name`` field whose unfolded value matches ``pattern`` (``re.search``, no case).

        E.g. forged Authentication-Results that claim this server's authserv-id.
        """
        _check_field(name, "")
        re.compile(pattern)
        self.ops.append(("remove_matching", name, pattern))

    def remove_headers_with_prefix(self, prefix: str) -> None:
        """Remove every field whose name starts with ``prefix`` (case-insensitive), e.g. a header firewall."""
        _check_field(prefix, "")
        self.ops.append(("remove_prefix", prefix))

    def apply(self, block: bytes) -> bytes:
        """The header block with every operation applied, in order."""
        fields = _split_fields(block)
        for op in self.ops:
            kind, name = op[0], op[1]
            key = name.lower()
            if kind == "remove":
                fields = [f for f in fields if f[0] != key]
                continue
            if kind == "remove_prefix":
                fields = [f for f in fields if not f[0].startswith(key)]
                continue
            if kind == "remove_matching":
                rx = re.compile(op[2], re.IGNORECASE)
                fields = [f for f in fields if f[0] != key or not rx.search(_unfolded_value(f[1]))]
                continue
            if kind in ("change", "insert_at"):
                fields = _positional(fields, kind, name, int(op[2]), op[3])
                continue
            raw = f"{name}: {op[2]}\r\n".encode("utf-8")
            if kind == "add":
                fields.append((key, raw))
            elif kind == "insert":
                fields.insert(0, (key, raw))
            elif kind == "replace":
                for i, (fname, _) in enumerate(fields):
                    if fname == key:
                        fields[i] = (key, raw)
                        break
                else:
                    fields.append((key, raw))
        return b"".join(raw for _, raw in fields)


def _positional(fields: list[tuple[str, bytes]], kind: str, name: str, index: int,
                value: str) -> list[tuple[str, bytes]]:
    """The ("change", name, n, value) and ("insert_at", name, position, value) journal operations."""
    key = name.lower()
    raw = f"{name}: {value}\r\n".encode("utf-8")
    out = list(fields)
    if kind == "insert_at":
        out.insert(max(0, index), (key, raw))
        return out
    seen = 0
    for i, (fname, _) in enumerate(out):
        if fname == key:
            seen += 1
            if seen == max(1, index):
                if value:
                    out[i] = (key, raw)
                else:
                    del out[i]
                return out
    if value:
        out.append((key, raw))
    return out


@implementer(IMessageView)
class MessageView:
    """A message as filters see it at end of data.

    ``source`` is the whole message as bytes (tests, plugin authors) or a
    callable returning a new binary file positioned at the start (the spool).
    The header block is parsed once; the body is never read unless a filter
    calls :meth:`open_body`.
    """

    def __init__(self, source: bytes | Callable[[], BinaryIO], size: int | None = None,
                 head: bytes | None = None) -> None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            content = bytes(source)
            self._open: Callable[[], BinaryIO] = lambda: io.BytesIO(content)
            self.size = len(content) if size is None else size
            head = content[:MAX_HEADER_BLOCK]
        else:
            self._open = source
            self.size = size if size is not None else 0
        length = -1
        if head is not None:
            # ``head``: a prefix of the content the caller already holds (the spool writer keeps
            # one), used when it decides the header block without reading the file
            length = header_block_length(head)
            if not (len(head) >= min(self.size, MAX_HEADER_BLOCK) or head.find(b"\r\n", length) >= 0):
                length = -1
        if length < 0:
            with self._open() as f:
                head = f.read(MAX_HEADER_BLOCK)
            length = header_block_length(head)
        assert head is not None
        self.header_length = length
        #: False when the header block did not end within the octets read (MAX_HEADER_BLOCK): then
        #: filters would see only part of it, and the server refuses the message (issue 11 item 12)
        self.header_complete = not (self.size > len(head) and head.find(b"\r\n", length) < 0)
        self.raw_headers = head[:length]
        self._headers: email.message.Message | None = None
        self._index: dict[bytes, list[str]] | bool | None = None  # see field_values
        self.edits = HeaderEdits()
        self.quarantine_reason: str | None = None
        #: (filter name, header edits it made, quarantine reason it set) per filter that edited or
        #: quarantined; the FilterChain fills it, the server tracks each as AGENTINFO after RECEIVE
        self.agent_notes: list[tuple[str, int, str | None]] = []
        #: a new body (everything after the header block) set by a filter, e.g. an attachment removed;
        #: the server writes it before the header journal is applied
        self.new_body: bytes | None = None
        #: the message's one MIME parse (exmta.message.MimeMessage), shared by content filters
        self.mime_message: Any = None
        #: envelope recipient edits by filters (a milter's SMFIR_ADDRCPT / DELRCPT): ("add", address,
        #: ESMTP args) and ("delete", address, ()); the server applies them with :meth:`edit_envelope`
        self.recipient_edits: list[tuple[str, str, tuple[str, ...]]] = []
        #: the queue id the message will have, when ``source`` is the spool writer's ``open_read``
        self.queue_id: str | None = getattr(getattr(source, "__self__", None), "queue_id", None)
        #: extra tracking details per filter name (e.g. ``{"check": "macro: a.doc"}``), added to the
        #: AGENTINFO event of a filter that edited the message
        self.agent_details: dict[str, dict[str, str]] = {}

    @property
    def headers(self) -> email.message.Message:
        """The header block parsed by the email package, on first use (most messages never need it)."""
        if self._headers is None:
            self._headers = BytesHeaderParser(policy=compat32).parsebytes(self.raw_headers + b"\r\n")
        return self._headers

    def field_values(self, name: str) -> list[str]:
        """Raw values of every ``name`` field, as ``headers.raw_items()`` gives them.

        A plain scan of the raw block (done once per view) when every line is a
        simple field or a continuation (the usual case); otherwise the email
        package decides, so the answer is the same either way.
        """
        if self._index is None:
            self._index = self._scan_fields()
        if self._index is not False:
            return list(self._index.get(name.lower().encode("ascii"), ()))
        return [v for k, v in self.headers.raw_items() if k.lower() == name.lower()]

    def _scan_fields(self) -> dict[bytes, list[str]] | bool:
        """{lower-case name: raw values} of the header block, or False when it needs the email package."""
        block = self.raw_headers
        crlf = block.count(b"\r\n")
        if block.count(b"\r") != crlf or block.count(b"\n") != crlf:
            return False  # bare CR or LF: the email package splits lines differently
        index: dict[bytes, list[str]] = {}
        # one split per field (its continuation lines included), not a string grown line by line:
        # that was quadratic, 5.5 s on the reactor for 349k continuation lines (issue 11 item 1)
        for raw in _FIELD_END.split(block)[:-1] if block else ():
            if raw[:1] in (b" ", b"\t"):
                continue  # continuation lines before the first field belong to no field
            m = _SIMPLE_FIELD.match(raw)
            if m is None:
                return False
            index.setdefault(raw[:m.end() - 1].lower(), []).append(
                raw[m.end():].lstrip(b" \t").decode("ascii", "surrogateescape"))
        return index

    def quarantine(self, reason: str) -> None:
        """Queue the message in hold/ with ``reason`` once it is accepted (the first reason wins)."""
        if self.quarantine_reason is None:
            self.quarantine_reason = str(reason).replace("\r", " ").replace("\n", " ")[:500]

    def add_recipient(self, address: str, args: Sequence[str] = ()) -> None:
        """Add an envelope recipient (``NOTIFY=`` and ``ORCPT=`` in ``args`` are kept for its DSN)."""
        address = _bare_address(address)
        if not address or any(c in address for c in "\r\n\0 <>"):
            raise ValueError(f"bad recipient address {address[:80]!r}")
        self.recipient_edits.append(("add", address, tuple(args)))

    def delete_recipient(self, address: str) -> None:
        """Remove an envelope recipient (compared without case); unknown addresses change nothing."""
        self.recipient_edits.append(("delete", _bare_address(address), ()))

    def edit_envelope(self, envelope: Any) -> Any:
        """``envelope`` with the recipient edits applied, in order (the same object when there are none)."""
        if not self.recipient_edits:
            return envelope
        from exmta.model import Recipient

        recipients = list(envelope.recipients)
        for kind, address, args in self.recipient_edits:
            key = address.lower()
            if kind == "delete":
                recipients = [r for r in recipients if r.address.lower() != key]
            elif all(r.address.lower() != key for r in recipients):
                notify, orcpt = _dsn_args(args)
                recipients.append(Recipient(address, notify, orcpt))
        return dataclasses.replace(envelope, recipients=recipients)

    def replace_body(self, body: bytes) -> None:
        """Replace everything after the header block (CRLF line ends; headers go through ``edits``)."""
        self.new_body = bytes(body)

    def open_body(self) -> BinaryIO:
        """A new binary file reading the whole message from its first octet."""
        return self._open()

    def edited_headers(self) -> bytes:
        """The header block after the edits journal (the original block when there are none)."""
        if not self.edits or self._only_vain_removals():
            return self.raw_headers
        return self.edits.apply(self.raw_headers)

    def _only_vain_removals(self) -> bool:
        """True when every edit removes fields whose name occurs nowhere in the block (the header
        firewall on almost every message): then the block is unchanged, without splitting it."""
        lowered = None
        for op in self.edits.ops:
            if op[0] not in ("remove", "remove_prefix"):
                return False
            if lowered is None:
                lowered = b"\r\n" + self.raw_headers.lower()
            needle = b"\r\n" + op[1].lower().encode("ascii")
            if needle in lowered:
                return False
        return True

    def apply_edits(self, writer: Any) -> int:
        """Write the edited header block through ``writer.replace_headers``; returns the size change."""
        if not self.edits:
            return 0
        new = self.edited_headers()
        if new == self.raw_headers:  # e.g. the header firewall found nothing to remove: no rewrite
            return 0
        writer.replace_headers(self.header_length, new)
        return len(new) - self.header_length


def _bare_address(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


def _dsn_args(args: Sequence[str]) -> tuple[tuple[str, ...] | None, str | None]:
    """RFC 3461 NOTIFY and ORCPT from ESMTP RCPT arguments (others are ignored)."""
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    for arg in args:
        key, _, value = arg.partition("=")
        if key.upper() == "NOTIFY" and value:
            words = tuple(w.upper() for w in value.split(","))
            if words == ("NEVER",) or set(words) <= {"SUCCESS", "FAILURE", "DELAY"}:
                notify = words
        elif key.upper() == "ORCPT" and ";" in value:
            orcpt = value
    return notify, orcpt
