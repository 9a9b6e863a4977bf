"""The MIME view of one message: decoded headers first, the part tree on demand.

:class:`MimeMessage` is built from the message bytes and parses nothing until
asked. ``headers`` parses the top header block only (RFC 2047 encoded words
and RFC 6532 UTF-8 decoded); ``root`` walks the MIME structure with the
message's :class:`~exmta.message.limits.InspectionBudget`, recording each
entity's byte offsets so that body edits can splice one part and leave every
other octet as it was. Broken MIME (a missing closing boundary, bad base64,
an unknown charset) is read as leniently as mail clients do and noted in
``defects``; a limit passed stops the walk and sets ``problems``.

Not thread-safe: one message is inspected by one thread (the rules run it on
a bounded pool, off the reactor thread).
"""
from __future__ import annotations

import binascii
import email.message
import email.utils
import quopri
import re
import time
import email.errors
import email.header
from email.parser import HeaderParser, Parser
from email.policy import compat32
from email.policy import default as default_policy
from typing import Any, Callable, Iterator

from exmta.message.limits import InspectionBudget, LimitExceeded, Limits

__all__ = ["MimeMessage", "Part", "decode_header_text"]

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_HEADER_PARSER = Parser(policy=default_policy)
_FAST_PARSER = HeaderParser(policy=compat32)
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def _text(block: bytes) -> str:
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError:
        return block.decode("latin-1")


def decode_header_text(block: bytes) -> email.message.EmailMessage:
    """A header block as an EmailMessage (headers only): UTF-8 (RFC 6532), else Latin-1."""
    return _HEADER_PARSER.parsestr(_text(block), headersonly=True)  # type: ignore[return-value]


def decode_words(value: str) -> str:
    """A raw header value unfolded, RFC 2047 encoded words decoded (malformed ones kept as they are)."""
    value = _FOLD.sub("", value).strip()
    if "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return value


def _fields(block: bytes) -> list[tuple[str, str]]:
    """(lower-case name, raw value) of every field of a header block (continuations joined)."""
    msg = _FAST_PARSER.parsestr(_text(block), headersonly=True)
    return [(k.lower(), v) for k, v in msg.raw_items()]


def _split_head(raw: bytes, start: int, end: int) -> tuple[int, int]:
    """(end of the header block, start of the body) of the entity raw[start:end]."""
    if raw.startswith(b"\r\n", start) and start + 2 <= end:
        return start, start + 2
    if raw.startswith(b"\n", start) and start + 1 <= end:
        return start, start + 1
    m = _HEADER_END.search(raw, start, end)
    if m is None:
        return end, end
    return m.start() + (2 if raw[m.start():m.start() + 2] == b"\r\n" else 1), m.end()


def _is_delimiter(raw: bytes, after: int, end: int) -> bool:
    """Whether a boundary string ending at ``after`` is a whole delimiter line (RFC 2046 5.1.1)."""
    if raw.startswith(b"--", after) or after >= end:
        return True
    while after < end and raw[after] in (0x20, 0x09):
        after += 1
    return after >= end or raw[after] in (0x0D, 0x0A)


