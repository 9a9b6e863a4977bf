"""MessageView's cheap paths (benchmarks/PERFORMANCE.rst) give what the email package gives."""
from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st

from exmta.filters.base import MessageView

_NAMES = st.sampled_from([b"Received", b"received", b"Message-ID", b"message-id", b"From", b"X-A",
                          b"Received ", b"", b"From x", b"Message-ID\t"])
_VALUES = st.binary(max_size=12).map(lambda b: b.replace(b"\r\n", b"")) | st.sampled_from(
    [b" <a@b>", b"", b"  ", b"\tx", b" a\r\n b", b"\xff\xfe", b" v\r", b" v\nw"])


@st.composite
def header_blocks(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(_NAMES)
        line = name + b":" + draw(_VALUES) if draw(st.booleans()) or not name else name + draw(_VALUES)
        lines.append(line + b"\r\n")
        for _ in range(draw(st.integers(0, 2))):
            lines.append(draw(st.sampled_from([b" ", b"\t"])) + draw(_VALUES) + b"\r\n")
    return b"".join(lines) + draw(st.sampled_from([b"\r\n", b"", b"body\r\n"])) + b"text\r\n"


@settings(max_examples=400, deadline=None)
@given(header_blocks(), st.sampled_from(["Received", "Message-ID", "From", "x-a"]))
def test_field_values_match_the_email_package(message: bytes, name: str) -> None:
    view = MessageView(message)
    expected = [v for k, v in view.headers.raw_items() if k.lower() == name.lower()]
    assert MessageView(message).field_values(name) == expected


@settings(max_examples=200, deadline=None)
@given(header_blocks(), st.integers(0, 200))
def test_a_held_prefix_gives_the_same_header_block(message: bytes, cut: int) -> None:
    opened = []

    def source() -> io.BytesIO:
        opened.append(1)
        return io.BytesIO(message)

    full = MessageView(message)
    view = MessageView(source, size=len(message), head=message[:cut])
    assert (view.header_length, view.raw_headers) == (full.header_length, full.raw_headers)
    if cut >= len(message):
        assert not opened  # the whole message was in memory: the file is never opened


def test_headers_are_parsed_only_when_asked() -> None:
    view = MessageView(b"Received: a\r\nReceived: b\r\nMessage-ID: <x@y>\r\n\r\nbody\r\n")
    assert view.field_values("received") == ["a", "b"]
    assert view.field_values("Message-ID") == ["<x@y>"]
    assert view._headers is None
    assert view.headers["Message-ID"] == "<x@y>"


class _Writer:
    def __init__(self) -> None:
        self.calls: list[tuple[int, bytes]] = []

    def replace_headers(self, old_length: int, new: bytes) -> None:
        self.calls.append((old_length, new))


def test_edits_that_change_nothing_do_not_rewrite_the_file() -> None:
    view = MessageView(b"From: a@b\r\nX-Other: 1\r\n\r\nbody\r\n")
    view.edits.remove_headers_with_prefix("X-MS-Exchange-Organization-")
    writer = _Writer()
    assert view.apply_edits(writer) == 0
    assert writer.calls == []
    view.edits.remove_headers_with_prefix("X-Other")
    assert view.apply_edits(writer) == -len(b"X-Other: 1\r\n")
    assert writer.calls == [(len(b"From: a@b\r\nX-Other: 1\r\n"), b"From: a@b\r\n")]
