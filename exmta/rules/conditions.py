"""Rule predicates, named as Exchange names them (``New-TransportRule`` parameters).

Each predicate is built from its TOML value by :func:`build_condition`
(a ValueError names the problem) and answers ``match(ctx, location)``:
``True``/``False`` for message predicates, or the set of matching
recipients for recipient predicates (``SentTo``, ``RecipientDomainIs``,
``SentToScope``, ...), so that a reject can refuse only those recipients.

Words match whole words or phrases, case-insensitively; patterns are
Python regular expressions searched case-insensitively (Exchange uses .NET
regular expressions, which agree on the common syntax).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from exmta.interfaces import IRuleCondition
from exmta.message import LimitExceeded, is_executable
from exmta.rules.context import RuleContext, domain_of

__all__ = ["CONDITIONS", "COMPANIONS", "Condition", "build_condition", "parse_size"]



# ---------------------------------------------------------------- value converters


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError("must be a non-empty string or list of non-empty strings")
    return tuple(v.strip() for v in value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {value!r}")
    return value


def _words(value: Any) -> re.Pattern[str]:
    words = _strings(value)
    return re.compile("|".join(r"(?<!\w)" + re.escape(w) + r"(?!\w)" for w in words), re.IGNORECASE)


def _patterns(value: Any) -> re.Pattern[str]:
    pats = _strings(value)
    for p in pats:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"bad pattern {p!r}: {e}") from None
    return re.compile("|".join(f"(?:{p})" for p in pats), re.IGNORECASE)


_SIZE = re.compile(r"^\s*([0-9][0-9,]*(?:\.[0-9]+)?)\s*(B|KB|MB|GB|TB)?\b", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}


def parse_size(value: Any) -> int:
    """Octets from an int or Exchange's "20 MB" / "20 MB (20,971,520 bytes)" / "100KB"."""
    if isinstance(value, bool):
        raise ValueError(f"must be a size such as \"20 MB\", not {value!r}")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1).replace(",", "")) * _UNITS[(m.group(2) or "").upper()])
    raise ValueError(f"must be a size such as \"20 MB\" or a number of octets, not {value!r}")


def _ranges(value: Any) -> tuple[Any, ...]:
    out = []
    for item in _strings(value):
        try:
            if "-" in item:
                lo, hi = (ipaddress.ip_address(x.strip()) for x in item.split("-", 1))
                out.append((lo, hi))
            else:
                net = ipaddress.ip_network(item, strict=False)
                out.append((net[0], net[-1]))
        except ValueError as e:
            raise ValueError(f"bad IP range {item!r}: {e}") from None
    return tuple(out)


def _scope(value: Any) -> str:
    allowed = {"inorganization": "in", "notinorganization": "out", "externalpartner": "out",
               "externalnonpartner": "out"}
    if not isinstance(value, str) or value.replace(" ", "").lower() not in allowed:
        raise ValueError("must be InOrganization or NotInOrganization")
    return allowed[value.replace(" ", "").lower()]


_MESSAGE_TYPES = ("oof", "autoforward", "encrypted", "calendaring", "permissioncontrolled", "voicemail",
                  "signed", "approvalrequest", "readreceipt")


