"""Property tests: DotStuffer output does not depend on chunking and round-trips."""
from __future__ import annotations

import io
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from exmta.model import DeliveryRequest, Envelope, Outcome, Recipient
from exmta.smtp import client as smtp_client, wire as smtp_wire
from exmta.smtp.client import READ_CHUNK, SMTPClientProtocol
from exmta.smtp.wire import DotStuffer

# bytes rich in the characters that matter
interesting = st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"\r\n.\r\n", b"x.y"]),
                       max_size=60).map(b"".join)
payloads = st.one_of(interesting, st.binary(max_size=300))


def test_client_streams_through_the_wire_dot_stuffer() -> None:
    """One implementation: these properties and tests/smtp/test_wire.py's test the same class."""
    assert smtp_client.DotStuffer is smtp_wire.DotStuffer


def stuff_chunks(chunks: list[bytes]) -> bytes:
    s = DotStuffer()
    return b"".join(s.feed(c) for c in chunks) + s.finish()


def normalise(data: bytes) -> bytes:
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def unstuff(wire: bytes) -> bytes:
    """What a receiving server does: split lines on CRLF, stop at a lone dot, remove one leading dot."""
    assert wire.endswith(b".\r\n")
    lines = wire.split(b"\r\n")
    out = []
    for line in lines:
        if line == b".":
            break
        out.append(line[1:] if line.startswith(b".") else line)
    else:
        raise AssertionError("no terminator")
    return b"".join(line + b"\r\n" for line in out)


def client_at_data(content: bytes) -> tuple[SMTPClientProtocol, StringTransport, Deferred[Any]]:
    """A client that has been answered up to 354 and has written ``content`` as DATA into the transport."""
    proto = SMTPClientProtocol(Clock(), "c.test", tls_mode="none")
    t = StringTransport()
    proto.makeConnection(t)
    proto.establish()
    proto.dataReceived(b"220 hi\r\n250-x\r\n250 PIPELINING\r\n")
    rcpt = Recipient("a@example.net")
    d = proto.deliver(DeliveryRequest("Q", Envelope("s@x.test", [rcpt]), (rcpt,), lambda: io.BytesIO(content)))
    t.clear()
    proto.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    return proto, t, d


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    data = draw(payloads)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    chunks, last = [], 0
    for c in cuts + [len(data)]:
        chunks.append(data[last:c])
        last = c
    return data, chunks


@settings(max_examples=400)
@given(chunked())
def test_chunking_does_not_matter(sample: tuple[bytes, list[bytes]]) -> None:
    data, chunks = sample
    assert stuff_chunks(chunks) == stuff_chunks([data])


@settings(max_examples=400)
@given(chunked())
def test_round_trip_and_single_terminator(sample: tuple[bytes, list[bytes]]) -> None:
    data, chunks = sample
    wire = stuff_chunks(chunks)
    # the end-of-data sequence appears exactly once, at the very end
    assert (b"\r\n" + wire).find(b"\r\n.\r\n") == len(wire) - 3
    # no bare CR or LF reaches the wire
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", wire) is None
    assert unstuff(wire) == normalise(data)


def test_known_cases() -> None:
    assert stuff_chunks([b""]) == b".\r\n"
    assert stuff_chunks([b".\r\n"]) == b"..\r\n.\r\n"
    assert stuff_chunks([b"a\r\n", b".", b"\r\nb"]) == b"a\r\n..\r\nb\r\n.\r\n"
    assert stuff_chunks([b"a\r", b"\n.b"]) == b"a\r\n..b\r\n.\r\n"
    assert stuff_chunks([b"a\n.\nb"]) == b"a\r\n..\r\nb\r\n.\r\n"


def test_lone_dot_at_16k_boundary_on_the_wire() -> None:
    """The twisted.mail bug: a chunk ends with CRLF and the next starts with '.'."""
    boundary = 16 * 1024
    head = b"Subject: x\r\n\r\n"
    filler = b"y" * (boundary - len(head) - 2) + b"\r\n"
    body = head + filler + b".\r\nMAIL FROM:<evil@example.com>\r\n" + b"z" * 100 + b"\r\n"
    assert body[boundary - 2:boundary + 1] == b"\r\n."
    for chunk in (boundary, READ_CHUNK, 1, 7):
        s = DotStuffer()
        wire = b"".join(s.feed(body[i:i + chunk]) for i in range(0, len(body), chunk)) + s.finish()
        assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")
        assert b"\r\n..\r\nMAIL FROM" in wire

    # and through the protocol, which reads READ_CHUNK octets at a time
    big = head + b"y" * (READ_CHUNK - len(head) - 2) + b"\r\n" + b".\r\nQUIT\r\n"
    proto, t, d = client_at_data(big)
    wire = t.value()
    assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")
    assert b"\r\n..\r\nQUIT\r\n" in wire
    proto.dataReceived(b"250 ok\r\n")
    out: list = []
    d.addCallback(out.append)
    assert out[0][0].outcome is Outcome.DELIVERED


# ---------------------------------------------------------------- reply parser and the whole DATA path

from exmta.smtp.client import ReplyParser  # noqa: E402

reply_texts = st.lists(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20), min_size=1,
                       max_size=4)
replies = st.lists(st.tuples(st.sampled_from([220, 250, 354, 421, 451, 550, 554]), reply_texts),
                   min_size=1, max_size=6)


@settings(max_examples=300)
@given(replies, st.lists(st.integers(1, 40), max_size=30))
def test_reply_parser_any_chunking(spec: list, cuts: list[int]) -> None:
    wire = b""
    for code, lines in spec:
        for i, text in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            wire += f"{code}{sep}{text}\r\n".encode()
    parser = ReplyParser()
    got = []
    pos = 0
    for n in cuts:
        got += parser.feed(wire[pos:pos + n])
        pos += n
    got += parser.feed(wire[pos:])
    assert [(r.code, len(r.lines)) for r in got] == [(c, len(lines)) for c, lines in spec]
    assert not parser.partial


@settings(max_examples=60, deadline=None)
@given(payloads, st.integers(1, 64))
def test_protocol_data_path_any_read_size(data: bytes, read_size: int) -> None:
    import exmta.smtp.client as client
    old = client.READ_CHUNK
    client.READ_CHUNK = read_size
    try:
        _, t, _ = client_at_data(data)
        assert unstuff(t.value()) == normalise(data)
    finally:
        client.READ_CHUNK = old
