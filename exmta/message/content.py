"""What a part's bytes are: true type (puremagic), text, archive contents.

The true type comes from puremagic's signature database (no hand-written
magic table here). Archives (ZIP, the container of Office files too) are
read from their central directory: the declared sizes give the expansion
ratio before anything is decompressed, and only the first octets of each
member are inflated to sniff its type.
"""
from __future__ import annotations

import html.parser
import io
import zipfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import puremagic

from exmta.message.limits import InspectionBudget, LimitExceeded, Limits

if TYPE_CHECKING:
    from exmta.message.parse import Part

__all__ = ["ArchiveInfo", "EXECUTABLE_TYPES", "html_to_text", "inspect_archive", "is_executable", "sniff_type"]

#: true types that run code when opened
EXECUTABLE_TYPES = frozenset({
    "application/x-dosexec", "application/x-msdownload", "application/x-ms-dos-executable",
    "application/vnd.microsoft.portable-executable", "application/x-executable", "application/x-elf",
    "application/x-sharedlib", "application/x-mach-binary", "application/x-msi", "application/x-ms-installer",
})
#: extensions Exchange's executable check treats alike when the bytes are script text
EXECUTABLE_EXTENSIONS = frozenset({"exe", "com", "scr", "pif", "bat", "cmd", "vbs", "vbe", "js", "jse", "wsf",
                                   "wsh", "ps1", "msi", "dll", "cpl", "hta", "jar", "lnk"})
_SNIFF = 8192
ZIP_TYPES = frozenset({"application/zip", "application/x-zip-compressed", "application/x-zip"})


def sniff_type(data: bytes, filename: str | None = None) -> str:
    """The MIME type puremagic reads from the first octets; ``application/octet-stream`` when unknown."""
    head = data[:_SNIFF]
    if not head:
        return "application/x-empty"
    try:
        matches = puremagic.magic_string(head)
    except (puremagic.PureError, ValueError):
        matches = []
    for m in matches:
        mime = getattr(m, "mime_type", "") or ""
        if mime:
            return _normalise(mime.lower(), getattr(m, "extension", ""))
    if _looks_text(head):
        return "text/plain"
    return "application/octet-stream"


def _normalise(mime: str, ext: str) -> str:
    if mime in ("application/x-msdownload", "application/vnd.microsoft.portable-executable") or ext == ".exe":
        return "application/x-dosexec"
    return mime


def _looks_text(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
        return True
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 4  # a character cut at the sniff boundary


def is_executable(part: Part) -> bool:
    """Whether a part (or a member of it, for archives) has executable content."""
    if part.true_type in EXECUTABLE_TYPES:
        return True
    info = part.archive
    return bool(info and any(t in EXECUTABLE_TYPES or n.rpartition(".")[2].lower() in EXECUTABLE_EXTENSIONS
                             for n, t in info.members))


class _TextOnly(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in ("br", "p", "div", "tr", "li"):
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.out.append(data)


def html_to_text(markup: str) -> str:
    """The text a reader sees in an HTML body (stdlib html.parser; scripts and styles dropped)."""
    parser = _TextOnly()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:
        pass
    return "".join(parser.out)


@dataclass
class ArchiveInfo:
    """What an archive attachment holds, from its directory."""

    members: list[tuple[str, str]] = field(default_factory=list)  #: (name, true type of its first octets)
    declared_size: int = 0
    encrypted: bool = False
    problem: str | None = None  #: set when it could not be inspected (too big a ratio, unreadable)


def inspect_archive(part: Part, limits: Limits, budget: InspectionBudget) -> ArchiveInfo | None:
    """Look into a ZIP attachment (Office files included) within the limits; None for other types."""
    if part.true_type not in ZIP_TYPES and not part.true_type.startswith("application/vnd.openxmlformats") \
            and part.extension != "zip":
        return None
    data = part.payload()
    info = ArchiveInfo()
    part.archive = info
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            entries = zf.infolist()
            if len(entries) > limits.max_archive_members:
                info.problem = f"max_archive_members {limits.max_archive_members}"
                return info
            info.declared_size = sum(e.file_size for e in entries)
            ratio = info.declared_size / max(len(data), 1)
            if ratio > limits.max_archive_ratio and info.declared_size > 1024 * 1024:
                info.problem = f"max_archive_ratio {limits.max_archive_ratio:g} (declared {ratio:.0f}:1)"
                return info
            if info.declared_size > limits.max_archive_size:
                info.problem = f"max_archive_size {limits.max_archive_size}"
                return info
            for entry in entries:
                budget.check_time()
                if entry.flag_bits & 0x1:
                    info.encrypted = True
                    info.members.append((entry.filename, "application/octet-stream"))
                    continue
                if entry.is_dir():
                    continue
                with zf.open(entry) as member:
                    head = member.read(_SNIFF)  # inflates no more than this
                info.members.append((entry.filename, sniff_type(head, entry.filename)))
    except LimitExceeded:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError, ValueError) as e:
        info.problem = f"unreadable archive: {e}"
    except RuntimeError as e:  # an encrypted member without a password
        info.encrypted = True
        info.problem = f"unreadable archive: {e}"
    return info


_OOXML_TEXT = {"word/document.xml", "xl/sharedStrings.xml"}


def extract_text(part: Part, limit: int = 1024 * 1024) -> str:
    """Text of an Office (OOXML) or PDF attachment where a library reads it; "" otherwise.

    OOXML is a ZIP of XML (read with zipfile and ElementTree, bounded by
    ``limit`` octets per member); PDF needs the optional ``pypdf`` package.
    """
    data = part.payload()
    if part.true_type in ZIP_TYPES or part.true_type.startswith("application/vnd.openxmlformats"):
        import xml.etree.ElementTree as ET
        texts: list[str] = []
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                names = [n for n in zf.namelist() if n in _OOXML_TEXT or
                         (n.startswith("ppt/slides/slide") and n.endswith(".xml"))]
                for name in names:
                    with zf.open(name) as member:
                        xml = member.read(limit)
                    try:
                        root = ET.fromstring(xml)
                    except ET.ParseError:
                        continue
                    texts.extend(t for t in root.itertext() if t.strip())
        except (zipfile.BadZipFile, OSError, RuntimeError, ValueError, NotImplementedError):
            return ""
        return " ".join(texts)
    if part.true_type == "application/pdf":
        try:
            import pypdf  # optional
        except ImportError:
            return ""
        try:
            reader = pypdf.PdfReader(io.BytesIO(data))
            out = []
            for page in reader.pages[:50]:
                out.append(page.extract_text() or "")
                if sum(map(len, out)) > limit:
                    break
            return "\n".join(out)[:limit]
        except Exception:
            return ""
    return ""
