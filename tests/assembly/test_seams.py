"""Assembly checks every seam with verifyObject and fails clearly when a provider lacks its interface."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyClass

from exmta.assembly import AssemblyError, build_scheduler, make_receive_factory, verify_receive_factory
from exmta.auth.smtp import Authenticator
from exmta.config.load import load_config
from exmta.interfaces import (
    IAuthenticator,
    IProtocolLog,
    IQueueStore,
    IReceivePolicy,
    IRecipientLookup,
    ISendConnector,
    ISessionObserver,
    ISessionTrust,
    ITLSGate,
)
from exmta.observe.metrics import Metrics
from exmta.observe.protocol import ProtocolLog
from exmta.observe.worker_metrics import WorkerRelay
from exmta.receive.policy import DefaultReceivePolicy
from exmta.receive.recipients import RecipientValidator
from exmta.testing.memstore import MemoryStore
from exmta.tls.verify import TLSGate

CONFIG = """
[server]
hostname = "mx.example.test"
data_dir = "{data}"

[accepted_domains]
"example.test" = "authoritative"

[receive.default]
listen = ["tcp:2525:interface=127.0.0.1"]
relay_networks = ["127.0.0.0/8"]

[send.relay]
type = "smtp"
smarthosts = ["[127.0.0.1]:2600"]

[[route]]
domains = ["*"]
connector = "relay"
"""


def config(tmp_path: Path) -> Any:
    path = tmp_path / "exmta.toml"
    path.write_text(CONFIG.format(data=tmp_path / "data"))
    return load_config(str(path))


@pytest.mark.parametrize("interface, provider", [
    (IReceivePolicy, DefaultReceivePolicy), (ISessionTrust, DefaultReceivePolicy),
    (IRecipientLookup, RecipientValidator), (IAuthenticator, Authenticator), (ITLSGate, TLSGate),
    (IProtocolLog, ProtocolLog), (ISessionObserver, Metrics), (ISessionObserver, WorkerRelay),
])
def test_the_providers_declare_and_provide_their_seams(interface: Any, provider: type) -> None:
    assert verifyClass(interface, provider)


def test_a_real_receive_factory_passes(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    factory = make_receive_factory(cfg, cfg.receive[0], MemoryStore(Clock()), {}, None, Clock())
    assert verify_receive_factory(factory) is factory


class HalfAuthenticator:
    """Declares IAuthenticator but has no send-as checks."""

    def ehlo_keywords(self, proto: Any) -> list[str]:
        return []


implementer(IAuthenticator)(HalfAuthenticator)


class UndeclaredGate:
    """Has every method of ITLSGate but does not say it provides it."""

    def handshake_done(self, server: Any) -> None: ...
    def check_mail(self, server: Any) -> None: ...
    def connection_lost(self, server: Any, reason: Any) -> None: ...


def test_a_provider_missing_methods_fails_assembly_naming_the_seam(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    factory = make_receive_factory(cfg, cfg.receive[0], MemoryStore(Clock()), {}, None, Clock())
    factory.authenticator = HalfAuthenticator()
    with pytest.raises(AssemblyError) as e:
        verify_receive_factory(factory)
    message = str(e.value)
    assert message.startswith("receive.default: the authenticator")
    assert "HalfAuthenticator does not provide IAuthenticator" in message
    assert "check_mail" in message or "command" in message  # verifyObject's reason: a missing method


def test_a_provider_that_does_not_declare_its_interface_fails(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    factory = make_receive_factory(cfg, cfg.receive[0], MemoryStore(Clock()), {}, None, Clock())
    factory.tls_gate = UndeclaredGate()
    with pytest.raises(AssemblyError, match=r"receive\.default: the TLS gate: .*UndeclaredGate does not provide "
                                            r"ITLSGate"):
        verify_receive_factory(factory)


def test_a_wrong_session_observer_fails_when_attached(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    factory = make_receive_factory(cfg, cfg.receive[0], MemoryStore(Clock()), {}, None, Clock())
    factory.session_observer = object()
    with pytest.raises(AssemblyError, match="the session observer: builtins.object does not provide ISessionObserver"):
        verify_receive_factory(factory)


@implementer(ISendConnector)
class Connector:
    name = "relay"

    def deliver(self, request: Any) -> defer.Deferred[Any]:
        return defer.succeed([])


class NotAConnector:
    name = "relay"


@implementer(IQueueStore)
class EmptyStore:
    """Says it is a queue store but has none of its methods."""


def test_the_scheduler_is_assembled_with_checked_seams(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    clock = Clock()
    scheduler = build_scheduler(cfg, MemoryStore(clock), {"relay": Connector()}, clock)
    assert scheduler.routes_for is not None
    with pytest.raises(AssemblyError, match=r"^send\.relay: .*NotAConnector does not provide ISendConnector"):
        build_scheduler(cfg, MemoryStore(clock), {"relay": NotAConnector()}, clock)
    with pytest.raises(AssemblyError, match=r"^the queue store: .*EmptyStore does not provide IQueueStore"):
        build_scheduler(cfg, EmptyStore(), {"relay": Connector()}, clock)


def test_the_stores_provide_the_incoming_feed() -> None:
    from exmta.interfaces import IIncomingFeed, IQueueAdmin
    from exmta.queue.postgres import PostgresStore
    from exmta.queue.spool import SpoolStore

    for store in (SpoolStore, PostgresStore):
        assert verifyClass(IQueueStore, store) and verifyClass(IQueueAdmin, store)
        assert verifyClass(IIncomingFeed, store)


def test_open_store_checks_the_store(tmp_path: Path) -> None:
    from exmta.assembly import open_store

    cfg = config(tmp_path)
    paths = {"queue": str(tmp_path / "queue"), "data": str(tmp_path / "data")}
    opened = open_store(cfg, paths, Clock(), None, None, worker=False)
    assert opened.store.root == str(tmp_path / "queue")
