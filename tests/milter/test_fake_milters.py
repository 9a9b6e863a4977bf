"""Fake milters on loopback through the real SMTP server: modifications, and milters that die,
answer garbage or never answer. Each failure ends in the milter's default action; a 5xx only
when the operator chose ``default_action = "reject"``; nothing acknowledged is lost."""
from __future__ import annotations

import struct

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred

from exmta.milter import protocol as p
from support.procs import free_port
from tests.milter.fakes import CONTINUE, FakeMilter, accept_all, optneg_reply, reply
from tests.milter.harness import make_server, send

MESSAGE = (b"From: sender@remote.test\r\nTo: u@example.test\r\nSubject: hello\r\n"
           b"X-Spam: old\r\n\r\nthe body\r\n")


def modifying(command: bytes, data: bytes):
    if command == b"E":
        return [reply(b"p"),
                reply(b"i", struct.pack("!I", 0) + b"X-Top\0first\0"),
                reply(b"h", b"X-Folded\0one\n\ttwo\0"),
                reply(b"m", struct.pack("!I", 1) + b"Subject\0[milter] hello\0"),
                reply(b"m", struct.pack("!I", 1) + b"X-Spam\0\0"),
                reply(b"b", b"new body\nline two\n"),
                reply(b"2", b"<added@example.test>\0NOTIFY=NEVER\0"),
                reply(b"-", b"<u@example.test>\0"),
                reply(b"q", b"held by the fake\0"),
                CONTINUE]
    return accept_all(command, data)


def dies_after_mail(command: bytes, data: bytes):
    return "die" if command == b"M" else accept_all(command, data)


def garbage(command: bytes, data: bytes):
    if command == b"O":
        return [b"220 mail.example ESMTP Postfix\r\n"]
    return []


def garbage_at_end(command: bytes, data: bytes):
    if command == b"E":
        return [struct.pack("!I", 50_000_000) + b"b"]  # a packet far over the bound
    return accept_all(command, data)


def hangs_at_end(command: bytes, data: bytes):
    return "hang" if command == b"E" else accept_all(command, data)


def header_injection(command: bytes, data: bytes):
    if command == b"E":
        return [reply(b"h", b"X-Evil\0a\nBcc: victim@example.test\0"), CONTINUE]
    return accept_all(command, data)


@pytest.fixture
def milter():
    servers = []

    def start(script):
        server = FakeMilter(script)
        servers.append(server)
        return server, server.listen(reactor)

    yield start
    for server in servers:
        server.stop()


def run(coro):
    return ensureDeferred(coro)


@pytest_twisted.inlineCallbacks
def test_every_modification_goes_through_the_core(milter):
    server, socket = milter(modifying)
    factory, store = make_server(reactor, [{"name": "fake", "socket": socket}])
    line = yield run(send(reactor, factory, MESSAGE))
    assert line.startswith(b"250 "), line
    [queue_id] = store.queue_ids()
    env = store.envelope(queue_id)
    assert [(r.address, r.notify) for r in env.recipients] == [("added@example.test", ("NEVER",))]
    assert env.held_reason == "milter fake: held by the fake"
    with store.open_content(queue_id) as f:
        stored = f.read()
    head, _, body = stored.partition(b"\r\n\r\n")
    fields = head.split(b"\r\n")
    assert fields[0] == b"X-Top: first"
    assert b"Subject: [milter] hello" in fields and not any(f.startswith(b"X-Spam") for f in fields)
    assert head.endswith(b"X-Folded: one\r\n\ttwo")
    assert body == b"new body\r\nline two\r\n"
    # the milter saw the acknowledged conversation, with the queue id in the macros
    kinds = server.kinds()
    assert kinds[0] == b"O" and b"C" in kinds and b"H" in kinds and b"E" in kinds
    macros = [d for c, d in server.commands if c == b"D" and d[:1] == b"E"]
    assert macros and b"i\0" + queue_id.encode() + b"\0" in macros[0]
    rcpts = [d for c, d in server.commands if c == b"R"]
    assert rcpts == [b"<u@example.test>\0"]


@pytest.mark.parametrize("script", [dies_after_mail, garbage, garbage_at_end, hangs_at_end, header_injection],
                         ids=["dies", "garbage", "garbage-at-end", "never-answers", "header-injection"])
@pytest.mark.parametrize("action, code", [("tempfail", b"451 4.7.1"), ("accept", b"250 "),
                                          ("reject", b"550 5.7.1"), ("quarantine", b"250 ")])
