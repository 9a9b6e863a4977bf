"""RFC 5321 paths and the MAIL/RCPT parameters, parsed into model values.

Every failure raises :class:`ParamError` carrying the exact reply to send,
so the server never improvises codes. Parsing is strict where RFC 5321
matters for safety (brackets, quotes, parameter syntax) and lenient where
real senders are sloppy (a space after the colon, a missing pair of angle
brackets, doubled dots in a local part); the receive policy judges what
the syntax lets through (percent hacks, bang paths, trailing dots).

The xtext helpers (RFC 3461 section 4) are shared with the send side.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from exmta.model import Address, Body, MailParams, NULL_ADDRESS, RcptParams, Reply
from exmta.smtp import replies

__all__ = [
    "ParamError", "parse_mail", "parse_path", "parse_rcpt", "xtext_decode", "xtext_encode",
]

MAX_PATH = 256      # RFC 5321 4.5.3.1.3, including the angle brackets
MAX_DOMAIN = 255    # RFC 5321 4.5.3.1.2
MAX_LABEL = 63
MAX_ENVID = 100     # RFC 3461 4.4
MAX_SIZE_DIGITS = 20  # RFC 1870

_ATEXT_ASCII = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_ESMTP_VALUE_ASCII = re.compile(r"[\x21-\x3c\x3e-\x7e]+\Z")
_LABEL_ASCII = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_HEX = "0123456789ABCDEF"


class ParamError(ValueError):
    """A MAIL/RCPT argument could not be accepted; ``reply`` is what the client gets."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        super().__init__(detail or str(reply))
        self.reply = reply
        self.detail = detail


# ---------------------------------------------------------------- xtext (RFC 3461 4)


def xtext_encode(text: str) -> str:
    """Encode ``text`` as xtext: "+", "=", controls, space and non-ASCII become ``+HH`` (UTF-8 octets)."""
    out = []
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def xtext_decode(text: str) -> str:
    """Decode xtext; raises ValueError on a malformed ``+HH`` or a character xtext forbids."""
    out = bytearray()
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "+":
            hx = text[i + 1:i + 3]
            if len(hx) != 2 or any(h not in _HEX for h in hx.upper()):
                raise ValueError(f"bad xtext escape at {i}")
            out.append(int(hx, 16))
            i += 3
            continue
        o = ord(c)
        if not 33 <= o <= 126 or c == "=":
            raise ValueError(f"character {c!r} not allowed in xtext")
        out.append(o)
        i += 1
    return out.decode("utf-8", errors="replace")  # the envelope is stored as JSON text


def _utf8_addr_decode(text: str) -> str:
    """RFC 6533 utf-8-addr-xtext: ``\\x{HEX}`` escapes (used by ORCPT=utf-8;...)."""
    def repl(m: re.Match[str]) -> str:
        code = int(m.group(1), 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"bad code point {m.group(1)}")
        return chr(code)
    return re.sub(r"\\x\{([0-9A-Fa-f]{1,6})\}", repl, text)


# ---------------------------------------------------------------- paths


@dataclass(frozen=True)
class _Role:
    bad: Reply
    null_ok: bool


_SENDER = _Role(replies.BAD_SENDER_SYNTAX, True)
_RECIPIENT = _Role(replies.BAD_RECIPIENT_SYNTAX, False)


def _is_atext(c: str, smtputf8: bool) -> bool:
    return c in _ATEXT_ASCII or (smtputf8 and ord(c) > 127)


def _check_domain(domain: str, role: _Role, smtputf8: bool) -> None:
    if domain.startswith("["):
        _check_address_literal(domain, role)
        return
    body = domain[:-1] if domain.endswith(".") else domain  # a trailing dot is for the policy to judge
    if not body or len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise ParamError(role.bad, "bad domain length")
    for label in body.split("."):
        if not label or len(label.encode("utf-8")) > MAX_LABEL:
            raise ParamError(role.bad, "empty or long domain label")
        if label.isascii():
            if not _LABEL_ASCII.match(label):
                raise ParamError(role.bad, f"bad domain label {label!r}")
        else:
            if not smtputf8:
                raise ParamError(replies.NEED_SMTPUTF8, "non-ASCII domain")
            if any(c in " \t@[]<>()\\\",;:" or ord(c) < 33 for c in label) or label[0] == "-" or label[-1] == "-":
                raise ParamError(role.bad, f"bad domain label {label!r}")


def _check_address_literal(literal: str, role: _Role) -> None:
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        raise ParamError(role.bad, f"bad address literal {literal!r}") from None


def _scan_domain(s: str, i: int, role: _Role, smtputf8: bool, stops: str) -> tuple[str, int]:
    """Scan a domain or address literal starting at ``s[i]``; returns (domain, index after)."""
    if i < len(s) and s[i] == "[":
        end = s.find("]", i)
        if end < 0:
            raise ParamError(role.bad, "unmatched [")
        domain = s[i:end + 1]
        _check_domain(domain, role, smtputf8)
        return domain, end + 1
    j = i
    while j < len(s) and s[j] not in stops:
        j += 1
    domain = s[i:j]
    if not domain:
        raise ParamError(role.bad, "empty domain")
    _check_domain(domain, role, smtputf8)
    return domain, j