class Part:
    """One MIME entity: its headers, declared type, name, and (on demand) decoded content.

    ``start``/``end`` are offsets of the whole entity (headers included) in
    ``raw``; ``body_start`` is where its body begins. ``path`` is the IMAP
    style part number ("" for the message itself, "1.2" for the second part
    of the first part).
    """

    def __init__(self, message: MimeMessage, raw: bytes, start: int, end: int, path: str, depth: int,
                 default_type: str = "text/plain") -> None:
        self.message = message
        self.raw = raw
        self.start = start
        self.end = end
        self.path = path
        self.depth = depth
        self.header_end, self.body_start = _split_head(raw, start, end)
        #: the part's header fields, parsed the fast (compat32) way: get_param, get_content_type, ...
        self.headers = _FAST_PARSER.parsestr(_text(raw[start:self.header_end]), headersonly=True)
        h = self.headers
        # a missing or unparsable Content-Type means the default (RFC 2045 5.2; message/rfc822 in a digest)
        ctype = h.get_content_type() if "/" in str(h.get("content-type", "")) else default_type
        self.content_type: str = ctype.lower()
        self.charset: str | None = h.get_content_charset()
        self.cte: str = str(h.get("content-transfer-encoding", "7bit")).strip().lower() or "7bit"
        disposition = h.get_content_disposition()
        self.disposition: str | None = disposition.lower() if disposition else None
        try:
            name = h.get_filename() or h.get_param("name", header="content-type")
        except Exception:
            name = None
        if isinstance(name, tuple):  # an RFC 2231 value the email package could not collapse
            name = email.utils.collapse_rfc2231_value(name)
        # RFC 2047 words inside a quoted name are wrong but common (Outlook, Gmail): decode them
        self.filename: str | None = decode_words(str(name)) if name else None
        self.children: list[Part] = []
        self.defects: list[str] = []
        self._payload: bytes | None = None
        self._true_type: str | None = None
        #: what an archive attachment holds (exmta.message.content.ArchiveInfo), set by MimeMessage.inspect()
        self.archive: Any = None

    # ---------------------------------------------------------- structure

    @property
    def is_multipart(self) -> bool:
        return self.content_type.startswith("multipart/")

    @property
    def is_message(self) -> bool:
        return self.content_type == "message/rfc822"

    @property
    def is_attachment(self) -> bool:
        """A part a user would see as an attachment: named, or declared so, or not a body type."""
        if self.is_multipart or (self.is_message and self.disposition != "attachment"):
            return False
        if self.disposition == "attachment" or self.filename:
            return True
        return not (self.content_type.startswith("text/") or self.content_type == "message/rfc822")

    @property
    def extension(self) -> str:
        """The file name's extension, lower case, without the dot ("" when none)."""
        name = self.filename or ""
        return name.rpartition(".")[2].lower() if "." in name else ""

    @property
    def encoded_body(self) -> bytes:
        return self.raw[self.body_start:self.end]

    def header_values(self, name: str) -> list[str]:
        """Every decoded value of the part's field ``name``."""
        return [decode_words(str(v)) for v in self.headers.get_all(name) or ()]

    def walk(self) -> Iterator[Part]:
        yield self
        for child in self.children:
            yield from child.walk()

    # ---------------------------------------------------------- content

    def payload(self) -> bytes:
        """The body after Content-Transfer-Encoding, spent from the message's decoded-size budget."""
        if self._payload is None:
            body = self.encoded_body
            budget = self.message.budget
            estimate = len(body) * 3 // 4 if self.cte == "base64" else len(body)
            budget.spend_decoded(estimate)
            self._payload = self._decode(body)
        return self._payload

    def _decode(self, body: bytes) -> bytes:
        if self.cte == "base64":
            cleaned = re.sub(rb"[^A-Za-z0-9+/=]", b"", body)
            try:
                return binascii.a2b_base64(cleaned, strict_mode=False)
            except binascii.Error:
                self.defects.append("bad base64")
                cleaned = cleaned.rstrip(b"=")
                cleaned = cleaned[: len(cleaned) - len(cleaned) % 4]
                try:
                    return binascii.a2b_base64(cleaned)
                except binascii.Error:
                    return b""
        if self.cte == "quoted-printable":
            return quopri.decodestring(body)
        if self.cte not in ("7bit", "8bit", "binary"):
            self.defects.append(f"unknown Content-Transfer-Encoding {self.cte}")
        return body

    @property
    def size(self) -> int:
        """Decoded octets of a leaf (the encoded size is ``end - body_start``)."""
        return len(self.payload()) if not self.is_multipart else self.end - self.body_start

    def text(self) -> str:
        """The part's payload as text in its declared charset (a wrong charset reads as UTF-8/Latin-1)."""
        data = self.payload()
        charset = self.charset or "utf-8"
        try:
            return data.decode(charset)
        except LookupError:
            self.defects.append(f"unknown charset {charset}")
        except UnicodeDecodeError:
            self.defects.append(f"text not in its charset {charset}")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")

    @property
    def true_type(self) -> str:
        """The MIME type the payload's bytes say it is (puremagic), ``application/octet-stream`` if unknown."""
        if self._true_type is None:
            from exmta.message.content import sniff_type
            self._true_type = sniff_type(self.payload(), self.filename)
        return self._true_type

    def __repr__(self) -> str:
        return f"<Part {self.path or 'message'} {self.content_type} {self.filename!r}>"


