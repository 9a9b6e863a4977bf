"""Body edits that keep a message valid: disclaimers and attachment removal.

An edit splices only the parts it changes: every other octet of the body
stays as received, and top-level header changes are returned as operations
for the byte-preserving header journal (:class:`exmta.filters.base.HeaderEdits`),
never written here. A signed or encrypted body is never modified: a
disclaimer there follows Exchange's fallback (``wrap`` in a new
multipart/mixed beside the untouched original, ``ignore``, or ``reject``).
"""
from __future__ import annotations

import base64
import email.quoprimime
import html
import random
import re
from dataclasses import dataclass, field

from exmta.message.parse import MimeMessage, Part

__all__ = ["BodyEdit", "DisclaimerRejected", "apply_disclaimer", "remove_parts", "SIGNED_TYPES"]

SIGNED_TYPES = frozenset({"multipart/signed", "multipart/encrypted", "application/pkcs7-mime",
                          "application/x-pkcs7-mime", "application/pgp-encrypted"})
FALLBACKS = ("wrap", "ignore", "reject")


class DisclaimerRejected(Exception):
    """The body is signed or encrypted and the disclaimer's fallback is ``reject``."""


@dataclass
class BodyEdit:
    """A changed message: journal operations for the top header block, and the new body (or None)."""

    header_ops: list[tuple[str, ...]] = field(default_factory=list)
    body: bytes | None = None
    note: str = ""  #: what was done ("appended to 2 parts", "wrapped", "ignored: signed")

    @property
    def changed(self) -> bool:
        return bool(self.header_ops) or self.body is not None


def _boundary() -> str:
    return "=_exmta_" + "".join(random.choices("0123456789abcdefghijklmnopqrstuvwxyz", k=24))


def _text_from_html(markup: str) -> str:
    from exmta.message.content import html_to_text
    return html_to_text(markup).strip()


def _html_from_text(text: str) -> str:
    return "<br>\r\n".join(html.escape(line) for line in text.splitlines())


def _crlf(text: str) -> str:
    return re.sub(r"\r?\n", "\r\n", text)


# ---------------------------------------------------------------- encoding one text part


def _encode_body(data: bytes, cte: str) -> bytes:
    if cte == "base64":
        return base64.encodebytes(data).replace(b"\n", b"\r\n")
    if cte == "quoted-printable":
        lines = data.replace(b"\r\n", b"\n").split(b"\n")
        encoded = [email.quoprimime.body_encode(line.decode("latin-1"), maxlinelen=76, eol="\r\n")
                   for line in lines]
        return "\r\n".join(encoded).encode("ascii")
    return data


def _choose_cte(data: bytes, original: str) -> str:
    if original in ("base64", "quoted-printable"):
        return original
    long_line = any(len(line) > 998 for line in data.split(b"\r\n"))
    if data.isascii() and not long_line:
        return original if original in ("7bit", "8bit") else "7bit"
    return "quoted-printable"


def _retext_part(part: Part, new_text: str) -> tuple[dict[str, str], bytes]:
    """(changed content headers, new encoded body) of a text part whose text became ``new_text``."""
    charset = (part.charset or "us-ascii").lower()
    try:
        data = new_text.encode(charset)
    except (LookupError, UnicodeEncodeError):
        charset = "utf-8"
        data = new_text.encode("utf-8")
    cte = _choose_cte(data, part.cte)
    changes: dict[str, str] = {}
    if charset != (part.charset or "us-ascii").lower():
        params = [(k, v) for k, v in (part.headers.get_params() or [])[1:] if k.lower() != "charset"]
        value = part.content_type + f'; charset="{charset}"' + "".join(f'; {k}="{v}"' for k, v in params)
        changes["Content-Type"] = value
    if cte != part.cte:
        changes["Content-Transfer-Encoding"] = cte
    return changes, _encode_body(data, cte)


