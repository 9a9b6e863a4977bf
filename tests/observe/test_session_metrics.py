"""The ESMTP server reports connections, timeouts and failed AUTH to the metrics (StringTransport + Clock)."""
from __future__ import annotations

import base64

import argon2
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from exmta.auth.lockout import LockoutSettings
from exmta.auth.smtp import Authenticator
from exmta.auth.users import PasswordHasher, UserRecord, UsersChecker, UsersFile, UsersRealm
from exmta.config.schema import ReceiveConnectorConfig
from exmta.filters.base import FilterChain
from exmta.model import Verdict
from exmta.observe.metrics import Metrics
from exmta.smtp.server import ESMTPServerFactory
from exmta.testing.memstore import MemoryStore
from support.smtp_stubs import StubPolicy, TLSStringTransport


def value(metrics: Metrics, metric, **labels: str) -> float:
    return metric.labels(**labels)._value.get()


def connect(factory: ESMTPServerFactory) -> tuple[object, StringTransport]:
    addr = IPv4Address("TCP", "192.0.2.7", 40000)
    proto = factory.buildProtocol(addr)
    transport = TLSStringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 587))
    proto.makeConnection(transport)
    transport.clear()
    return proto, transport


def test_connections_timeouts_and_auth_failures_are_counted(tmp_path) -> None:
    clock = Clock()
    clock.advance(1_700_000_000)
    hasher = PasswordHasher(argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    users = str(tmp_path / "users.jsonl")
    UsersFile(users).write({"alice": UserRecord("alice", hasher.hash("right"), ["alice@example.test"])})
    checker = UsersChecker(users, maybeDeferred, hasher=hasher)
    config = ReceiveConnectorConfig(name="submission", hostname="mx.test", command_timeout=60.0)
    factory = ESMTPServerFactory(config, StubPolicy(), FilterChain([], clock), MemoryStore(clock), clock,
                                 tls_context_factory=object())
    factory.authenticator = Authenticator(Portal(UsersRealm(checker), [checker]), clock,
                                          mechanisms=("PLAIN",), lockout=LockoutSettings(tarpit=1.0))
    metrics = Metrics(clock, factories=lambda: {"submission": factory})
    factory.session_observer = metrics

    proto, t = connect(factory)
    for line in (b"EHLO c.test\r\n", b"STARTTLS\r\n", b"EHLO c.test\r\n"):
        proto.dataReceived(line)
    t.clear()
    wrong = base64.b64encode(b"\0alice\0wrong")
    proto.dataReceived(b"AUTH PLAIN " + wrong + b"\r\n")
    clock.advance(1.0)  # the tarpit
    assert t.value() == b"535 5.7.8 Error: authentication failed\r\n"
    assert value(metrics, metrics.auth_failures, connector="submission") == 1
    assert value(metrics, metrics.connections, connector="submission") == 1

    connect(factory)
    text = metrics.render().decode()
    assert 'exmta_smtp_sessions{connector="submission"} 2.0' in text
    clock.advance(61.0)  # both sessions idle past command_timeout
    assert value(metrics, metrics.timeouts, connector="submission") == 2
    assert value(metrics, metrics.connections, connector="submission") == 2


def test_filter_verdicts_are_counted() -> None:
    from exmta.model import Action

    class Refuser:
        name = "refuser"

        def on_mail(self, session, sender, params):
            return Verdict.reject(550, "5.7.1", "not from you")

    clock = Clock()
    metrics = Metrics(clock)
    chain = FilterChain([Refuser()], clock)
    chain.verdict_observer = metrics.filter_verdict
    verdict = chain.on_mail(None, None, None).result
    assert verdict.action is Action.REJECT
    text = metrics.render().decode()
    assert 'exmta_filter_verdicts_total{action="reject",filter="refuser",phase="mail"} 1.0' in text
