"""Delivery status notifications (RFC 3464), worded like Exchange's NDRs.

:func:`make_dsn` builds one ``multipart/report; report-type=delivery-status``
message for some recipients of a queued message, and the envelope to queue
it with (null sender, kind ``"dsn"``). It is pure: no I/O except reading the
original content it is given, and the time comes in as ``now``.

Choices worth knowing:

* The third part is the whole original (``message/rfc822``) for a failed
  DSN with RET=FULL or no RET. It is only the header block
  (``text/rfc822-headers``) for RET=HDRS, for ``delayed``, ``delivered`` and ``relayed``
  reports (as Postfix does), when the original is larger than
  ``max_full_size`` (1 MiB by default) and when the original was sent as
  BINARYMIME (which cannot be nested in an 8-bit message). At most
  ``max(max_full_size, HEADER_LIMIT)`` octets of the original are read, and
  a header block with no end in sight is returned up to ``HEADER_LIMIT``
  (256 KiB) in whole lines.
* When the original used SMTPUTF8 (or any address involved is not ASCII)
  the report follows RFC 6533: ``message/global-delivery-status`` with
  ``utf-8`` address types for non-ASCII addresses, and ``message/global`` /
  ``message/global-headers`` for the third part; the DSN envelope then asks
  for SMTPUTF8.
* Lines end in CRLF; values are single lines (CR/LF removed) and diagnostic
  texts are cut at 900 characters to stay under the 998-octet line limit.
* ``Remote-MTA`` is given when the scheduler knows the remote host that
  answered (``remote_hosts``: address -> ``"mx.example.net[192.0.2.1]:25"``).
"""
from __future__ import annotations

import datetime
import quopri
import secrets
from collections.abc import Mapping, Sequence
from email.header import Header, decode_header, make_header
from email.parser import HeaderParser
from email.policy import compat32
from email.utils import format_datetime
from typing import BinaryIO

from exmta.model import Body, Envelope, MailParams, Recipient, RecipientStatus

MAX_FULL_SIZE = 1024 * 1024
HEADER_LIMIT = 256 * 1024  # a header block without an end is returned up to here (whole lines)
KINDS = ("failed", "delayed", "delivered", "relayed")

_SUBJECT_PREFIX = {"failed": "Undeliverable", "delayed": "Delivery delayed", "delivered": "Delivered",
                   "relayed": "Relayed"}

# what an administrator-free reader is told, by enhanced status code (Exchange-like wording)
_EXPLANATIONS = {
    "5.1.1": "The email address wasn't found at the destination domain. It might be misspelled or it might not exist.",
    "5.1.10": "The email address wasn't found at the destination domain. It might be misspelled or it might not exist.",
    "5.2.2": "The recipient's mailbox is full and can't accept messages now.",
    "5.2.3": "The message is too large for this recipient.",
    "5.3.4": "The message is larger than the size limit of the recipient's server.",
    "5.4.4": "The message couldn't be routed: there is no send connector for the recipient's domain.",
    "5.4.6": "The message looped between servers and was stopped.",
    "5.4.7": "The message couldn't be delivered before it expired. The recipient's server didn't accept it in time.",
    "5.7.1": "The recipient's server or an organisation policy refused the message.",
}


