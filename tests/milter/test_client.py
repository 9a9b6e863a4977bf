"""One milter conversation over StringTransport with a task.Clock: steps, macros, flags, timeouts."""
from __future__ import annotations

import struct

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from exmta.milter import protocol as p
from exmta.milter.client import (MessageFacts, MilterFailed, MilterProtocol, MilterSettings, _Conversation,
                                 aiter_chunks, parse_socket)
from tests.milter.fakes import CONTINUE, optneg_reply, reply


def sent_commands(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    while data:
        length = struct.unpack("!I", data[:4])[0]
        out.append((data[4:5], data[5:4 + length]))
        data = data[4 + length:]
    return out


def facts(body=(b"line one\r\nline two\r\n",)) -> MessageFacts:
    return MessageFacts(
        client_ip="192.0.2.7", client_port=40001, helo="client.example", sender="a@example.test",
        mail_args=("SIZE=100",), recipients=[("b@example.test", ()), ("c@example.test", ("NOTIFY=NEVER",))],
        headers=[(b"From", b"a@example.test"), (b"Subject", b"hello\n\tworld")],
        body=aiter_chunks(list(body)),
        macros={"j": "mx.example.test", "i": "Q123", "{client_addr}": "192.0.2.7", "{mail_addr}": "a@example.test"},
        rcpt_macros=[{"{rcpt_addr}": "b@example.test"}, {"{rcpt_addr}": "c@example.test"}])


def start(clock: Clock, settings: MilterSettings | None = None, message: MessageFacts | None = None):
    proto = MilterProtocol(p.MAX_PACKET)
    transport = StringTransport()
    proto.makeConnection(transport)
    conv = _Conversation(settings or MilterSettings("m", "inet:127.0.0.1:1"), clock, proto)
    d = Deferred.fromCoroutine(conv.run(message or facts()))
    return proto, transport, d


def test_full_conversation_with_every_modification():
    clock = Clock()
    proto, transport, d = start(clock)
    proto.dataReceived(optneg_reply(protocol=p.SMFIP_NR_HDR))
    # connect, helo, mail, rcpt x2, data, eoh, body: a reply each (headers get none: NR_HDR)
    proto.dataReceived(CONTINUE * 8)
    mods = [
        reply(b"p"),
        reply(b"h", b"X-Added\0yes\0"),
        reply(b"i", struct.pack("!I", 0) + b"X-Top\0first\0"),
        reply(b"m", struct.pack("!I", 1) + b"Subject\0changed\0"),
        reply(b"b", b"new body\r\n"),
        reply(b"+", b"<d@example.test>\0"),
        reply(b"2", b"<e@example.test>\0NOTIFY=NEVER\0"),
        reply(b"-", b"<b@example.test>\0"),
        reply(b"q", b"looks bad\0"),
        reply(b"a"),
    ]
    proto.dataReceived(b"".join(mods))
    outcome = d.result
    assert outcome.action == "accept" and outcome.stage == "eom"
    assert [m.kind for m in outcome.modifications] == ["addheader", "insheader", "chgheader", "replbody",
                                                      "addrcpt", "addrcpt_par", "delrcpt", "quarantine"]
    cmds = sent_commands(transport.value())
    # no HELO macros are known here, so none precede HELO
    assert [c for c, _ in cmds] == [b"O", b"D", b"C", b"H", b"D", b"M", b"D", b"R", b"D", b"R", b"D", b"T",
                                    b"L", b"L", b"D", b"N", b"B", b"D", b"E"]
    assert cmds[1][1] == b"Cj\0mx.example.test\0{client_addr}\x00192.0.2.7\0"
    assert cmds[2][1] == b"[192.0.2.7]\x004" + struct.pack("!H", 40001) + b"192.0.2.7\0"
    assert cmds[4][1] == b"Mi\0Q123\0{mail_addr}\0a@example.test\0"
    assert cmds[5][1] == b"<a@example.test>\0SIZE=100\0"
    assert cmds[8][1] == b"Ri\0Q123\0{rcpt_addr}\0c@example.test\0"
    assert cmds[9][1] == b"<c@example.test>\0NOTIFY=NEVER\0"
    assert cmds[13][1] == b"Subject\0hello\n\tworld\0"
    assert cmds[16][1] == b"line one\r\nline two\r\n"


def test_steps_negotiated_away_are_not_sent_and_replies_not_awaited():
    clock = Clock()
    flags = (p.SMFIP_NOCONNECT | p.SMFIP_NOHELO | p.SMFIP_NR_MAIL | p.SMFIP_NORCPT | p.SMFIP_NODATA
             | p.SMFIP_NOHDRS | p.SMFIP_NOEOH | p.SMFIP_NOBODY)
    proto, transport, d = start(clock)
    proto.dataReceived(optneg_reply(protocol=flags))
    proto.dataReceived(CONTINUE)  # the end-of-message reply: nothing else is answered
    assert d.result.action == "continue"
    assert [c for c, _ in sent_commands(transport.value())] == [b"O", b"D", b"M", b"D", b"E"]


def test_the_milters_own_macro_list_wins():
    clock = Clock()
    proto, transport, d = start(clock)
    wanted = struct.pack("!I", 0) + b"{client_addr}\0" + struct.pack("!I", 5) + b"j\0"
    proto.dataReceived(reply(b"O", struct.pack("!III", 6, 0, p.SMFIP_NOHELO | p.SMFIP_NOMAIL | p.SMFIP_NORCPT
                                                 | p.SMFIP_NODATA | p.SMFIP_NOHDRS | p.SMFIP_NOEOH
                                                 | p.SMFIP_NOBODY) + wanted))
    proto.dataReceived(CONTINUE * 2)
    assert d.result.action == "continue"
    cmds = sent_commands(transport.value())
    assert cmds[1] == (b"D", b"C{client_addr}\x00192.0.2.7\0")
    assert cmds[-2] == (b"D", b"Ej\0mx.example.test\0")


def test_skip_stops_the_body():
    clock = Clock()
    proto, transport, d = start(clock, message=facts(body=[b"x" * 70000, b"y" * 10, b"z" * 10]))
    proto.dataReceived(optneg_reply(protocol=p.SMFIP_SKIP | p.SMFIP_NOHDRS))
    proto.dataReceived(CONTINUE * 7 + reply(b"s") + CONTINUE)
    assert d.result.action == "continue"
    kinds = [c for c, _ in sent_commands(transport.value())]
    assert kinds.count(b"B") == 1 and kinds[-1] == b"E"


@pytest.mark.parametrize("feed, stage, action, text", [
    (CONTINUE * 3 + reply(b"r"), "rcpt", "reject", ""),
    (CONTINUE * 2 + reply(b"y", b"451 4.7.1 later\0"), "mail", "tempfail", "451 4.7.1 later"),
    (reply(b"d"), "connect", "discard", ""),
    (CONTINUE * 8 + reply(b"y", b"554 5.7.1 virus\0"), "eom", "reject", "554 5.7.1 virus"),
    (CONTINUE * 8 + reply(b"t"), "eom", "tempfail", ""),
])
def test_decisions_end_the_conversation(feed, stage, action, text):
    clock = Clock()
    proto, transport, d = start(clock)
    proto.dataReceived(optneg_reply(protocol=p.SMFIP_NR_HDR))
    proto.dataReceived(feed)
    outcome = d.result
    assert (outcome.stage, outcome.action, outcome.reply) == (stage, action, text)


def test_silence_times_out_and_progress_restarts_the_clock():
    clock = Clock()
    settings = MilterSettings("m", "inet:127.0.0.1:1", command_timeout=10, content_timeout=100)
    proto, transport, d = start(clock, settings)
    clock.advance(9)
    assert not d.called
    proto.dataReceived(optneg_reply(protocol=p.SMFIP_NR_HDR) + CONTINUE * 8)
    clock.advance(90)
    proto.dataReceived(reply(b"p"))
    clock.advance(90)
    assert not d.called  # 180 s in all, but never 100 s without a word
    clock.advance(10)
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(MilterFailed) and "no reply to end of message within 100 s" in str(failure.value)

    proto, transport, d = start(clock, settings)
    clock.advance(10)
    assert "no reply to option negotiation within 10 s" in str(d.result.value)
    d.addErrback(lambda f: None)


@pytest.mark.parametrize("feed, why", [
    (optneg_reply() + reply(b"h", b"X\0y\0"), "not allowed after connect"),
    (optneg_reply(actions=p.SMFIF_ADDHDRS, protocol=p.SMFIP_NR_HDR) + CONTINUE * 8 + reply(b"b", b"x"),
     "not negotiated"),
    (optneg_reply(protocol=p.SMFIP_NR_HDR) + CONTINUE * 7 + reply(b"s"), "not allowed after body"),  # no SKIP
    (optneg_reply() + b"HTTP/1.1 400 Bad Request\r\n\r\n", "garbage"),
    (optneg_reply(protocol=p.SMFIP_HDR_LEADSPC), "not offered"),
    (optneg_reply(protocol=p.SMFIP_NR_HDR) + CONTINUE * 8 + reply(b"4"), "not allowed at end of message"),
])
def test_misbehaviour_fails_the_milter(feed, why):
    clock = Clock()
    proto, transport, d = start(clock)
    proto.dataReceived(feed)
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(MilterFailed), failure
    assert why in str(failure.value)


def test_connection_lost_fails_the_waiter():
    clock = Clock()
    proto, transport, d = start(clock)
    proto.dataReceived(optneg_reply() + CONTINUE)
    proto.connectionLost(None)
    assert "connection closed" in str(d.result.value)
    d.addErrback(lambda f: None)


def test_socket_forms():
    assert parse_socket("inet:127.0.0.1:8891") == ("tcp", ("127.0.0.1", 8891))
    assert parse_socket("inet:8891@localhost") == ("tcp", ("localhost", 8891))
    assert parse_socket("inet6:[::1]:8891") == ("tcp", ("::1", 8891))
    assert parse_socket("unix:/run/milter.sock") == ("unix", "/run/milter.sock")
    for bad in ("inet:host", "unix:relative", "local:/x", "inet:h:0", "inet:h:70000"):
        with pytest.raises(ValueError):
            parse_socket(bad)


def test_connect_timeout_and_a_refusal_before_end_of_message_aborts():
    from twisted.internet.testing import MemoryReactorClock

    from exmta.milter.client import converse

    reactor = MemoryReactorClock()
    settings = MilterSettings("m", "unix:/nonexistent/milter.sock", connect_timeout=5)
    d = Deferred.fromCoroutine(converse(settings, facts(), reactor, reactor))
    assert len(reactor.unixClients) == 1 and not d.called  # connecting, never connected
    reactor.advance(5)
    assert "no connection within 5 s" in str(d.result.value)
    d.addErrback(lambda f: None)

    reactor = MemoryReactorClock()
    d = Deferred.fromCoroutine(converse(settings, facts(), reactor, reactor))
    factory = reactor.unixClients[0][1]
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    reactor.advance(0)
    proto.dataReceived(optneg_reply() + CONTINUE + reply(b"r"))  # refused at HELO
    assert d.result.action == "reject" and d.result.stage == "helo"
    assert [c for c, _ in sent_commands(transport.value())][-2:] == [b"A", b"Q"]
    assert transport.disconnecting