def _insert(text: str, addition: str, location: str, is_html: bool) -> str:
    if is_html:
        if location == "prepend":
            m = re.search(r"<body[^>]*>", text, re.IGNORECASE)
            at = m.end() if m else 0
            return text[:at] + addition + "\r\n" + text[at:]
        ends = list(re.finditer(r"</body\s*>", text, re.IGNORECASE))
        at = ends[-1].start() if ends else len(text)
        return text[:at] + "\r\n" + addition + "\r\n" + text[at:]
    if location == "prepend":
        return addition + "\r\n\r\n" + text
    sep = "" if text.endswith("\r\n") or not text else "\r\n"
    return text + sep + "\r\n" + addition + "\r\n"


def _part_header_block(part: Part, changes: dict[str, str]) -> bytes:
    """The part's raw header block with ``changes`` replacing (or adding) fields, the rest kept."""
    from exmta.filters.base import HeaderEdits
    block = part.raw[part.start:part.header_end]
    if not changes:
        return block
    journal = HeaderEdits()
    for name, value in changes.items():
        journal.replace_header(name, value)
    return journal.apply(block)


# ---------------------------------------------------------------- the splice


class _Splicer:
    """Collects replacements of whole entities and builds the new message (body + header ops)."""

    def __init__(self, msg: MimeMessage) -> None:
        self.msg = msg
        self.spans: list[tuple[int, int, bytes]] = []
        self.header_ops: list[tuple[str, ...]] = []
        self.root_body: bytes | None = None

    def replace(self, part: Part, changes: dict[str, str], body: bytes) -> None:
        if part.path == "":
            for name, value in changes.items():
                self.header_ops.append(("replace", name, value))
            self.root_body = body
            return
        block = _part_header_block(part, changes)
        sep = part.raw[part.header_end:part.body_start] or b"\r\n"
        self.spans.append((part.start, part.end, block + sep + body))

    def replace_entity(self, part: Part, entity_headers: dict[str, str], body: bytes) -> None:
        """Replace a part with a new entity (its headers all new)."""
        if part.path == "":
            for name in ("Content-Type", "Content-Transfer-Encoding", "Content-Disposition"):
                if name in entity_headers:
                    self.header_ops.append(("replace", name, entity_headers[name]))
                else:
                    self.header_ops.append(("remove", name))
            self.root_body = body
            return
        block = "".join(f"{k}: {v}\r\n" for k, v in entity_headers.items()).encode("utf-8")
        self.spans.append((part.start, part.end, block + b"\r\n" + body))

    def result(self, note: str) -> BodyEdit:
        if self.root_body is not None:
            return BodyEdit(self.header_ops, self.root_body, note)
        if not self.spans:
            return BodyEdit(self.header_ops, None, note)
        raw = self.msg.raw
        out = []
        pos = self.msg.body_start
        for start, end, data in sorted(self.spans):
            if start < pos:
                continue  # inside a part already replaced
            out.append(raw[pos:start])
            out.append(data)
            pos = end
        out.append(raw[pos:])
        return BodyEdit(self.header_ops, b"".join(out), note)


def _editable(msg: MimeMessage, part: Part) -> bool:
    """Only parts whose octets are the message's own (not inside an encoded message/rfc822)."""
    return part.raw is msg.raw


def _body_targets(part: Part) -> list[Part] | None:
    """The parts that show the message body, or None when the body is signed or encrypted."""
    ctype = part.content_type
    if ctype in SIGNED_TYPES or (ctype == "application/octet-stream" and (part.extension in ("p7m",))):
        return None
    if ctype in ("text/plain", "text/html") and not part.is_attachment:
        return [part]
    if ctype == "multipart/alternative":
        found: list[Part] = []
        for child in part.children:
            sub = _body_targets(child)
            if sub is None:
                return None
            found.extend(p for p in sub if p not in found)
        return found
    if part.is_multipart and part.children:
        return _body_targets(part.children[0])
    return []