def _line(value: str, limit: int = 900) -> str:
    """One header-safe line: no CR/LF, at most ``limit`` characters."""
    text = " ".join(value.replace("\r", " ").replace("\n", " ").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ascii(value: str) -> str:
    """Non-ASCII characters as ``?``: message/delivery-status is 7-bit (RFC 3464)."""
    return value.encode("ascii", "replace").decode("ascii")


def _date(ts: float) -> str:
    return format_datetime(datetime.datetime.fromtimestamp(ts, datetime.timezone.utc))


def _read_original(original: BinaryIO | bytes, max_full_size: int) -> tuple[bytes, bytes | None]:
    """-> (header block, whole message or None when larger than max_full_size)."""
    if isinstance(original, (bytes, bytearray, memoryview)):
        data = bytes(original)
        whole: bytes | None = data if len(data) <= max_full_size else None
        head = data
    else:
        original.seek(0)
        head = original.read(max(max_full_size, HEADER_LIMIT) + 1)
        whole = head if len(head) <= max_full_size else None
    end = _header_end(head)
    if end is None:
        # no end of header block in sight (or a header-only message): whole lines, bounded
        headers = head[:HEADER_LIMIT]
        if len(head) > HEADER_LIMIT:
            headers = headers[: headers.rfind(b"\n") + 1]
    else:
        headers = head[:end]
    return headers, whole


def _header_end(data: bytes) -> int | None:
    """Offset just past the header block's last line (before the empty line), or None."""
    if data.startswith(b"\r\n") or data.startswith(b"\n"):
        return 0
    crlf = data.find(b"\r\n\r\n")
    lf = data.find(b"\n\n")
    ends = [i + 2 for i in (crlf,) if i >= 0] + [i + 1 for i in (lf,) if i >= 0]
    return min(ends) if ends else None


def _crlf(data: bytes) -> bytes:
    """Normalise line endings to CRLF."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _status(r: Recipient, kind: str) -> str:
    reply = r.last_reply
    code = reply.status if reply is not None and reply.status else None
    if kind in ("delivered", "relayed"):
        return code if code and code.startswith("2.") else "2.0.0"
    if kind == "delayed":
        return code if code and code.startswith("4.") else "4.0.0"
    if r.status is RecipientStatus.EXPIRED:
        return "5.4.7"
    if code and code.startswith("5."):
        return code
    if code:
        return "5" + code[1:]
    return "5.0.0"


def _host_name(remote_host: str) -> str:
    """``mx.example.net[192.0.2.1]:25`` -> ``mx.example.net`` (or ``[192.0.2.1]`` without a name)."""
    name, bracket, rest = remote_host.partition("[")
    if name:
        return name.strip()
    if bracket:
        return "[" + rest.partition("]")[0] + "]"
    return remote_host.rsplit(":", 1)[0]


def _address_field(address: str, utf8: bool) -> str:
    if utf8 and not address.isascii():
        return f"utf-8; {address}"
    return f"rfc822; {address}"


def _explain(r: Recipient, kind: str, status: str) -> str:
    if kind == "delivered":
        return "Your message was delivered to this recipient's mailbox."
    if kind == "relayed":
        return ("Your message was handed to the recipient's server, which doesn't send delivery "
                "notifications: no further notification will be sent.")
    if kind == "delayed":
        return "Delivery hasn't succeeded yet. The server will keep trying to deliver this message."
    return _EXPLANATIONS.get(status, "The recipient's server refused the message permanently.")


def _human_text(
    envelope: Envelope,
    recipients: Sequence[Recipient],
    kind: str,
    statuses: list[str],
    reporting_mta: str,
    remote_hosts: Mapping[str, str],
    retry_until: float | None,
    postmaster: str,
) -> str:
    lines: list[str] = []
    if kind == "failed":
        lines.append("Delivery has failed to these recipients or groups:")
    elif kind == "delayed":
        lines.append("Delivery is delayed to these recipients or groups:")
    elif kind == "relayed":
        lines.append("Your message has been relayed to the following recipients, but the servers didn't "
                     "send a delivery notification:")
    else:
        lines.append("Your message has been delivered to the following recipients:")
    lines.append("")
    for r, status in zip(recipients, statuses):
        lines.append(r.address)
        lines.append(_explain(r, kind, status))
        lines.append("")
    if kind == "delayed" and retry_until is not None:
        lines.append(f"The server will keep trying until {_date(retry_until)}. You don't need to resend the message.")
        lines.append("")
    if kind not in ("delivered", "relayed"):
        lines.append(f"If the problem continues, contact your email administrator: {postmaster}.")
        lines.append("")
    lines.append("Diagnostic information for administrators:")
    lines.append("")
    lines.append(f"Generating server: {reporting_mta}")
    lines.append("")
    for r in recipients:
        lines.append(r.address)
        host = remote_hosts.get(r.address)
        if host:
            lines.append(f"Remote server: {_line(host)}")
        if r.status is RecipientStatus.EXPIRED:
            lines.append("QUEUE.Expired; message expired")
        if r.last_reply is not None:
            who = "Remote server" if host else "Server"
            lines.append(f"{who} returned '{_line(str(r.last_reply))}'")
        if r.last_attempt is not None:
            lines.append(f"Last attempt: {_date(r.last_attempt)}")
        lines.append("")
    lines.append(f"Original message sender: {envelope.sender or '<>'}")
    if envelope.message_id:
        lines.append(f"Original message id: {_line(envelope.message_id)}")
    return "\r\n".join(lines) + "\r\n"


def _text_part(text: str) -> bytes:
    raw = text.encode("utf-8")
    if text.isascii():
        return b"Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n" + raw
    encoded = _crlf(quopri.encodestring(raw.replace(b"\r\n", b"\n")))
    return (
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n" + encoded
    )


def _status_part(
    envelope: Envelope,
    recipients: Sequence[Recipient],
    kind: str,
    statuses: list[str],
    reporting_mta: str,
    remote_hosts: Mapping[str, str],
    retry_until: float | None,
    utf8: bool,
) -> bytes:
    def clean(value: str) -> str:
        return _line(value) if utf8 else _ascii(_line(value))

    fields = [f"Reporting-MTA: dns; {clean(reporting_mta)}"]
    if envelope.params.envid:
        fields.append(f"Original-Envelope-Id: {clean(envelope.params.envid)}")
    if envelope.received_at:
        fields.append(f"Arrival-Date: {_date(envelope.received_at)}")
    blocks = ["\r\n".join(fields)]
    for r, status in zip(recipients, statuses):
        f: list[str] = []
        if r.orcpt:
            orcpt = _line(r.orcpt)
            f.append(f"Original-Recipient: {orcpt if ';' in orcpt else 'rfc822;' + orcpt}")
        f.append(f"Final-Recipient: {_address_field(_line(r.address), utf8)}")
        f.append(f"Action: {kind}")
        f.append(f"Status: {status}")
        host = remote_hosts.get(r.address)
        if host:
            f.append(f"Remote-MTA: dns; {clean(_host_name(host))}")
        if r.last_reply is not None:
            f.append(f"Diagnostic-Code: smtp; {clean(str(r.last_reply))}")
        if r.last_attempt is not None:
            f.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
        if kind == "delayed" and retry_until is not None:
            f.append(f"Will-Retry-Until: {_date(retry_until)}")
        blocks.append("\r\n".join(f))
    ctype = "message/global-delivery-status" if utf8 else "message/delivery-status"
    body = "\r\n\r\n".join(blocks) + "\r\n"
    return f"Content-Type: {ctype}\r\n\r\n".encode("ascii") + body.encode("utf-8")


def make_dsn(
    envelope: Envelope,
    recipients: Sequence[Recipient],
    kind: str,
    reporting_mta: str,
    original: BinaryIO | bytes,
    now: float,
    postmaster: str = "postmaster",
    *,
    remote_hosts: Mapping[str, str] | None = None,
    retry_until: float | None = None,
    max_full_size: int = MAX_FULL_SIZE,
) -> tuple[bytes, Envelope]:
    """Build a DSN about ``recipients`` of ``envelope`` -> (message bytes, envelope to queue).

    ``kind`` is ``"failed"``, ``"delayed"``, ``"delivered"`` or ``"relayed"`` (the Action).
    ``original`` is the queued message (bytes, or a binary file read from its
    start). ``postmaster`` is a local part (``@reporting_mta`` is added) or a
    whole address; it is named in the text as the contact. ``retry_until``
    is the expiry time, given as Will-Retry-Until in delayed reports.
    Callers decide who gets a DSN (NOTIFY, null sender, kind "dsn"); this
    function only refuses the impossible: no recipients or a null sender.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    if not envelope.sender or envelope.sender == "<>":
        raise ValueError("never send a DSN to the null sender")
    hosts = dict(remote_hosts or {})
    postmaster_address = postmaster if "@" in postmaster else f"{postmaster}@{reporting_mta}"
    utf8 = envelope.params.smtputf8 or not all(
        a.isascii() for a in [envelope.sender, *(r.address for r in recipients), *(r.orcpt or "" for r in recipients)]
    )

    headers, whole = _read_original(original, max_full_size)
    ret = (envelope.params.ret or "FULL").upper()
    full = (
        kind == "failed" and ret != "HDRS" and whole is not None and envelope.params.body is not Body.BINARY
    )
    # decoded as UTF-8 (RFC 6532 headers); a legacy 8-bit charset degrades to U+FFFD, never fails
    parsed = HeaderParser(policy=compat32).parsestr(headers.decode("utf-8", "replace"))
    subject = _decoded(parsed.get("Subject"))
    original_id = envelope.message_id or _line(str(parsed.get("Message-ID") or "")) or None
    if original_id and not original_id.isascii():
        original_id = None

    statuses = [_status(r, kind) for r in recipients]
    boundary = f"=_exmta-dsn-{secrets.token_hex(12)}"
    msgid = f"<{int(now * 1_000_000):X}.{secrets.token_hex(8).upper()}.dsn@{reporting_mta}>"
    title = _SUBJECT_PREFIX[kind] + (f": {_line(subject, 400)}" if subject else "")

    head = [
        f'From: "Mail Delivery System" <MAILER-DAEMON@{reporting_mta}>',
        f"To: <{envelope.sender}>",
        f"Subject: {_encode_header(title)}",
        f"Date: {_date(now)}",
        f"Message-ID: {msgid}",
    ]
    if original_id:
        head.append(f"In-Reply-To: {original_id}")
        head.append(f"References: {original_id}")
    head += [
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-formatted message. Portions of it might be unreadable without a MIME-capable mail program.",
        "",
    ]
    sep = f"--{boundary}\r\n".encode("ascii")
    parts = [
        _text_part(_human_text(envelope, recipients, kind, statuses, reporting_mta, hosts, retry_until,
                               postmaster_address)),
        _status_part(envelope, recipients, kind, statuses, reporting_mta, hosts, retry_until, utf8),
    ]
    if full:
        assert whole is not None
        ctype = "message/global" if utf8 else "message/rfc822"
        content = _crlf(whole)
    else:
        ctype = "message/global-headers" if utf8 else "text/rfc822-headers"
        content = _crlf(headers)
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    parts.append(f"Content-Type: {ctype}\r\n\r\n".encode("ascii") + content)

    out = ("\r\n".join(head) + "\r\n").encode("utf-8")
    for part in parts:
        if not part.endswith(b"\r\n"):
            part += b"\r\n"
        out += sep + part + b"\r\n"
    out += f"--{boundary}--\r\n".encode("ascii")

    eight_bit = not out.isascii()
    dsn_envelope = Envelope(
        sender="",
        recipients=[Recipient(address=envelope.sender, notify=("NEVER",))],
        params=MailParams(
            size=len(out),
            body=Body.EIGHT_BIT if eight_bit else Body.SEVEN_BIT,
            smtputf8=utf8,
        ),
        received_at=now,
        connector="dsn",
        message_id=msgid,
        size=len(out),
        kind="dsn",
    )
    return out, dsn_envelope


def _decoded(value: object) -> str:
    """A header value as text, with RFC 2047 encoded words decoded."""
    if value is None:
        return ""
    try:
        return str(make_header(decode_header(str(value))))
    except Exception:
        return str(value)


def _encode_header(text: str) -> str:
    if text.isascii():
        return text
    return Header(text, "utf-8", maxlinelen=76, header_name="Subject").encode()


__all__ = ["KINDS", "MAX_FULL_SIZE", "make_dsn"]