def parse_path(text: str, *, smtputf8: bool, sender: bool) -> tuple[Address, str]:
    """Parse ``<path>`` at the start of ``text``; returns the Address and the rest of the line.

    A source route (``<@a,@b:user@c>``) is accepted and dropped (RFC 5321
    4.1.2 and appendix C). ``<>`` is the null path, allowed for senders only.
    Without SMTPUTF8 a non-ASCII address raises 553 5.6.7.
    """
    role = _SENDER if sender else _RECIPIENT
    s = text
    if not s.startswith("<"):
        # lenient: MAIL FROM:user@example.com (no brackets, as Postfix accepts)
        token, sep, rest = s.partition(" ")
        if not token or "<" in token or ">" in token:
            raise ParamError(role.bad, "no path")
        s = f"<{token}>" + sep + rest
    if not smtputf8 and not s.split(">", 1)[0].isascii():
        raise ParamError(replies.NEED_SMTPUTF8, "non-ASCII address without SMTPUTF8")
    i = 1
    n = len(s)
    if s.startswith(">", i):
        if not role.null_ok:
            raise ParamError(role.bad, "null recipient")
        return NULL_ADDRESS, s[2:]
    # source route: "@" domain *("," "@" domain) ":"
    if s.startswith("@", i):
        while True:
            if not s.startswith("@", i):
                raise ParamError(role.bad, "bad source route")
            _, i = _scan_domain(s, i + 1, role, smtputf8, ",:>")
            if s.startswith(",", i):
                i += 1
                continue
            if s.startswith(":", i):
                i += 1
                break
            raise ParamError(role.bad, "bad source route")
    # local part
    start = i
    if s.startswith('"', i):
        i += 1
        while True:
            if i >= n:
                raise ParamError(role.bad, "unmatched quote")
            c = s[i]
            if c == "\\":
                if i + 1 >= n or not (32 <= ord(s[i + 1]) <= 126 or (smtputf8 and ord(s[i + 1]) > 127)):
                    raise ParamError(role.bad, "bad quoted pair")
                i += 2
                continue
            if c == '"':
                i += 1
                break
            if not (32 <= ord(c) <= 126 or (smtputf8 and ord(c) > 127)):
                raise ParamError(role.bad, "bad character in quoted string")
            i += 1
        local = s[start:i]
    else:
        while i < n and (_is_atext(s[i], smtputf8) or s[i] == "."):
            i += 1
        local = s[start:i]
        if not local or local.startswith("."):
            raise ParamError(role.bad, "bad local part")
    if i >= n:
        raise ParamError(role.bad, "unmatched <")
    if s[i] == ">":
        # <Postmaster> without a domain: the caller decides whether it is allowed
        domain = ""
    elif s[i] == "@":
        domain, i = _scan_domain(s, i + 1, role, smtputf8, ">")
        if i >= n or s[i] != ">":
            raise ParamError(role.bad, "unmatched <")
    else:
        raise ParamError(role.bad, f"unexpected {s[i]!r} in address")
    if i + 1 > MAX_PATH:
        raise ParamError(role.bad, "path too long")
    return Address(local, domain), s[i + 1:]


# ---------------------------------------------------------------- parameters


def _split_params(rest: str, bad: Reply) -> list[tuple[str, str | None]]:
    """``" KEY=value KEY2"`` -> [("KEY", "value"), ("KEY2", None)]; duplicates raise 501."""
    if rest and not rest.startswith(" "):
        raise ParamError(bad, "junk after path")
    seen: set[str] = set()
    out: list[tuple[str, str | None]] = []
    for token in rest.split(" "):
        if not token:
            continue
        key, eq, value = token.partition("=")
        if not _KEYWORD.match(key):
            raise ParamError(replies.SYNTAX_ERROR, f"bad parameter keyword {key!r}")
        key = key.upper()
        if key in seen:
            raise ParamError(replies.DUPLICATE_PARAMETER, f"duplicate {key}")
        seen.add(key)
        if eq:
            if not value or not (_ESMTP_VALUE_ASCII.match(value) or (not value.isascii() and "=" not in value)):
                raise ParamError(replies.SYNTAX_ERROR, f"bad value for {key}")
            out.append((key, value))
        else:
            out.append((key, None))
    return out


def _strip_prefix(argument: str, prefix: str) -> str | None:
    if argument[:len(prefix)].upper() != prefix:
        return None
    return argument[len(prefix):].lstrip(" ")


def _need_value(key: str, value: str | None) -> str:
    if value is None:
        raise ParamError(replies.SYNTAX_ERROR, f"{key} needs a value")
    return value