def apply_disclaimer(msg: MimeMessage, text: str | None = None, html_text: str | None = None,
                     location: str = "append", fallback: str = "wrap") -> BodyEdit:
    """Insert a disclaimer into every body part (text/plain gets ``text``, text/html ``html_text``).

    Either text may be omitted; the other is converted. A signed or encrypted
    body takes ``fallback``: ``wrap`` (a new multipart/mixed holding the
    original entity untouched and the disclaimer), ``ignore`` (no change) or
    ``reject`` (raises :class:`DisclaimerRejected`).
    """
    if location not in ("append", "prepend"):
        raise ValueError(f"location must be append or prepend, not {location!r}")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, not {fallback!r}")
    if text is None and html_text is None:
        raise ValueError("a disclaimer needs text or html")
    plain = _crlf(text if text is not None else _text_from_html(html_text or ""))
    markup = _crlf(html_text if html_text is not None else _html_from_text(text or ""))
    targets = _body_targets(msg.root)
    if targets is not None and not all(_editable(msg, p) for p in targets):
        targets = None
    if targets is None:
        if fallback == "ignore":
            return BodyEdit(note="ignored: signed or encrypted body")
        if fallback == "reject":
            raise DisclaimerRejected("the body is signed or encrypted")
        return _wrap(msg, plain, markup)
    splicer = _Splicer(msg)
    if not targets:
        return _wrap(msg, plain, markup)
    for part in targets:
        is_html = part.content_type == "text/html"
        changes, body = _retext_part(part, _insert(part.text(), markup if is_html else plain, location, is_html))
        splicer.replace(part, changes, body)
    return splicer.result(f"disclaimer in {len(targets)} part(s)")


def _content_fields(block: bytes) -> bytes:
    """The Content-* fields of a header block, raw (continuations kept)."""
    out = []
    keep = False
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line)
            continue
        keep = line.lower().startswith(b"content-")
        if keep:
            out.append(line)
    return b"".join(line + b"\r\n" for line in out)


def _wrap(msg: MimeMessage, plain: str, markup: str) -> BodyEdit:
    """Put the original entity, untouched, first in a new multipart/mixed and the disclaimer after it."""
    boundary = _boundary()
    inner_head = _content_fields(msg.raw_headers) or b"Content-Type: text/plain\r\n"
    notice = plain.encode("utf-8")
    body = b"".join([
        b"This is a multi-part message in MIME format.\r\n",
        b"--", boundary.encode(), b"\r\n", inner_head, b"\r\n", msg.body,
        b"" if msg.body.endswith(b"\r\n") else b"\r\n",
        b"--", boundary.encode(), b"\r\n",
        b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n',
        b"Content-Disposition: inline\r\n\r\n", _encode_body(notice, "quoted-printable"), b"\r\n",
        b"--", boundary.encode(), b"--\r\n",
    ])
    ops: list[tuple[str, ...]] = [
        ("remove", "Content-Transfer-Encoding"), ("remove", "Content-Disposition"),
        ("replace", "Content-Type", f'multipart/mixed; boundary="{boundary}"'),
        ("replace", "MIME-Version", "1.0"),
    ]
    return BodyEdit(ops, body, "wrapped")


def remove_parts(msg: MimeMessage, parts: list[Part], notice: str) -> BodyEdit:
    """Replace each part by a short text/plain notice (``{name}`` in ``notice`` is its file name)."""
    splicer = _Splicer(msg)
    removed = 0
    for part in parts:
        if not _editable(msg, part):
            continue
        text = _crlf(notice.replace("{name}", part.filename or "attachment"))
        splicer.replace_entity(part, {
            "Content-Type": 'text/plain; charset="utf-8"',
            "Content-Transfer-Encoding": "quoted-printable",
            "Content-Disposition": "inline",
        }, _encode_body(text.encode("utf-8"), "quoted-printable") + b"\r\n")
        removed += 1
    return splicer.result(f"removed {removed} attachment(s)")
