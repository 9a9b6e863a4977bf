"""The third-party filter example in docs/filters.rst works as written."""
from __future__ import annotations

import re
import textwrap
import types
from pathlib import Path

from exmta.model import Action
from exmta.testing import FilterHarness, MessageView

DOC = Path(__file__).resolve().parents[2] / "docs" / "filters.rst"


def literal_block(after: str) -> str:
    """The indented literal block that follows the paragraph ending with ``after``."""
    text = DOC.read_text()
    start = text.index(after) + len(after)
    m = re.match(r"\n\n((?:    .*\n|\n)+)", text[start:])
    assert m, f"no literal block after {after!r}"
    return textwrap.dedent(m.group(1))


def load_example() -> types.ModuleType:
    module = types.ModuleType("exmta_extag")
    exec(compile(literal_block("``exmta_extag/__init__.py``::"), str(DOC), "exec"), module.__dict__)
    return module


def test_documented_filter_tags_and_refuses() -> None:
    tagger = load_example().ExternalTagger
    h = FilterHarness(tagger, {"tag": "[EXT]", "require_subject": True})
    msg = MessageView(b"Subject: hello\r\n\r\nbody\r\nline 2\r\n")
    verdict = h.run("data", h.session(), h.transaction("a@x.test", "b@y.test"), msg)
    assert verdict.action is Action.CONTINUE
    assert msg.edits.ops == [("replace", "Subject", "[EXT] hello"), ("add", "X-Extag-Lines", "4")]
    verdict = h.run("data", h.session(), h.transaction("a@x.test", "b@y.test"), MessageView(b"X: y\r\n\r\nb\r\n"))
    assert verdict.action is Action.REJECT and verdict.reply.status == "5.6.0"
    authenticated = h.session(auth_identity="alice")
    msg = MessageView(b"Subject: hello\r\n\r\nbody\r\n")
    assert h.run("data", authenticated, h.transaction("a@x.test"), msg).action is Action.CONTINUE
    assert not msg.edits


def test_documented_test_passes(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "exmta_extag", load_example())  # the snippet imports it as written
    namespace: dict = {}
    exec(compile(literal_block("same ``451 4.3.0``::"), str(DOC), "exec"), namespace)
    namespace["test_tagged"]()


def test_documented_config_errors_name_the_key() -> None:
    import pytest

    tagger = load_example().ExternalTagger
    with pytest.raises(ValueError, match="unknown key"):
        FilterHarness(tagger, {"colour": "red"})