def parse_mail(
    argument: str, *, esmtp: bool = True, binarymime: bool = True,
) -> tuple[Address, MailParams]:
    """Parse the argument of MAIL (``FROM:<path> params``).

    ``esmtp`` is False after HELO: then no parameter is allowed (555).
    ``binarymime`` says whether BODY=BINARYMIME is advertised.
    """
    rest = _strip_prefix(argument, "FROM:")
    if rest is None or not rest:
        raise ParamError(replies.MAIL_SYNTAX, "missing FROM:")
    # parse permissively, then insist on SMTPUTF8 if the address needed it
    sender, tail = parse_path(rest, smtputf8=esmtp, sender=True)
    if not sender.is_null and not sender.domain:
        raise ParamError(replies.BAD_SENDER_SYNTAX, "sender without domain")
    items = _split_params(tail, replies.BAD_SENDER_SYNTAX)
    if items and not esmtp:
        raise ParamError(replies.UNKNOWN_PARAMETER, "parameters need EHLO")
    size: int | None = None
    body = Body.SEVEN_BIT
    smtputf8 = False
    ret = envid = auth = None
    for key, value in items:
        if key == "SIZE":
            v = _need_value(key, value)
            if not v.isdigit() or not v.isascii() or len(v) > MAX_SIZE_DIGITS:
                raise ParamError(replies.SYNTAX_ERROR, "bad SIZE")
            size = int(v)
        elif key == "BODY":
            v = _need_value(key, value).upper()
            if v == "7BIT":
                body = Body.SEVEN_BIT
            elif v == "8BITMIME":
                body = Body.EIGHT_BIT
            elif v == "BINARYMIME" and binarymime:
                body = Body.BINARY
            else:
                raise ParamError(replies.UNKNOWN_PARAMETER, f"BODY={v} not supported")
        elif key == "SMTPUTF8":
            if value is not None:
                raise ParamError(replies.SYNTAX_ERROR, "SMTPUTF8 takes no value")
            smtputf8 = True
        elif key == "RET":
            v = _need_value(key, value).upper()
            if v not in ("FULL", "HDRS"):
                raise ParamError(replies.SYNTAX_ERROR, "bad RET")
            ret = v
        elif key == "ENVID":
            v = _need_value(key, value)
            if len(v) > MAX_ENVID:
                raise ParamError(replies.SYNTAX_ERROR, "ENVID too long")
            envid = _decode_or_fail(v)
        elif key == "AUTH":
            v = _need_value(key, value)
            auth = "<>" if v == "<>" else _decode_or_fail(v)
        else:
            raise ParamError(replies.UNKNOWN_PARAMETER, f"unsupported parameter {key}")
    if not smtputf8 and not sender.is_ascii():
        raise ParamError(replies.NEED_SMTPUTF8, "non-ASCII sender without SMTPUTF8")
    return sender, MailParams(size=size, body=body, smtputf8=smtputf8, ret=ret, envid=envid, auth=auth)


def _decode_or_fail(value: str) -> str:
    try:
        return xtext_decode(value)
    except ValueError as e:
        raise ParamError(replies.SYNTAX_ERROR, f"bad xtext: {e}") from None


_NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def parse_rcpt(
    argument: str, *, smtputf8: bool = False, esmtp: bool = True,
) -> tuple[Address, RcptParams]:
    """Parse the argument of RCPT (``TO:<path> params``).

    ``smtputf8`` is whether the transaction's MAIL carried SMTPUTF8. A path
    without a domain is accepted only for ``<postmaster>`` (RFC 5321 4.1.1.3).
    """
    rest = _strip_prefix(argument, "TO:")
    if rest is None or not rest:
        raise ParamError(replies.RCPT_SYNTAX, "missing TO:")
    rcpt, tail = parse_path(rest, smtputf8=smtputf8, sender=False)
    if not rcpt.domain and rcpt.local.lower() != "postmaster":
        raise ParamError(replies.BAD_RECIPIENT_SYNTAX, "recipient without domain")
    items = _split_params(tail, replies.BAD_RECIPIENT_SYNTAX)
    if items and not esmtp:
        raise ParamError(replies.UNKNOWN_PARAMETER, "parameters need EHLO")
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    for key, value in items:
        if key == "NOTIFY":
            words = tuple(w.upper() for w in _need_value(key, value).split(","))
            if words == ("NEVER",):
                notify = words
            elif not words or any(w not in _NOTIFY_VALUES for w in words) or len(set(words)) != len(words):
                raise ParamError(replies.SYNTAX_ERROR, "bad NOTIFY")
            else:
                notify = words
        elif key == "ORCPT":
            addr_type, semi, addr = _need_value(key, value).partition(";")
            if not semi or not addr or not _KEYWORD.match(addr_type):
                raise ParamError(replies.SYNTAX_ERROR, "bad ORCPT")
            if addr_type.lower() == "utf-8":
                try:
                    decoded = _utf8_addr_decode(addr)
                except ValueError:
                    raise ParamError(replies.SYNTAX_ERROR, "bad ORCPT utf-8 address") from None
            else:
                decoded = _decode_or_fail(addr)
            orcpt = f"{addr_type};{decoded}"
        else:
            raise ParamError(replies.UNKNOWN_PARAMETER, f"unsupported parameter {key}")
    return rcpt, RcptParams(notify=notify, orcpt=orcpt)
