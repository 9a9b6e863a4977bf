"""The "Reading options with exmta's reader" example in docs/filters.rst works as written."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "filters.rst"


def _read_options():
    text = DOC.read_text()
    after = "the same error texts as the rest of the file::"
    m = re.match(r"\n\n((?:    .*\n|\n)+)", text[text.index(after) + len(after):])
    assert m, "no literal block after the reader paragraph"
    namespace: dict = {}
    exec(compile(textwrap.dedent(m.group(1)), str(DOC), "exec"), namespace)
    return namespace["read_options"]


def test_documented_reader_reads_options():
    read_options = _read_options()
    assert read_options({}) == ("[EXTERNAL]", False)
    assert read_options({"tag": "[EXT]", "require_subject": True}) == ("[EXT]", True)


def test_documented_reader_names_every_bad_and_unknown_key():
    with pytest.raises(ValueError) as e:
        _read_options()({"require_subject": 1, "colour": "red"})
    assert str(e.value).startswith("require_subject: expected true or false, not 1; colour: unknown setting")
    with pytest.raises(ValueError, match="tag: must not be empty"):
        _read_options()({"tag": " "})
