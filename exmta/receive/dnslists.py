"""DNS block and allow lists: return-code patterns, query names and the verdict of one client.

The pure parts of connection filtering (:mod:`exmta.receive.screen` runs
them on connections): which answers of a list count (Postfix's
``zone=127.0.0.[2..11]`` filters, CIDRs, Exchange's bit masks), the name
to query for a client (IPv4 octets or IPv6 nibbles, reversed, under the
zone), and how the answers of several lists decide (postscreen's weights
and threshold, Exchange's allow and block providers). No I/O here.
"""
from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

__all__ = ["DEFAULT_CODES", "ListAnswer", "Verdict", "code_matcher", "decide", "query_name", "sanitize_txt"]

#: what a list without ``codes`` counts: any 127/8 answer except 127.255.255.0/24, which
#: Spamhaus and others return for errors ("query refused", "over quota")
DEFAULT_CODES = ("127.0.0.0/8", "!127.255.255.0/24")

_OCTETS = re.compile(r"\[[^\]]*\]|[^.\[\]]+")
_OCTET_LIST = re.compile(r"^\[([0-9.;]+)\]$")
MAX_TXT = 200  # characters of a list's TXT record kept for a reply


def _octet_set(part: str) -> frozenset[int]:
    """``"7"``, ``"[2..11]"``, ``"[1;3;5..9]"`` -> the octet values it allows."""
    if part.isdigit():
        values = {int(part)}
    else:
        m = _OCTET_LIST.match(part)
        if not m:
            raise ValueError(f"octet {part!r} is not a number or a [a..b;c] list")
        values = set()
        for item in m.group(1).split(";"):
            low, sep, high = item.partition("..")
            if not low.isdigit() or (sep and not high.isdigit()):
                raise ValueError(f"octet list item {item!r} is not a number or a range a..b")
            a, b = int(low), int(high) if sep else int(low)
            if a > b:
                raise ValueError(f"octet range {item!r} runs backwards")
            values.update(range(a, b + 1))
    if any(v > 255 for v in values):
        raise ValueError(f"octet {part!r} is above 255")
    return frozenset(values)


def _one_pattern(text: str) -> Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool]:
    text = text.strip()
    if "/" in text:
        net = ipaddress.ip_network(text, strict=False)
        return lambda ip: ip.version == net.version and ip in net
    parts = _OCTETS.findall(text)
    if "[" in text:
        if len(parts) != 4 or ".".join(parts) != text:
            raise ValueError("an octet pattern has four parts such as 127.0.0.[2..11]")
        sets = [_octet_set(p) for p in parts]
        return lambda ip: ip.version == 4 and all(o in s for o, s in zip(ip.packed, sets))
    exact = ipaddress.ip_address(text)
    return lambda ip: ip == exact


def code_matcher(codes: Sequence[str], bitmask: int = 0) -> Callable[[str], bool]:
    """A test for one A record of a list: does it count as a listing?

    ``codes`` are addresses (``127.0.0.2``), CIDRs (``127.0.0.0/24``) or
    Postfix octet patterns (``127.0.0.[2..11]``, ``127.0.[0..255].[1;3]``);
    a pattern starting with ``!`` excludes. An answer counts when it matches
    one inclusion and no exclusion. ``bitmask`` (Exchange's bitmask match)
    also requires ``last octet & bitmask``. Raises ValueError on a bad pattern.
    """
    codes = tuple(codes) or DEFAULT_CODES
    include, exclude = [], []
    for code in codes:
        try:
            if code.startswith("!"):
                exclude.append(_one_pattern(code[1:]))
            else:
                include.append(_one_pattern(code))
        except ValueError as e:
            raise ValueError(f"return code {code!r}: {e}") from None
    if not include:
        include.append(_one_pattern("127.0.0.0/8"))

    def matches(answer: str) -> bool:
        try:
            ip = ipaddress.ip_address(answer)
        except ValueError:
            return False
        if bitmask and not (ip.version == 4 and ip.packed[3] & bitmask):
            return False
        return any(t(ip) for t in include) and not any(t(ip) for t in exclude)

    return matches


@functools.lru_cache(maxsize=8192)  # the same few clients connect again and again
def query_name(client_ip: str, zone: str) -> str | None:
    """``1.2.3.4`` -> ``4.3.2.1.zone``; IPv6 as 32 reversed nibbles; None when not an address.

    An IPv4-mapped IPv6 address is looked up as its IPv4 address.
    """
    try:
        ip = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        labels = str(ip).split(".")[::-1]
    else:
        labels = list(ip.exploded.replace(":", ""))[::-1]
    return ".".join(labels) + "." + zone.strip(".")


def sanitize_txt(text: str, limit: int = MAX_TXT) -> str:
    """A list's TXT record made safe for one reply line: printable ASCII, one space, at most ``limit``."""
    cleaned = "".join(c if 32 <= ord(c) < 127 else " " for c in text)
    cleaned = " ".join(cleaned.split())
    return cleaned[:limit]


@dataclass(frozen=True)
class ListAnswer:
    """What one list said about the client: listed or not, or an error (which never counts)."""

    name: str                        # the list's name in replies and logs (its display name)
    action: str                      # "score" | "reject" | "allow"
    weight: int = 1
    listed: bool = False
    codes: tuple[str, ...] = ()      # the A records that counted
    txt: str = ""                    # sanitised TXT record (when asked for and listed)
    error: str | None = None         # "timeout" | "error": the lookup failed; not listed
    cached: bool = False


@dataclass(frozen=True)
class Verdict:
    """The decision on one client: ``reject`` or not, and which lists decided."""

    reject: bool
    decided_by: tuple[str, ...] = ()  # list names that made the decision (reject) or allowed it
    score: int = 0
    reason: str = "not listed"
    txt: str = ""
    answers: tuple[ListAnswer, ...] = field(default=(), compare=False)


def decide(answers: Sequence[ListAnswer], threshold: int) -> Verdict:
    """Allow lists first (Exchange), then direct rejects, then the weighted score (postscreen).

    A listing on an ``allow`` list lets the client through whatever the block
    lists say. A listing on a ``reject`` list refuses it. Otherwise the
    weights of the ``score`` lists that list it are added (negative weights
    are allow lists in postscreen's sense) and a total at or above
    ``threshold`` refuses it. Failed lookups count as not listed.
    """
    answers = tuple(answers)
    listed = [a for a in answers if a.listed]
    allowed = [a.name for a in listed if a.action == "allow"]
    if allowed:
        return Verdict(False, tuple(allowed), reason=f"allowed by {', '.join(allowed)}", answers=answers)
    direct = [a for a in listed if a.action == "reject"]
    score = sum(a.weight for a in listed if a.action == "score")
    if direct:
        return Verdict(True, tuple(a.name for a in direct), score, f"listed in {', '.join(a.name for a in direct)}",
                       next((a.txt for a in direct if a.txt), ""), answers)
    if listed and score >= threshold:
        blocking = [a for a in listed if a.action == "score" and a.weight > 0]
        names = tuple(a.name for a in blocking)
        return Verdict(True, names, score, f"listed in {', '.join(names)} (score {score}, threshold {threshold})",
                       next((a.txt for a in blocking if a.txt), ""), answers)
    if listed:
        return Verdict(False, (), score, f"score {score} below threshold {threshold}", answers=answers)
    return Verdict(False, (), 0, answers=answers)
