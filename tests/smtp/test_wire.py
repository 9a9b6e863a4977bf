"""exmta.smtp.wire: command framing, DATA, BDAT, bare CR/LF policy, limits, dot-stuffing."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exmta.smtp.wire import (
    INVALID_BARE_NEWLINE, INVALID_ENCODING, INVALID_NUL, INVALID_TOO_LONG, ChunkEnd, Command,
    DataChunk, DataEnd, DotStuffer, InvalidLine, Mode, ServerParser, dot_stuff,
)


def drain(parser: ServerParser) -> list:
    """Every event the parser can produce now, switching modes like a server that accepts everything."""
    events = []
    for _ in range(100_000):
        ev = parser.next_event()
        if ev is None:
            return events
        events.append(ev)
        if isinstance(ev, Command):
            if ev.verb == "DATA":
                parser.begin_message()
                parser.start_data()
            elif ev.verb == "BDAT":
                parser.start_bdat(int(ev.argument.split()[0]))
    raise AssertionError("parser did not stop")


def coalesce(events: list) -> list:
    """Merge adjacent DataChunks: chunk boundaries are not part of the contract."""
    out: list = []
    for ev in events:
        if isinstance(ev, DataChunk) and out and isinstance(out[-1], DataChunk):
            out[-1] = DataChunk(out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


def parse(data: bytes, chunks: list[int] | None = None, **kw) -> list:
    parser = ServerParser(**kw)
    events: list = []
    if chunks is None:
        parser.feed(data)
        events += drain(parser)
    else:
        pos = 0
        for size in chunks:
            parser.feed(data[pos:pos + size])
            pos += size
            events += drain(parser)
        parser.feed(data[pos:])
        events += drain(parser)
    return coalesce(events)


def content(events: list) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataChunk))


# ------------------------------------------------------------ commands


def test_commands_are_framed_on_crlf_and_verbs_upper_cased():
    events = parse(b"ehlo client.test\r\nMAIL FROM:<a@b.test> SIZE=10\r\nNOOP\r\n")
    assert events == [
        Command("EHLO", "client.test", b"ehlo client.test"),
        Command("MAIL", "FROM:<a@b.test> SIZE=10", b"MAIL FROM:<a@b.test> SIZE=10"),
        Command("NOOP", "", b"NOOP"),
    ]


def test_incomplete_command_waits_for_crlf():
    parser = ServerParser()
    parser.feed(b"NOOP\r")
    assert parser.next_event() is None
    parser.feed(b"\n")
    assert parser.next_event() == Command("NOOP", "", b"NOOP")


def test_command_of_exactly_512_octets_is_accepted():
    line = b"NOOP " + b"x" * (512 - 2 - 5)
    assert parse(line + b"\r\n") == [Command("NOOP", "x" * 505, line)]


def test_command_of_513_octets_is_too_long_and_parser_resyncs():
    line = b"NOOP " + b"x" * (513 - 2 - 5)
    events = parse(line + b"\r\nQUIT\r\n")
    assert [type(e) for e in events] == [InvalidLine, Command]
    assert events[0].reason == INVALID_TOO_LONG
    assert events[1].verb == "QUIT"


def test_overlong_line_without_crlf_is_reported_once_and_skipped():
    parser = ServerParser()
    parser.feed(b"A" * 600)
    assert parser.next_event() == InvalidLine(INVALID_TOO_LONG, b"A" * 64)
    parser.feed(b"B" * 10_000)
    assert parser.next_event() is None
    assert parser.buffered() == 0  # skipped bytes are not kept
    parser.feed(b"\r")
    assert parser.next_event() is None
    parser.feed(b"\nQUIT\r\n")
    assert parser.next_event() == Command("QUIT", "", b"QUIT")


def test_mail_and_rcpt_get_the_parameter_allowance():
    rcpt = b"RCPT TO:<b@x.test> ORCPT=rfc822;" + b"o" * 700
    noop = b"NOOP " + b"n" * 700
    events = parse(rcpt + b"\r\n" + noop + b"\r\nQUIT\r\n", parameter_allowance=1024)
    assert [type(e) for e in events] == [Command, InvalidLine, Command]
    assert events[0].verb == "RCPT" and events[1].reason == INVALID_TOO_LONG
    too_long = b"MAIL FROM:<a@b.test> " + b"X" * 1600
    events = parse(too_long + b"\r\nQUIT\r\n", chunks=[100] * 5, parameter_allowance=1024)
    assert [type(e) for e in events] == [InvalidLine, Command]


@pytest.mark.parametrize("line, reason", [
    (b"NOOP\nMAIL FROM:<x@y>", INVALID_BARE_NEWLINE),
    (b"NOOP\rRSET", INVALID_BARE_NEWLINE),
    (b"NO\x00OP", INVALID_NUL),
    (b"NOOP \xff\xfe", INVALID_ENCODING),
])
def test_invalid_command_lines(line, reason):
    assert parse(line + b"\r\n") == [InvalidLine(reason, line)]


def test_utf8_command_arguments_are_decoded():
    raw = "MAIL FROM:<jöhn@exämple.test> SMTPUTF8".encode()
    assert parse(raw + b"\r\n") == [Command("MAIL", "FROM:<jöhn@exämple.test> SMTPUTF8", raw)]


def test_parser_does_not_look_past_the_event_it_returns():
    parser = ServerParser()
    parser.feed(b"DATA\r\n.hello\r\n")
    assert parser.next_event() == Command("DATA", "", b"DATA")
    assert parser.buffered() == len(b".hello\r\n")
    parser.start_data()
    assert parser.next_event() == DataChunk(b"hello\r\n")


# ------------------------------------------------------------ DATA


def test_data_is_unstuffed_and_ends_at_crlf_dot_crlf():
    events = parse(b"DATA\r\nSubject: x\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n")
    assert events == [
        Command("DATA", "", b"DATA"),
        DataChunk(b"Subject: x\r\n\r\n.leading dot\r\n"),
        DataEnd(size=28),
        Command("QUIT", "", b"QUIT"),
    ]


def test_empty_message():
    assert parse(b"DATA\r\n.\r\n") == [Command("DATA", "", b"DATA"), DataEnd(size=0)]


def test_dot_line_needs_three_bytes_to_decide():
    parser = ServerParser()
    parser.start_data()
    parser.feed(b"a\r\n.")
    assert parser.next_event() == DataChunk(b"a\r\n")
    assert parser.next_event() is None
    parser.feed(b"\r")
    assert parser.next_event() is None
    parser.feed(b"\n")
    assert parser.next_event() == DataEnd(size=3)
    assert parser.mode is Mode.COMMAND


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r\n.\n", b"\r.\r\n", b"\n..\n"]


@pytest.mark.parametrize("vector", SMUGGLING)
@pytest.mark.parametrize("policy", ["reject", "normalize"])
def test_smuggling_vectors_never_end_data(vector, policy):
    body = b"Subject: x\r\n\r\nhello" + vector + b"MAIL FROM:<smuggled@evil.test>\r\nRCPT TO:<v@x.test>\r\n"
    events = parse(b"DATA\r\n" + body + b".\r\n", bare_newline=policy)
    ends = [e for e in events if isinstance(e, DataEnd)]
    assert len(ends) == 1
    assert events[-1] is ends[0]  # nothing after the real end: no smuggled command
    assert not any(isinstance(e, Command) and e.verb == "MAIL" for e in events)
    assert ends[0].bare_newline is (policy == "reject")


def test_normalize_converts_bare_lf_and_cr_to_crlf():
    events = parse(b"DATA\r\na\nb\rc\r\n.\r\n", bare_newline="normalize")
    assert content(events) == b"a\r\nb\r\nc\r\n"
    assert events[-1] == DataEnd(size=9)


def test_reject_records_bare_lf_and_keeps_framing():
    events = parse(b"DATA\r\na\nb\r\n.\r\nNOOP\r\n", bare_newline="reject")
    assert events[-2] == DataEnd(size=5, bare_newline=True)
    assert events[-1] == Command("NOOP", "", b"NOOP")


def test_cr_at_chunk_end_then_lf_is_a_real_line_end():
    events = parse(b"DATA\r\nabc\r\n.\r\n", chunks=[9, 1], bare_newline="reject")
    assert events[-1] == DataEnd(size=5)


def test_text_line_limit():
    ok = b"x" * 998 + b"\r\n"
    assert parse(b"DATA\r\n" + ok + b".\r\n")[-1] == DataEnd(size=1000)
    long = b"x" * 999 + b"\r\n"
    assert parse(b"DATA\r\n" + long + b".\r\n")[-1] == DataEnd(size=1001, line_too_long=True)
    assert parse(b"DATA\r\n" + long + b".\r\n", max_text_line=0)[-1] == DataEnd(size=1001)


def test_oversize_data_is_consumed_but_not_delivered():
    parser = ServerParser(max_message_size=10)
    parser.feed(b"DATA\r\n" + b"0123456789\r\n" * 1000 + b".\r\nNOOP\r\n")
    events = drain(parser)
    assert not any(isinstance(e, DataChunk) for e in events)
    assert events[-2] == DataEnd(size=12_000, oversize=True)
    assert events[-1] == Command("NOOP", "", b"NOOP")


def test_data_chunks_are_bounded():
    parser = ServerParser(max_text_line=0)
    parser.start_data()
    parser.feed(b"x" * 200_000)
    chunks = drain(parser)
    assert len(chunks) >= 3
    assert all(isinstance(c, DataChunk) and len(c.data) <= 64 * 1024 for c in chunks)


# ------------------------------------------------------------ BDAT


def test_bdat_takes_exact_octets_without_unstuffing():
    events = parse(b"BDAT 8\r\n.\r\n\n.\rxy" + b"BDAT 0 LAST\r\n")
    assert events == [
        Command("BDAT", "8", b"BDAT 8"),
        DataChunk(b".\r\n\n.\rxy"),
        ChunkEnd(size=8),
        Command("BDAT", "0 LAST", b"BDAT 0 LAST"),
        ChunkEnd(size=8),
    ]


def test_bdat_size_accumulates_until_begin_message_and_oversize_is_swallowed():
    parser = ServerParser(max_message_size=5)
    parser.begin_message()
    parser.start_bdat(3)
    parser.feed(b"abcdefgNOOP\r\n")
    assert parser.next_event() == DataChunk(b"abc")
    assert parser.next_event() == ChunkEnd(3)
    parser.start_bdat(4)
    assert parser.next_event() == ChunkEnd(size=7, oversize=True)
    assert parser.next_event() == Command("NOOP", "", b"NOOP")
    parser.begin_message()
    assert parser.message_size == 0


def test_discard_buffer_drops_pipelined_plaintext():
    parser = ServerParser()
    parser.feed(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
    assert parser.next_event() == Command("STARTTLS", "", b"STARTTLS")
    assert parser.discard_buffer() == len(b"MAIL FROM:<injected@evil.test>\r\n")
    assert parser.next_event() is None


def test_mode_switches_are_checked():
    parser = ServerParser()
    parser.start_data()
    with pytest.raises(RuntimeError):
        parser.start_bdat(1)
    with pytest.raises(ValueError):
        ServerParser(bare_newline="ignore")


# ------------------------------------------------------------ dot-stuffing


def test_dot_stuff_whole_message():
    assert dot_stuff(b".a\r\nb\r\n.\r\n") == b"..a\r\nb\r\n..\r\n.\r\n"
    assert dot_stuff(b"no newline") == b"no newline\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"
    assert dot_stuff(b"a\nb\r") == b"a\r\nb\r\n.\r\n"


def test_stuffer_across_a_cr_lf_split_and_a_dot_at_the_next_chunk():
    s = DotStuffer(normalize_newlines=False)
    out = s.feed(b"abc\r") + s.feed(b"\n") + s.feed(b".x\r\n") + s.finish()
    assert out == b"abc\r\n..x\r\n.\r\n"


def test_stuffer_refuses_feed_after_finish():
    s = DotStuffer()
    s.finish()
    with pytest.raises(RuntimeError):
        s.feed(b"x")


# ------------------------------------------------------------ properties

_byte_soup = st.lists(
    st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"MAIL FROM:<x@y>", b"\x00", b"\xc3\xa9", b" "]),
    max_size=60,
).map(b"".join)

_crlf_text = st.lists(
    st.sampled_from([b"\r\n", b".", b"..", b"a", b"b c", b"\x00", b"\xff"]), max_size=80,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(
    body=_byte_soup,
    sizes=st.lists(st.integers(min_value=1, max_value=7), max_size=40),
    policy=st.sampled_from(["reject", "normalize"]),
)
def test_rechunking_never_changes_events(body, sizes, policy):
    stream = (
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nDATA\r\n" + body + b"\r\n.\r\n"
        + b"BDAT 5\r\n" + body[:5].ljust(5, b"z") + b"BDAT 0 LAST\r\n" + b"X" * 700 + b"\r\n"
        + b"NOOP " + body[:50] + b"\r\nRCPT TO:<x@y> " + body + b"\r\nQUIT\r\n"
    )
    kw = dict(bare_newline=policy, max_text_line=20, max_command_line=40, parameter_allowance=30)
    whole = parse(stream, **kw)
    assert parse(stream, sizes, **kw) == whole
    assert parse(stream, [1] * len(stream), **kw) == whole
    assert whole[-1] == Command("QUIT", "", b"QUIT")


@settings(max_examples=300, deadline=None)
@given(body=_byte_soup, sizes=st.lists(st.integers(min_value=1, max_value=9), max_size=30))
def test_stuff_then_unstuff_is_identity(body, sizes):
    # the stuffer normalises newlines; what the parser reads back is that normal form
    normal = dot_stuff(body)[: -len(b".\r\n")]
    stuffer = DotStuffer()
    wire = bytearray()
    pos = 0
    for size in sizes:
        wire += stuffer.feed(body[pos:pos + size])
        pos += size
    wire += stuffer.feed(body[pos:]) + stuffer.finish()
    assert bytes(wire) == dot_stuff(body)
    events = parse(b"DATA\r\n" + bytes(wire) + b"NOOP\r\n", max_text_line=0)
    assert events[-1] == Command("NOOP", "", b"NOOP")
    assert isinstance(events[-2], DataEnd) and not events[-2].bare_newline
    got = content(events)
    expected = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert got == expected
    assert normal.endswith(b"\r\n") or not normal


@settings(max_examples=200, deadline=None)
@given(body=_crlf_text)
def test_crlf_content_round_trips_exactly(body):
    wire = dot_stuff(body, normalize_newlines=False)
    events = parse(b"DATA\r\n" + wire, max_text_line=0)
    expected = body if not body or body.endswith(b"\r\n") else body + b"\r\n"
    assert content(events) == expected
    assert events[-1] == DataEnd(size=len(expected))



@settings(max_examples=300, deadline=None)
@given(body=_byte_soup, sizes=st.lists(st.integers(min_value=1, max_value=5), max_size=40),
       normalize=st.booleans())
def test_stuffer_output_does_not_depend_on_chunking(body, sizes, normalize):
    stuffer = DotStuffer(normalize_newlines=normalize)
    out, pos = bytearray(), 0
    for size in sizes:
        out += stuffer.feed(body[pos:pos + size])
        pos += size
    out += stuffer.feed(body[pos:]) + stuffer.finish()
    assert bytes(out) == dot_stuff(body, normalize_newlines=normalize)
    whole = b"\r\n" + bytes(out)
    assert whole.count(b"\r\n.\r\n") == 1 and whole.endswith(b"\r\n.\r\n")

_smuggle_soup = st.lists(
    st.sampled_from([b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r\n.\n", b"\r\n", b"\n", b"\r", b".",
                     b"x", b"QUIT\r\n", b"MAIL FROM:<e@evil.test>\r\n"]),
    max_size=40,
).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(
    body=_smuggle_soup,
    sizes=st.lists(st.integers(min_value=1, max_value=5), max_size=30),
    policy=st.sampled_from(["reject", "normalize"]),
)
def test_only_crlf_dot_crlf_ends_data(body, sizes, policy):
    framed = b"\r\n" + body
    if b"\r\n.\r\n" in framed + b"\r\n":
        return  # a real end marker inside: not a smuggling case
    stream = b"DATA\r\n" + body + b"\r\n.\r\n"
    events = parse(stream, sizes, bare_newline=policy, max_text_line=0)
    assert [type(e) for e in events if not isinstance(e, DataChunk)] == [Command, DataEnd]
    assert isinstance(events[-1], DataEnd)


def test_only_crlf_newlines_agrees_with_counting_on_every_short_string():
    import itertools

    from exmta.smtp.wire import only_crlf_newlines

    for n in range(8):
        for octets in itertools.product(b"a\r\n", repeat=n):
            data = bytes(octets)
            expected = data.count(b"\r\n") == data.count(b"\r") == data.count(b"\n")
            assert only_crlf_newlines(data) == expected, data
