"""Read PowerShell CLIXML (``Export-Clixml``) into the same plain values ``ConvertTo-Json`` gives.

``Get-ReceiveConnector | Export-Clixml receive.xml`` writes the objects in
PowerShell's serialization format ([MS-PSRP] 2.2.5): an ``<Objs>`` root with
one ``<Obj>`` per object, its properties under ``<Props>`` (or ``<MS>``),
each named by ``N``. Primitive elements (``S``, ``B``, ``I32``, ``Nil``...)
become Python values; an object with a ``<ToString>`` becomes that string,
as the Management Shell's JSON shows Exchange's own types
(``"36 MB (37,748,736 bytes)"``, ``"Tls, BasicAuth"``); lists (``LST``,
``IE``...) become lists; ``Ref`` elements repeat an earlier object. A file
with a DOCTYPE is refused (no entity expansion).
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

__all__ = ["load_clixml"]

_NS = "{http://schemas.microsoft.com/powershell/2004/04}"
_INTS = {"I32", "I64", "I16", "U16", "U32", "U64", "By", "SB"}
_FLOATS = {"Db", "Sg", "D"}
_LISTS = {"LST", "IE", "STK", "QUE"}
_DURATION = re.compile(r"^-?P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:([\d.]+)S)?)?$")


def _tag(el: ET.Element) -> str:
    return el.tag[len(_NS):] if el.tag.startswith(_NS) else el.tag


def _child(el: ET.Element, name: str) -> ET.Element | None:
    for c in el:
        if _tag(c) == name:
            return c
    return None


def _duration(text: str) -> str:
    """xs:duration ``PT10M`` -> the ``00:10:00`` a TimeSpan prints."""
    m = _DURATION.match(text.strip())
    if not m:
        return text
    days, hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
    total = int(days * 86400 + hours * 3600 + minutes * 60 + seconds)
    d, rest = divmod(total, 86400)
    h, rest = divmod(rest, 3600)
    mi, s = divmod(rest, 60)
    return (f"{d}." if d else "") + f"{h:02d}:{mi:02d}:{s:02d}"


class _Reader:
    def __init__(self) -> None:
        self.refs: dict[str, Any] = {}

    def value(self, el: ET.Element) -> Any:
        tag = _tag(el)
        text = el.text or ""
        if tag in ("S", "C", "URI", "Version", "G", "DT", "XD", "SBK", "SS"):
            return text
        if tag == "B":
            return text.strip().lower() == "true"
        if tag in _INTS:
            return int(text)
        if tag in _FLOATS:
            return float(text)
        if tag == "Nil":
            return None
        if tag == "TS":
            return _duration(text)
        if tag == "BA":
            return text  # base64 bytes: kept as text
        if tag == "Ref":
            return self.refs.get(el.get("RefId", ""))
        if tag == "Obj":
            value = self.obj(el)
            if el.get("RefId") is not None:
                self.refs[el.get("RefId", "")] = value
            return value
        return text

    def obj(self, el: ET.Element, top: bool = False) -> Any:
        """A top-level object -> its properties; a nested one -> list, dict, or its ToString."""
        if not top:
            for name in _LISTS:
                lst = _child(el, name)
                if lst is not None:
                    return [self.value(c) for c in lst]
            dct = _child(el, "DCT")
            if dct is not None:
                return {str(self.value(en[0])): self.value(en[1]) for en in dct if len(en) >= 2}
            to_string = _child(el, "ToString")
            if to_string is not None:
                return to_string.text or ""
        out: dict[str, Any] = {}
        for group in (c for c in el if _tag(c) in ("Props", "MS")):
            for p in group:
                name = p.get("N")
                if name is not None:
                    out[name] = self.value(p)
        return out


def load_clixml(data: bytes | str) -> list[dict[str, Any]]:
    """The objects of an ``Export-Clixml`` file, as ``load_objects`` returns the JSON ones."""
    text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    if "<!DOCTYPE" in text.upper():
        raise ValueError("CLIXML with a DOCTYPE is refused")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ValueError(f"not CLIXML: {e}") from None
    if _tag(root) != "Objs":
        raise ValueError("not CLIXML: the root element is not <Objs> (write it with Export-Clixml)")
    reader = _Reader()
    out = []
    for el in root:
        if _tag(el) != "Obj":
            continue
        value = reader.obj(el, top=True)
        if el.get("RefId") is not None:
            reader.refs[el.get("RefId", "")] = value
        out.append(value)
    if not out:
        raise ValueError("no objects in the CLIXML file")
    return out
