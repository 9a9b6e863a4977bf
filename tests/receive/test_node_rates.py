"""Receive rate limits counted once per node (exmta.receive.noderates), on a task.Clock: the main process
counts for itself and for its receive workers, so a limit means the same with 0, 1 or N workers."""
from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from exmta.model import Address, MailParams, RcptParams, Session, Transaction, Verdict
from exmta.receive.noderates import NodeRates, RemoteRates
from exmta.receive.policy import RATE_CHECK_FAILED, DefaultReceivePolicy
from exmta.receive.workers import WorkerPool, _WorkerProtocol

IP = "192.0.2.7"


class Channel:
    """A worker's stdout and stdin, joined to the main process's NodeRates (answers held until ``deliver``)."""

    def __init__(self, node: NodeRates) -> None:
        self.node = node
        self.answers: list[bytes] = []
        self.remote: RemoteRates | None = None

    def write(self, line: bytes) -> None:
        assert line.startswith(b"?") and line.endswith(b"\n")
        self.answers.append(self.node.answer(line[1:-1]))

    def deliver(self) -> None:
        assert self.remote is not None
        answers, self.answers = self.answers, []
        self.remote.lines_received(b"".join(answers))


class FakeReactor(Clock):
    """A Clock that also records readers (RemoteRates reads its stdin on the reactor)."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: list[Any] = []

    def addReader(self, reader: Any) -> None:
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        if reader in self.readers:
            self.readers.remove(reader)


def worker(node: NodeRates, clock: FakeReactor) -> tuple[RemoteRates, Channel]:
    channel = Channel(node)
    remote = channel.remote = RemoteRates(channel.write, clock, fd=-1)
    remote.running = True  # no stdin to read here: answers come through Channel.deliver
    return remote, channel


def policy(clock: Any, rates: Any, **limits: int) -> DefaultReceivePolicy:
    return DefaultReceivePolicy(lambda d: None, ["0.0.0.0/0"], clock=clock, connector="inbound", rates=rates,
                                **limits)


def mail(p: DefaultReceivePolicy, channel: Channel | None = None, user: str | None = None) -> Verdict:
    session = Session(peer_ip=IP, session_id="s1", auth_identity=user)
    out = p.check_mail(session, Address("a", "x.test"), MailParams())
    if isinstance(out, Deferred):
        got: list[Verdict] = []
        out.addCallback(got.append)
        assert not got, "a worker's check waits for the main process"
        assert channel is not None
        channel.deliver()
        return got[0]
    return out


def test_one_limit_for_the_main_process_and_two_workers() -> None:
    clock = FakeReactor()
    clock.advance(1_000_000)
    node = NodeRates(clock)
    main = policy(clock, node, messages_per_minute_per_ip=5)
    (r1, c1), (r2, c2) = worker(node, clock), worker(node, clock)
    w1 = policy(clock, r1, messages_per_minute_per_ip=5)
    w2 = policy(clock, r2, messages_per_minute_per_ip=5)
    got = [mail(w1, c1), mail(w2, c2), mail(main), mail(w1, c1), mail(w2, c2)]
    assert got == [Verdict.CONTINUE] * 5
    for p, ch in ((w1, c1), (w2, c2), (main, None)):
        refused = mail(p, ch)
        assert refused.reply is not None and (refused.reply.code, refused.reply.status) == (450, "4.7.1")
        assert "limit 5 messages per minute" in str(refused.reply)
    assert node.counters["inbound/messages_per_ip"].current(IP) == 5.0
    assert node.requests == 6  # four accepted and two refused through workers; the main process asks no one
    clock.advance(121)  # the window slides: the sender may send again, through any process
    assert mail(w2, c2) is Verdict.CONTINUE


def test_all_or_nothing_a_refused_user_does_not_use_up_the_address() -> None:
    clock = FakeReactor()
    node = NodeRates(clock)
    remote, channel = worker(node, clock)
    w = policy(clock, remote, messages_per_minute_per_ip=3, messages_per_minute_per_user=1)
    assert mail(w, channel, user="alice") is Verdict.CONTINUE
    refused = mail(w, channel, user="alice")
    assert "too much mail from alice" in str(refused.reply)
    assert node.counters["inbound/messages_per_ip"].current(IP) == 1.0  # not counted for the refused one
    assert mail(w, channel, user="bob") is Verdict.CONTINUE


def test_recipients_are_counted_by_the_main_process_too() -> None:
    clock = FakeReactor()
    node = NodeRates(clock)
    remote, channel = worker(node, clock)
    w = policy(clock, remote, recipients_per_minute_per_ip=2)
    session = Session(peer_ip=IP, session_id="s1")
    verdicts = []
    for _ in range(3):
        d = w.authorize_rcpt(session, Transaction(Address("a", "x.test")), Address("b", "y.test"), RcptParams())
        assert isinstance(d, Deferred)
        d.addCallback(verdicts.append)
        channel.deliver()
    assert verdicts[:2] == [Verdict.ACCEPT, Verdict.ACCEPT]
    assert str(verdicts[2].reply).startswith("452 4.5.3")


def test_no_answer_is_a_4xx_not_an_acceptance() -> None:
    clock = FakeReactor()
    node = NodeRates(clock)
    remote, channel = worker(node, clock)
    w = policy(clock, remote, messages_per_minute_per_ip=5)
    d = w.check_mail(Session(peer_ip=IP, session_id="s1"), Address("a", "x.test"), MailParams())
    got: list[Verdict] = []
    d.addCallback(got.append)
    clock.advance(remote.timeout)
    assert got == [RATE_CHECK_FAILED] and str(RATE_CHECK_FAILED.reply).startswith("451 4.3.0")
    channel.deliver()  # a late answer is dropped, nothing fires twice
    assert got == [RATE_CHECK_FAILED]
    assert not clock.getDelayedCalls()


def test_no_limit_no_request() -> None:
    clock = FakeReactor()
    node = NodeRates(clock)
    remote, channel = worker(node, clock)
    w = policy(clock, remote)
    assert mail(w, channel) is Verdict.CONTINUE
    assert node.requests == 0 and channel.answers == []


def test_counts_survive_a_reload_of_the_main_process_policies() -> None:
    clock = FakeReactor()
    node = NodeRates(clock)
    first = policy(clock, node, messages_per_minute_per_ip=2)
    assert mail(first) is Verdict.CONTINUE and mail(first) is Verdict.CONTINUE
    reloaded = policy(clock, node, messages_per_minute_per_ip=3)  # SIGHUP: a new policy, a higher limit
    assert mail(reloaded) is Verdict.CONTINUE
    assert str(mail(reloaded).reply).startswith("450 4.7.1")


def test_a_bad_request_gets_an_error_answer_and_the_worker_a_4xx() -> None:
    clock = FakeReactor()
    node = NodeRates(clock)
    assert json.loads(node.answer(b'{"id": 4, "take": [["x", "many"]]}')) == {
        "id": 4, "error": "not enough values to unpack (expected 4, got 2)"}
    assert node.answer(b"not json") == b""
    remote, _channel = worker(node, clock)
    failed: list[Any] = []
    remote.take([(remote.counter("inbound/messages_per_ip", 1), IP)]).addErrback(failed.append)
    remote.lines_received(b'{"id": 1, "error": "boom"}\n')
    assert "boom" in failed[0].getErrorMessage()


def test_answers_are_read_from_the_worker_stdin_in_any_chunks() -> None:
    clock = FakeReactor()
    r, w = os.pipe()
    try:
        remote = RemoteRates(lambda line: None, clock, fd=r)
        remote.startService()
        assert clock.readers == [remote]
        results: list[Any] = []
        for _ in range(2):
            remote.take([(remote.counter("c/messages_per_ip", 1), IP)]).addCallback(results.append)
        os.write(w, b'{"id": 1, "refused": -1}\n{"id": 2, "re')
        remote.doRead()
        os.write(w, b'fused": 0}\n')
        remote.doRead()
        assert results[0] is None and results[1].name == "c/messages_per_ip"
        assert remote.doRead() is None  # nothing to read: no error
        remote.stopService()
        assert clock.readers == []
    finally:
        os.close(r)
        os.close(w)


def test_the_worker_pool_answers_rate_checks_on_the_worker_stdin() -> None:
    clock = Clock()
    node = NodeRates(clock)
    committed: list[str] = []
    pool = WorkerPool(clock, 1, [], [], committed.append, node=node)
    written: list[tuple[int, bytes]] = []

    class Transport:
        def writeToChild(self, fd: int, data: bytes) -> None:
            written.append((fd, data))

    proto = _WorkerProtocol(pool, 0)
    proto.transport = Transport()
    ask = b'?{"id": 1, "take": [["inbound/messages_per_ip", 1, "192.0.2.7", 1]]}\n'
    proto.outReceived(ask + b"Q1\n" + ask.replace(b'"id": 1', b'"id": 2'))
    assert committed == ["Q1"]
    assert written == [(0, b'{"id": 1, "refused": -1}\n{"id": 2, "refused": 0}\n')]  # one write per read


# ---------------------------------------------------------------- connection limits of the node


def test_sessions_per_ip_count_every_worker_and_a_dead_worker_releases_its_own() -> None:
    node = NodeRates(Clock())
    assert node.admit(0, "inbound", IP, 0, 2) is None
    assert node.admit(1, "inbound", IP, 0, 2) is None
    assert node.admit(1, "inbound", IP, 0, 2) == f"too many connections from {IP} (limit 2)"
    assert node.admit(1, "inbound", "198.51.100.1", 0, 2) is None
    assert node.admit(1, "inbound", "198.51.100.2", 3, 0) == "too many connections (3, limit 3)"
    node.release(1, "inbound", IP)
    node.release(1, "inbound", IP)  # once only: it held one
    assert node.connection_counter("inbound").per_ip == {IP: 1, "198.51.100.1": 1}
    node.worker_ended(1)
    assert node.connection_counter("inbound").per_ip == {IP: 1}
    node.release(1, "inbound", "198.51.100.1")  # a late line from the dead worker changes nothing
    assert node.connection_counter("inbound").total == 1


def _worker_dispatcher(node: NodeRates, clock: FakeReactor, max_per_ip: int) -> tuple[Any, Channel, list[Any]]:
    from twisted.internet.protocol import Factory, Protocol

    from exmta.config.schema import ReceiveConnectorConfig
    from exmta.receive.wiring import make_dispatchers

    sessions: list[Any] = []

    class Session(Protocol):
        def __init__(self) -> None:
            self.data = b""
            sessions.append(self)

        def connectionMade(self) -> None:
            self.transport.write(b"220 hello\r\n")

        def dataReceived(self, data: bytes) -> None:
            self.data += data

    remote, channel = worker(node, clock)
    rc = ReceiveConnectorConfig(name="inbound", listen=("tcp:25",), max_connections_per_ip=max_per_ip)
    ((_endpoint, dispatcher),) = make_dispatchers([rc], [Factory.forProtocol(Session)], clock, node=remote)
    return dispatcher, channel, sessions


def _connect(dispatcher: Any) -> tuple[Any, Any]:
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    addr = IPv4Address("TCP", IP, 40000)
    transport = StringTransport(peerAddress=addr)
    proto = dispatcher.buildProtocol(addr)
    proto.makeConnection(transport)
    return proto, transport


def test_a_worker_session_waits_for_the_main_process_then_starts_with_what_the_client_said() -> None:
    clock = FakeReactor()
    node = NodeRates(clock)
    dispatcher, channel, sessions = _worker_dispatcher(node, clock, max_per_ip=1)
    proto, transport = _connect(dispatcher)
    proto.dataReceived(b"EHLO early\r\n")
    assert transport.value() == b"" and sessions == []  # no banner before the node admits the session
    channel.deliver()
    assert transport.value() == b"220 hello\r\n" and sessions[0].data == b"EHLO early\r\n"
    assert node.connection_counter("inbound").per_ip == {IP: 1}
    # a second session from the address, e.g. on another worker: over the node's limit of 1
    other, _other_channel, _ = _worker_dispatcher(node, clock, max_per_ip=1)
    _proto2, transport2 = _connect(other)
    _other_channel.deliver()
    assert transport2.value().startswith(b"421 4.7.0 ") and b"Too many connections from 192.0.2.7 (limit 1)" in transport2.value()
    assert transport2.disconnecting
    proto.connectionLost(None)
    assert channel.answers == [b""]  # the close line needs no answer
    assert node.connection_counter("inbound").per_ip == {}


def test_no_answer_from_the_main_process_is_421_and_a_client_gone_meanwhile_is_released() -> None:
    clock = FakeReactor()
    node = NodeRates(clock)
    dispatcher, channel, sessions = _worker_dispatcher(node, clock, max_per_ip=5)
    _proto, transport = _connect(dispatcher)
    clock.advance(10)
    assert transport.value().startswith(b"421 4.3.2 ") and sessions == []
    assert node.connection_counter("inbound").per_ip == {IP: 1}  # the main process did admit it
    channel.deliver()  # the late answer: the worker releases what it no longer holds
    channel.deliver()
    assert node.connection_counter("inbound").per_ip == {}
    proto, transport = _connect(dispatcher)
    proto.connectionLost(None)  # the client left before the answer
    channel.deliver()
    assert sessions == [] and node.connection_counter("inbound").per_ip == {}


def test_the_main_process_counts_its_own_sessions_in_the_node_counters() -> None:
    from twisted.internet.protocol import Factory, Protocol

    from exmta.config.schema import ReceiveConnectorConfig
    from exmta.receive.wiring import make_dispatchers

    node = NodeRates(Clock())
    rc = ReceiveConnectorConfig(name="inbound", listen=("tcp:25",), max_connections_per_ip=1)
    ((_endpoint, dispatcher),) = make_dispatchers([rc], [Factory.forProtocol(Protocol)], Clock(), node=node)
    assert dispatcher.node is None  # it asks no one: it is the one that counts
    proto, _transport = _connect(dispatcher)
    assert node.connection_counter("inbound").per_ip == {IP: 1}
    assert node.admit(0, "inbound", IP, 0, 1) == f"too many connections from {IP} (limit 1)"  # a worker's ask
    proto.connectionLost(None)
    assert node.connection_counter("inbound").per_ip == {}