def _message_type(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in _MESSAGE_TYPES:
        raise ValueError("must be one of OOF, AutoForward, Encrypted, Calendaring, PermissionControlled, "
                         "Voicemail, Signed, ApprovalRequest, ReadReceipt")
    return value.lower()


def _scl(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= 9:
        raise ValueError(f"must be an integer from -1 to 9, not {value!r}")
    return value


# ---------------------------------------------------------------- the predicates


@dataclass(frozen=True)
class Condition:
    """One built predicate: its Exchange name, its value (for messages) and how it matches."""

    name: str
    value: Any
    test: Callable[[RuleContext, str], Any]
    recipient_scoped: bool = False

    def match(self, ctx: RuleContext, location: str) -> Any:
        """True/False, or (recipient predicates) the frozenset of matching recipients."""
        try:
            return self.test(ctx, location)
        except LimitExceeded as e:
            ctx.message.problems.append(e.reason)
            return frozenset() if self.recipient_scoped else False

    def describe(self) -> str:
        shown = self.value if not isinstance(self.value, re.Pattern) else self.value.pattern
        return f"{self.name}={shown!r}"


def _rcpts(ctx: RuleContext, pred: Callable[[str], bool]) -> frozenset[str]:
    return frozenset(r for r in ctx.recipients if pred(r.lower()))


def _any(items: Iterable[str], pred: Callable[[str], bool]) -> bool:
    return any(pred(i) for i in items)


def _body_text(ctx: RuleContext) -> str:
    if "body" not in ctx.cache:
        ctx.cache["body"] = ctx.message.body_text()
    return ctx.cache["body"]  # type: ignore[return-value]


def _header_any(ctx: RuleContext, name: str, rx: re.Pattern[str]) -> bool:
    return any(rx.search(v) for v in ctx.message.header_values(name))


def _attachments(ctx: RuleContext) -> list[Any]:
    return ctx.message.attachments()


def _attachment_text(part: Any) -> str:
    if part.content_type.startswith("text/") or part.true_type.startswith("text/"):
        return part.text()
    from exmta.message.content import extract_text
    return extract_text(part)


def _message_type_test(kind: str) -> Callable[[RuleContext, str], bool]:
    def test(ctx: RuleContext, _: str) -> bool:
        msg = ctx.message
        ctype = msg.root.content_type
        if kind == "oof":
            sub = msg.subject.lower()
            auto = " ".join(msg.header_values("Auto-Submitted")).lower()
            return "auto-replied" in auto or sub.startswith(("automatic reply:", "out of office")) \
                or bool(msg.header_values("X-Autoreply"))
        if kind == "autoforward":
            return bool(msg.header_values("X-MS-Exchange-Inbox-Rules-Loop")) or \
                "auto-generated" in " ".join(msg.header_values("Auto-Submitted")).lower() and \
                msg.subject.lower().startswith(("fw:", "fwd:"))
        if kind == "encrypted":
            return ctype in ("multipart/encrypted", "application/pkcs7-mime", "application/x-pkcs7-mime") and \
                (ctype == "multipart/encrypted" or "signed-data" not in
                 str(msg.root.headers.get_param("smime-type") or "").lower())
        if kind == "signed":
            return ctype == "multipart/signed" or "signed-data" in str(msg.root.headers.get_param("smime-type") or "")
        if kind == "calendaring":
            return any(p.content_type == "text/calendar" for p in msg.walk())
        if kind == "readreceipt":
            return any(p.content_type == "message/disposition-notification" for p in msg.walk()) or \
                msg.root.headers.get_param("report-type") == "disposition-notification"
        if kind == "voicemail":
            return any(v.lower().startswith("voice") for v in msg.header_values("Message-Context"))
        if kind == "permissioncontrolled":
            return any(p.extension == "rpmsg" for p in msg.attachments())
        if kind == "approvalrequest":
            return bool(msg.header_values("X-MS-Exchange-Organization-Approval-Requestor"))
        return False
    return test


def _build_table() -> dict[str, tuple[Callable[[Any], Any], Callable[..., Callable[[RuleContext, str], Any]], bool]]:
    """{predicate: (convert value, make test from the converted value, recipient scoped)}."""
    def sender(pred: Callable[[str], bool]) -> Callable[[RuleContext, str], bool]:
        return lambda ctx, loc: _any(ctx.senders(loc), pred)

    def lower_set(v: Any) -> frozenset[str]:
        return frozenset(s.lower() for s in _strings(v))

    def domains(v: Any) -> frozenset[str]:
        return frozenset(s.lower().lstrip("@").rstrip(".") for s in _strings(v))

    def in_domains(address: str, ds: frozenset[str]) -> bool:
        d = domain_of(address)
        return any(d == x or d.endswith("." + x) for x in ds)

    def ip_in(ctx: RuleContext, ranges: tuple[Any, ...]) -> bool:
        if not ctx.client_ip:
            return False
        try:
            ip = ipaddress.ip_address(ctx.client_ip.split("%")[0])
        except ValueError:
            return False
        return any(lo.version == ip.version and lo <= ip <= hi for lo, hi in ranges)

    def member(ctx: RuleContext, address: str, groups: frozenset[str]) -> bool:
        if ctx.member_of is None:
            return False
        return address in groups or any(ctx.member_of(address, g) for g in groups)

    def from_scope(scope: str) -> Callable[[RuleContext, str], bool]:
        def test(ctx: RuleContext, loc: str) -> bool:
            inside = ctx.trusted and _any(ctx.senders(loc), ctx.is_internal)
            return inside if scope == "in" else not inside
        return test

    def sent_to_scope(scope: str) -> Callable[[RuleContext, str], frozenset[str]]:
        return lambda ctx, loc: _rcpts(ctx, lambda r: ctx.is_internal(r) == (scope == "in"))

    def attachment(pred: Callable[[Any], bool]) -> Callable[[RuleContext, str], bool]:
        return lambda ctx, loc: any(pred(p) for p in _attachments(ctx))

    def size_over(n: int) -> Callable[[RuleContext, str], bool]:
        return lambda ctx, loc: ctx.message.size > n

    def true_types(v: Any) -> tuple[str, ...]:
        return tuple(t.lower() for t in _strings(v))

    def type_matches(t: str, wanted: tuple[str, ...]) -> bool:
        return any(t == w or (w.endswith("/*") and t.startswith(w[:-1])) for w in wanted)

    def rcpt_rx(rx: re.Pattern[str]) -> Callable[[RuleContext, str], frozenset[str]]:
        return lambda ctx, loc: _rcpts(ctx, lambda r: bool(rx.search(r)))

    def subject_rx(rx: re.Pattern[str]) -> Callable[[RuleContext, str], bool]:
        return lambda ctx, loc: bool(rx.search(ctx.message.subject))

    def flag(test: Callable[[RuleContext, str], bool]) -> Callable[[bool], Callable[[RuleContext, str], bool]]:
        return lambda want: (lambda ctx, loc: test(ctx, loc) == want)

    return {
        # -- sender
        "From": (lower_set, lambda s: sender(lambda a: a in s), False),
        "FromAddressContainsWords": (_words, lambda rx: sender(lambda a: bool(rx.search(a))), False),
        "FromAddressMatchesPatterns": (_patterns, lambda rx: sender(lambda a: bool(rx.search(a))), False),
        "SenderDomainIs": (domains, lambda ds: sender(lambda a: in_domains(a, ds)), False),
        "FromScope": (_scope, from_scope, False),
        "FromMemberOf": (lower_set, lambda gs: (lambda ctx, loc: _any(ctx.senders(loc),
                                                                    lambda a: member(ctx, a, gs))), False),
        "SenderIpRanges": (_ranges, lambda rs: (lambda ctx, loc: ip_in(ctx, rs)), False),
        "ReceivedOnConnector": (frozenset, lambda cs: (lambda ctx, loc: ctx.connector in cs), False),
        "SenderIsAuthenticated": (_bool, flag(lambda ctx, loc: ctx.authenticated), False),
        # -- recipients (per recipient)
        "SentTo": (lower_set, lambda s: (lambda ctx, loc: _rcpts(ctx, lambda r: r in s)), True),
        "RecipientDomainIs": (domains, lambda ds: (lambda ctx, loc: _rcpts(ctx, lambda r: in_domains(r, ds))), True),
        "RecipientAddressContainsWords": (_words, rcpt_rx, True),
        "RecipientAddressMatchesPatterns": (_patterns, rcpt_rx, True),
        "SentToScope": (_scope, sent_to_scope, True),
        "SentToMemberOf": (lower_set, lambda gs: (lambda ctx, loc: _rcpts(ctx, lambda r: member(ctx, r, gs))), True),
        "HasNoRecipientInOrganization": (_bool, flag(lambda ctx, loc: not any(ctx.is_internal(r)
                                                                             for r in ctx.recipients)), False),
        "AnyOfToHeader": (lower_set, lambda s: (lambda ctx, loc: _any(_addresses(ctx, "To"), lambda a: a in s)), False),
        "AnyOfCcHeader": (lower_set, lambda s: (lambda ctx, loc: _any(_addresses(ctx, "Cc"), lambda a: a in s)), False),
        "AnyOfToCcHeader": (lower_set, lambda s: (lambda ctx, loc: _any(_addresses(ctx, "To") + _addresses(ctx, "Cc"),
                                                                        lambda a: a in s)), False),
        # -- subject, body, headers
        "SubjectContainsWords": (_words, subject_rx, False),
        "SubjectMatchesPatterns": (_patterns, subject_rx, False),
        "SubjectOrBodyContainsWords": (_words, lambda rx: (lambda ctx, loc: bool(
            rx.search(ctx.message.subject) or rx.search(_body_text(ctx)))), False),
        "SubjectOrBodyMatchesPatterns": (_patterns, lambda rx: (lambda ctx, loc: bool(
            rx.search(ctx.message.subject) or rx.search(_body_text(ctx)))), False),
        "BodyContainsWords": (_words, lambda rx: (lambda ctx, loc: bool(rx.search(_body_text(ctx)))), False),
        "BodyMatchesPatterns": (_patterns, lambda rx: (lambda ctx, loc: bool(rx.search(_body_text(ctx)))), False),
        "HeaderContainsWords": (_words, None, False),       # with HeaderContainsMessageHeader
        "HeaderMatchesPatterns": (_patterns, None, False),  # with HeaderMatchesMessageHeader
        "WithImportance": (_importance, lambda want: (lambda ctx, loc: _importance_of(ctx) == want), False),
        "MessageSizeOver": (parse_size, size_over, False),
        "SCLOver": (_scl, lambda n: (lambda ctx, loc: ctx.scl is not None and ctx.scl >= n), False),
        "MessageTypeMatches": (_message_type, _message_type_test, False),
        # -- attachments
        "AttachmentNameMatchesPatterns": (_patterns, lambda rx: attachment(lambda p: bool(rx.search(p.filename or ""))),
                                          False),
        "AttachmentExtensionMatchesWords": (lambda v: frozenset(s.lower().lstrip(".") for s in _strings(v)),
                                            lambda xs: attachment(lambda p: p.extension in xs), False),
        "AttachmentTrueTypeMatches": (true_types, lambda ts: attachment(lambda p: type_matches(p.true_type, ts)),
                                      False),
        "AttachmentSizeOver": (parse_size, lambda n: attachment(lambda p: p.size > n), False),
        "AttachmentContainsWords": (_words, lambda rx: attachment(lambda p: bool(rx.search(_attachment_text(p)))),
                                    False),
        "AttachmentMatchesPatterns": (_patterns, lambda rx: attachment(lambda p: bool(rx.search(_attachment_text(p)))),
                                      False),
        "AttachmentHasExecutableContent": (_bool, flag(lambda ctx, loc: any(is_executable(p) for p in _inspected(ctx))),
                                           False),
        "AttachmentIsPasswordProtected": (_bool, flag(lambda ctx, loc: any(
            p.archive is not None and p.archive.encrypted for p in _inspected(ctx))), False),
        "AttachmentIsUnsupported": (_bool, flag(lambda ctx, loc: ctx.message.could_not_be_inspected), False),
        "AttachmentProcessingLimitExceeded": (_bool, flag(lambda ctx, loc: ctx.message.could_not_be_inspected), False),
    }


def _inspected(ctx: RuleContext) -> list[Any]:
    ctx.message.inspect()
    return ctx.message.attachments()


def _addresses(ctx: RuleContext, name: str) -> list[str]:
    import email.utils
    return [a.lower() for _, a in email.utils.getaddresses(ctx.message.header_values(name)) if a]


def _importance(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in ("low", "normal", "high"):
        raise ValueError("must be Low, Normal or High")
    return value.lower()


def _importance_of(ctx: RuleContext) -> str:
    for v in ctx.message.header_values("Importance"):
        if v.strip().lower() in ("low", "normal", "high"):
            return v.strip().lower()
    for v in ctx.message.header_values("X-Priority"):
        digit = v.strip()[:1]
        if digit in ("1", "2"):
            return "high"
        if digit in ("4", "5"):
            return "low"
    return "normal"


_TABLE = _build_table()
#: a predicate that needs a second key: {header-name key: value key}
COMPANIONS = {"HeaderContainsMessageHeader": "HeaderContainsWords",
              "HeaderMatchesMessageHeader": "HeaderMatchesPatterns"}
CONDITIONS = frozenset(_TABLE) | frozenset(COMPANIONS)


def build_condition(name: str, value: Any, table: dict[str, Any],
                    plugins: dict[str, Any] | None = None) -> Condition | None:
    """The predicate ``name`` of a conditions/exceptions table; None for a companion key.

    Raises ValueError (the message says what is wrong) or KeyError (unknown name).
    """
    if name in COMPANIONS:
        companion = COMPANIONS[name]
        if not isinstance(value, str) or not value.strip():
            raise ValueError("must be a header name")
        if companion not in table:
            raise ValueError(f"needs {companion} beside it")
        rx = _TABLE[companion][0](table[companion])
        header = value.strip()
        return Condition(name, f"{header}: {rx.pattern}", lambda ctx, loc: _header_any(ctx, header, rx))
    if name in ("HeaderContainsWords", "HeaderMatchesPatterns"):
        partner = next(k for k, v in COMPANIONS.items() if v == name)
        if partner not in table:
            raise ValueError(f"needs {partner} beside it")
        return None
    if name in _TABLE:
        convert, make, scoped = _TABLE[name]
        converted = convert(value)
        return Condition(name, value, make(converted), scoped)
    if plugins and name in plugins:
        return plugin_condition(name, plugins[name], value)
    raise KeyError(name)


def attachment_part_filter(table: dict[str, Any]) -> Callable[[Any], bool] | None:
    """Which attachments a rule's attachment predicates point at (for RemoveAttachments), or None for all.

    A part qualifies when it satisfies any of the name, extension, true type or
    size predicates of the conditions table; bad values give None (they are
    reported by :func:`build_condition`).
    """
    tests: list[Callable[[Any], bool]] = []
    try:
        if "AttachmentNameMatchesPatterns" in table:
            rx = _patterns(table["AttachmentNameMatchesPatterns"])
            tests.append(lambda p: bool(rx.search(p.filename or "")))
        if "AttachmentExtensionMatchesWords" in table:
            xs = frozenset(s.lower().lstrip(".") for s in _strings(table["AttachmentExtensionMatchesWords"]))
            tests.append(lambda p: p.extension in xs)
        if "AttachmentTrueTypeMatches" in table:
            ts = tuple(t.lower() for t in _strings(table["AttachmentTrueTypeMatches"]))
            tests.append(lambda p: any(p.true_type == w or (w.endswith("/*") and p.true_type.startswith(w[:-1]))
                                       for w in ts))
        if "AttachmentSizeOver" in table:
            n = parse_size(table["AttachmentSizeOver"])
            tests.append(lambda p: p.size > n)
        if table.get("AttachmentHasExecutableContent") is True:
            tests.append(is_executable)
    except (ValueError, TypeError):
        return None
    if not tests:
        return None
    return lambda part: any(t(part) for t in tests)


def plugin_condition(name: str, ext: Any, value: Any) -> Condition:
    """The condition a third-party extension (exmta.rules.plugins) builds for ``value``, checked."""
    built = ext.build(value)
    try:
        verifyObject(IRuleCondition, built)
    except Invalid as e:
        raise ValueError(f"extension built something that is not an IRuleCondition: {e}") from None
    return Condition(name, value, lambda ctx, loc: built.match(ctx), bool(built.recipient_scoped))
