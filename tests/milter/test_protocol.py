"""The sans-IO milter codec: commands encoded byte for byte, replies parsed incrementally and bounded."""
from __future__ import annotations

import struct

import pytest

from exmta.milter import protocol as p
from exmta.milter.protocol import MilterProtocolError, Negotiated, ReplyParser


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


def test_commands_on_the_wire():
    assert p.optneg() == packet(b"O", struct.pack("!III", 6, p.ACTIONS_OFFERED, p.PROTOCOL_OFFERED))
    assert p.connect("[192.0.2.1]", "4", 2525, "192.0.2.1") == \
        packet(b"C", b"[192.0.2.1]\0" + b"4" + struct.pack("!H", 2525) + b"192.0.2.1\0")
    assert p.connect("host", "U", 0, "") == packet(b"C", b"host\0U")
    assert p.helo("client.example") == packet(b"H", b"client.example\0")
    assert p.mail("<a@example.test>", ["SIZE=10", "BODY=8BITMIME"]) == \
        packet(b"M", b"<a@example.test>\0SIZE=10\0BODY=8BITMIME\0")
    assert p.rcpt("<b@example.test>") == packet(b"R", b"<b@example.test>\0")
    assert p.header("Subject", "hi") == packet(b"L", b"Subject\0hi\0")
    assert p.data() == packet(b"T") and p.eoh() == packet(b"N") and p.end_of_message() == packet(b"E")
    assert p.abort() == packet(b"A") and p.quit() == packet(b"Q") and p.quit_new_connection() == packet(b"K")
    assert p.unknown("XFOO") == packet(b"U", b"XFOO\0")
    assert p.macros("connect", {"j": "mx.example.test", "{client_addr}": "192.0.2.1"}) == \
        packet(b"D", b"Cj\0mx.example.test\0{client_addr}\x00192.0.2.1\0")
    assert p.macros("eom", {"i": "Q1"}) == packet(b"D", b"Ei\0Q1\0")
    assert p.macros("eoh", {"i": "Q1"})[5:6] == b"N"


def test_body_chunks_are_bounded():
    chunks = list(p.body_chunks(b"x" * (p.BODY_CHUNK * 2 + 5)))
    assert [len(c) - 5 for c in chunks] == [p.BODY_CHUNK, p.BODY_CHUNK, 5]
    with pytest.raises(ValueError):
        p.body(b"x" * (p.BODY_CHUNK + 1))
    with pytest.raises(ValueError):
        p.header("X", "a\0b")  # a NUL would cut the string short


def test_every_reply_parses_incrementally():
    stream = b"".join([
        packet(b"O", struct.pack("!III", 6, 0x1FF, p.SMFIP_NR_HDR | p.SMFIP_SKIP) + struct.pack("!I", 5)
               + b"i {auth_authen}\0"),
        packet(b"c"), packet(b"a"), packet(b"r"), packet(b"t"), packet(b"d"), packet(b"p"), packet(b"s"),
        packet(b"f"), packet(b"4"),
        packet(b"y", b"550 5.7.1 go away\0"),
        packet(b"h", b"X-Test\0one\0"),
        packet(b"i", struct.pack("!I", 0) + b"DKIM-Signature\0v=1; a=rsa-sha256\0"),
        packet(b"m", struct.pack("!I", 2) + b"Subject\0\0"),
        packet(b"+", b"<new@example.test>\0"),
        packet(b"2", b"<par@example.test>\0NOTIFY=NEVER\0"),
        packet(b"-", b"<old@example.test>\0"),
        packet(b"b", b"new body\r\n"),
        packet(b"e", b"<from@example.test>\0"),
        packet(b"q", b"suspicious\0"),
        packet(b"l", struct.pack("!I", 2) + b"{mail_addr} i\0"),
    ])
    parser = ReplyParser()
    replies = []
    for i in range(len(stream)):  # one octet at a time: nothing is lost at packet boundaries
        replies += parser.feed(stream[i:i + 1])
    assert parser.pending == 0
    kinds = [r.kind for r in replies]
    assert kinds == ["optneg", "continue", "accept", "reject", "tempfail", "discard", "progress", "skip",
                     "conn_fail", "shutdown", "replycode", "addheader", "insheader", "chgheader", "addrcpt",
                     "addrcpt_par", "delrcpt", "replbody", "chgfrom", "quarantine", "setsymlist"]
    neg = replies[0]
    assert (neg.version, neg.actions, neg.macros) == (6, 0x1FF, {"eom": ("i", "{auth_authen}")})
    assert replies[10].code == 550 and replies[10].text == "550 5.7.1 go away"
    assert (replies[12].index, replies[12].name, replies[12].value) == (0, "DKIM-Signature", "v=1; a=rsa-sha256")
    assert (replies[13].index, replies[13].value) == (2, "")
    assert replies[15].address == "<par@example.test>" and replies[15].args == ("NOTIFY=NEVER",)
    assert replies[17].body == b"new body\r\n"
    assert replies[20].stage == "mail" and replies[20].names == ("{mail_addr}", "i")
    assert all(r.is_modification for r in replies[11:20])


@pytest.mark.parametrize("stream, why", [
    (struct.pack("!I", 0), "zero-length"),
    (struct.pack("!I", p.MAX_PACKET + 1) + b"b", "over the limit"),
    (packet(b"Z"), "unknown reply"),
    (packet(b"c", b"extra"), "unexpected data"),
    (packet(b"y", b"250 ok\0"), "not a 4xx or 5xx"),
    (packet(b"y", b"550 no NUL"), "not NUL-terminated"),
    (packet(b"h", b"only-name\0"), "expected 2"),
    (packet(b"h", b"Bad Name\0v\0"), "bad header name"),
    (packet(b"m", b"\0\0"), "too short"),
    (packet(b"O", b"\0\0\0\6"), "shorter than 12"),
    (packet(b"O", struct.pack("!IIII", 6, 0, 0, 9) + b"i\0"), "unknown macro stage"),
])
def test_garbage_is_refused(stream, why):
    with pytest.raises(MilterProtocolError, match=why):
        ReplyParser().feed(stream)


def test_the_packet_bound_is_checked_before_the_data_arrives():
    parser = ReplyParser(max_packet=100)
    with pytest.raises(MilterProtocolError):
        parser.feed(struct.pack("!I", 101))  # refused on the length alone, nothing buffered for it


def test_negotiation():
    offer = p.parse_reply(b"O", struct.pack("!III", 6, p.SMFIF_ADDHDRS | p.SMFIF_CHGFROM,
                                            p.SMFIP_NOCONNECT | p.SMFIP_NR_HDR | p.SMFIP_SKIP))
    neg = Negotiated.from_reply(offer)
    assert not neg.sends("connect") and neg.sends("helo") and not neg.answers("header") and neg.answers("body")
    assert neg.skip and neg.may("addheader") and not neg.may("chgfrom")  # CHGFROM is never offered: masked
    with pytest.raises(MilterProtocolError, match="not offered"):
        Negotiated.from_reply(p.parse_reply(b"O", struct.pack("!III", 6, 0, p.SMFIP_HDR_LEADSPC)))
    with pytest.raises(MilterProtocolError, match="version"):
        Negotiated.from_reply(p.parse_reply(b"O", struct.pack("!III", 7, 0, 0)))
    with pytest.raises(MilterProtocolError, match="expected the option negotiation"):
        Negotiated.from_reply(p.parse_reply(b"c", b""))
    # the MDS size bits are ignored, not refused
    assert Negotiated.from_reply(p.parse_reply(b"O", struct.pack("!III", 6, 0, 0x10000000))).protocol == 0
