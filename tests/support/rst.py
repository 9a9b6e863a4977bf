"""reST literal blocks of the README and docs, for the tests that run the examples as written."""
from __future__ import annotations

import textwrap
from pathlib import Path


def numbered_literal_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, dedented text) of every ``::`` literal block (not ``.. directive::``)."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].rstrip().endswith("::") and not lines[i].lstrip().startswith(".."):
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and lines[j].startswith(" "):
                indent = len(lines[j]) - len(lines[j].lstrip())
                k = j
                while k < len(lines) and (not lines[k].strip() or len(lines[k]) - len(lines[k].lstrip()) >= indent):
                    k += 1
                out.append((j + 1, textwrap.dedent("\n".join(lines[j:k])).strip("\n")))
                i = k
                continue
        i += 1
    return out


def literal_blocks(text: str | Path) -> list[str]:
    """Every literal block of ``text`` (or of the file at that path), dedented, ending in a newline."""
    if isinstance(text, Path):
        text = text.read_text()
    return [block + "\n" for _, block in numbered_literal_blocks(text)]
