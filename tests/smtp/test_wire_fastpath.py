"""The DATA bulk path (ServerParser._plain_run) gives exactly what the per-line loop gives.

Feeding one octet at a time never leaves a whole line in the buffer, so it
runs the per-line loop only; feeding everything at once runs the bulk path
over every ordinary line. Both must produce the same content and flags.
"""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from exmta.smtp.wire import DataChunk, DataEnd, ServerParser

_PIECES = st.sampled_from([
    b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"bb", b"x" * 15, b"\r\n.", b".\r\n", b"\x00", b"\r\n\r\n",
])


def run(body: bytes, step: int, **kw) -> tuple[bytes, list[object]]:
    p = ServerParser(**kw)
    p.start_data()
    content, events = b"", []
    for k in range(0, len(body), step):
        p.feed(body[k:k + step])
        while (e := p.next_event()) is not None:
            if isinstance(e, DataChunk):
                content += e.data
            else:
                events.append(e)
    return content, events


@settings(max_examples=2000, deadline=None)
@given(st.lists(_PIECES, max_size=120).map(b"".join), st.sampled_from(["reject", "normalize"]),
       st.sampled_from([0, 6, 20, 1000]))
def test_bulk_and_per_line_parsing_agree(body: bytes, policy: str, max_line: int) -> None:
    body += b"\r\n.\r\n"
    kw = dict(bare_newline=policy, max_text_line=max_line)
    assert run(body, len(body), **kw) == run(body, 1, **kw)


def test_long_runs_of_ordinary_lines_with_the_exceptions_in_the_middle() -> None:
    line = b"y" * 74 + b"\r\n"
    body = line * 300 + b"..dot\r\n" + line * 300 + b"z" * 1200 + b"\r\n" + line * 300 + b".\r\n"
    content, events = run(body, len(body), max_text_line=1000)
    assert content == line * 300 + b".dot\r\n" + line * 300 + b"z" * 1200 + b"\r\n" + line * 300
    assert events == [DataEnd(len(content), line_too_long=True)]
    bare = line * 400 + b"bare\nlf\r\n" + line * 400 + b".\r\n"
    content, events = run(bare, len(bare))
    assert content == bare[:-3] and events == [DataEnd(len(content), bare_newline=True)]
    content, events = run(bare, len(bare), bare_newline="normalize")
    assert content == line * 400 + b"bare\r\nlf\r\n" + line * 400 and events == [DataEnd(len(content))]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=1, max_size=80), st.sampled_from([7, 20, 21, 40]))
def test_line_length_check_around_the_limit_agrees(lengths: list[int], max_line: int) -> None:
    """The block check (an LF in every max_text_line // 2 octets) against the per-line loop,
    with lines just under, at and over the limit at every alignment."""
    body = b"".join(b"q" * n + b"\r\n" for n in lengths) + b".\r\n"
    kw = dict(max_text_line=max_line)
    bulk, per_line = run(body, len(body), **kw), run(body, 1, **kw)
    assert bulk == per_line
    assert per_line[1][0].line_too_long == any(n + 2 > max_line for n in lengths)