class MimeMessage:
    """A spooled message as rules and filters inspect it (see the module docstring).

    ``raw`` is the whole message with CRLF line ends. ``clock`` measures the
    time limit (``time.monotonic``; tests pass a fake).
    """

    def __init__(self, raw: bytes, limits: Limits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.raw = bytes(raw)
        self.limits = limits or Limits()
        self.budget = InspectionBudget(self.limits, clock)
        self.header_end, self.body_start = _split_head(self.raw, 0, len(self.raw))
        self._headers: email.message.EmailMessage | None = None
        self._values: dict[str, list[str]] | None = None
        self._root: Part | None = None
        self._inspected = False
        #: why inspection stopped (a passed limit, an unreadable attachment); empty when it did not
        self.problems: list[str] = []

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def raw_headers(self) -> bytes:
        """The top header block, as received (its final CRLF included)."""
        return self.raw[:self.header_end]

    @property
    def body(self) -> bytes:
        return self.raw[self.body_start:]

    @property
    def headers(self) -> email.message.EmailMessage:
        """The top-level header fields as the email package's modern API sees them (parsed on first use).

        Slower than :meth:`header_values`, which rules and filters should prefer.
        """
        if self._headers is None:
            self._headers = decode_header_text(self.raw_headers)
        return self._headers

    def header_values(self, name: str) -> list[str]:
        """Every decoded value of the field ``name`` (RFC 2047 words decoded), in order.

        A fast path (one scan of the raw block, cached): rules ask this many times per message.
        """
        if self._values is None:
            values: dict[str, list[str]] = {}
            for key, raw in _fields(self.raw_headers):
                values.setdefault(key, []).append(decode_words(raw))
            self._values = values
        return list(self._values.get(name.lower(), ()))

    @property
    def subject(self) -> str:
        return " ".join(self.header_values("Subject"))

    # ---------------------------------------------------------- the tree

    @property
    def root(self) -> Part:
        """The part tree, parsed on first use. A passed limit leaves it partial and sets ``problems``."""
        if self._root is None:
            self._root = Part(self, self.raw, 0, len(self.raw), "", 0)
            try:
                self.budget.count_part(0)
                self._parse_children(self._root)
            except LimitExceeded as e:
                self.problems.append(e.reason)
        return self._root

    def _parse_children(self, part: Part) -> None:
        if part.is_multipart:
            self._split_multipart(part)
        elif part.is_message and part.cte in ("7bit", "8bit", "binary"):
            self._add_child(part, part.raw, part.body_start, part.end, part.path + ("." if part.path else "") + "1")

    def _add_child(self, parent: Part, raw: bytes, start: int, end: int, path: str,
                   default_type: str = "text/plain") -> None:
        self.budget.count_part(parent.depth + 1)
        child = Part(self, raw, start, end, path, parent.depth + 1, default_type)
        parent.children.append(child)
        self._parse_children(child)

    def _split_multipart(self, part: Part) -> None:
        boundary = part.headers.get_boundary()
        if not boundary:
            part.defects.append("multipart without a boundary")
            return
        raw, end = part.raw, part.end
        delim = b"--" + boundary.encode("utf-8", "replace")
        default = "message/rfc822" if part.content_type == "multipart/digest" else "text/plain"
        # delimiter lines: at the body start or after a line break
        pos = raw.find(delim, part.body_start, end)
        while pos >= 0 and not (pos == part.body_start or raw[pos - 1:pos] == b"\n"):
            pos = raw.find(delim, pos + 1, end)
        if pos < 0:
            part.defects.append("no boundary found")
            return
        prefix = part.path + "." if part.path else ""
        n = 0
        while True:
            after = pos + len(delim)
            if raw.startswith(b"--", after):
                return  # closing delimiter
            line_end = raw.find(b"\n", after, end)
            if line_end < 0:
                part.defects.append("truncated after a boundary")
                return
            start = line_end + 1
            nxt = raw.find(b"\n" + delim, start - 1, end)
            while nxt >= 0 and not _is_delimiter(raw, nxt + 1 + len(delim), end):
                nxt = raw.find(b"\n" + delim, nxt + 1, end)
            if nxt < 0:
                part.defects.append("missing closing boundary")
                stop = end
            else:
                stop = nxt - 1 if raw[nxt - 1:nxt] == b"\r" else nxt  # the CRLF before belongs to the boundary
                stop = max(stop, start)
            n += 1
            self._add_child(part, raw, start, stop, f"{prefix}{n}", default)
            if nxt < 0:
                return
            pos = nxt + 1

    def walk(self) -> Iterator[Part]:
        """Every part, depth first, the message itself first."""
        return self.root.walk()

    def attachments(self) -> list[Part]:
        """Parts a user would see as attachments (a forwarded message's parts included)."""
        return [p for p in self.walk() if p.is_attachment]

    def body_parts(self) -> list[Part]:
        """The text/plain and text/html parts that make up the visible body (not attachments)."""
        return [p for p in self.walk()
                if p.content_type in ("text/plain", "text/html") and not p.is_attachment
                and p.disposition != "attachment"]

    def body_text(self) -> str:
        """The visible body as plain text (HTML converted), within the limits."""
        from exmta.message.content import html_to_text
        texts = []
        try:
            for p in self.body_parts():
                t = p.text()[: self.limits.max_text]
                texts.append(html_to_text(t) if p.content_type == "text/html" else t)
        except LimitExceeded as e:
            self.problems.append(e.reason)
        return "\n".join(texts)

    # ---------------------------------------------------------- full inspection

    def inspect(self) -> list[str]:
        """Decode every leaf, sniff its true type and look into archives; returns ``problems``.

        Done once; afterwards ``could_not_be_inspected`` is exact.
        """
        if self._inspected:
            return self.problems
        self._inspected = True
        from exmta.message.content import inspect_archive
        root = self.root
        if self.problems:
            return self.problems
        try:
            for part in root.walk():
                self.budget.check_time()
                if part.is_multipart or (part.is_message and part.children):
                    continue
                part.payload()
                if part.is_attachment:
                    _ = part.true_type
                    info = inspect_archive(part, self.limits, self.budget)
                    if info is not None and info.problem:
                        self.problems.append(f"{part.filename or part.path}: {info.problem}")
        except LimitExceeded as e:
            self.problems.append(e.reason)
        return self.problems

    @property
    def could_not_be_inspected(self) -> bool:
        """True when a limit stopped inspection or an attachment could not be read (Exchange's
        ``AttachmentProcessingLimitExceeded``/``AttachmentIsUnsupported``)."""
        return bool(self.inspect())