@pytest_twisted.inlineCallbacks
def test_a_failing_milter_gets_its_default_action(milter, script, action, code):
    server, socket = milter(script)
    factory, store = make_server(reactor, [{"name": "bad", "socket": socket, "default_action": action,
                                            "command_timeout": 2, "content_timeout": 2}])
    line = yield run(send(reactor, factory, MESSAGE))
    assert line.startswith(code), line
    if code.startswith(b"250"):  # acknowledged: queued, unchanged (a failed milter's edits are dropped)
        [queue_id] = store.queue_ids()
        with store.open_content(queue_id) as f:
            stored = f.read()
        assert stored.endswith(MESSAGE) and b"X-Evil" not in stored
        env = store.envelope(queue_id)
        assert [r.address for r in env.recipients] == ["u@example.test"]
        if action == "quarantine":
            assert env.held_reason.startswith("milter bad failed:")
        else:
            assert env.held_reason is None
    else:
        assert store.queue_ids() == []


@pytest_twisted.inlineCallbacks
def test_a_milter_that_is_not_there(tmp_path):
    for socket in (f"unix:{tmp_path}/none.sock", f"inet:127.0.0.1:{free_port()}"):  # nobody listens
        factory, store = make_server(reactor, [{"name": "gone", "socket": socket, "connect_timeout": 2}])
        line = yield run(send(reactor, factory, MESSAGE))
        assert line.startswith(b"451 4.7.1"), line
        assert store.queue_ids() == []


@pytest_twisted.inlineCallbacks
def test_unix_socket_and_a_list_in_order(tmp_path):
    first = FakeMilter(lambda c, d: [reply(b"h", b"X-First\0" + b"1\0"), CONTINUE] if c == b"E"
                       else accept_all(c, d))
    second_replies = {b"E": [reply(b"y", b"554 5.7.1 refused by the second\0")]}
    second = FakeMilter(lambda c, d: second_replies.get(c) or accept_all(c, d))
    sock = first.listen_unix(reactor, str(tmp_path / "m.sock"))
    try:
        factory, store = make_server(reactor, [{"name": "one", "socket": sock},
                                               {"name": "two", "socket": second.listen(reactor)}])
        line = yield run(send(reactor, factory, MESSAGE))
        assert line.startswith(b"554 5.7.1 refused by the second"), line
        assert b"A" not in second.kinds()  # decided at end of message: nothing to abort
        assert store.queue_ids() == [] and b"E" in first.kinds()
        second_replies[b"E"] = [reply(b"d")]
        line = yield run(send(reactor, factory, MESSAGE))
        assert line.startswith(b"250 ") and store.queue_ids() == []  # discarded: accepted, never queued
        second_replies[b"E"] = [reply(b"-", b"<u@example.test>\0"), CONTINUE]
        line = yield run(send(reactor, factory, MESSAGE))
        assert line.startswith(b"250 ") and store.queue_ids() == []  # every recipient removed: discarded
        second_replies[b"R"] = [reply(b"t")]
        del second_replies[b"E"]
        line = yield run(send(reactor, factory, MESSAGE, rcpts=("u@example.test", "v@example.test")))
        assert line.startswith(b"451 4.7.1"), line  # one recipient refused refuses the message
    finally:
        first.stop()
        second.stop()


@pytest_twisted.inlineCallbacks
def test_negotiated_no_reply_steps_and_requested_macros(milter):
    wanted = struct.pack("!I", 3) + b"{rcpt_addr}\0"

    def script(command, data):
        if command == b"O":
            return [reply(b"O", struct.pack("!III", 6, p.SMFIF_ADDHDRS, p.SMFIP_NR_HDR | p.SMFIP_NOHELO
                                            | p.SMFIP_NR_RCPT | p.SMFIP_NR_BODY) + wanted)]
        if command in (b"L", b"R", b"B"):
            return []  # negotiated: no reply
        return accept_all(command, data)

    server, socket = milter(script)
    factory, store = make_server(reactor, [{"name": "nr", "socket": socket}])
    line = yield run(send(reactor, factory, MESSAGE))
    assert line.startswith(b"250 "), line
    assert b"H" not in server.kinds()
    assert (b"D", b"R{rcpt_addr}\0u@example.test\0") in server.commands
    assert optneg_reply  # the helper the other scripts use
