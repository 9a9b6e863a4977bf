"""The auth filters loaded from their entry points into a real ESMTPServer, with Knot for DNS.

The server runs on a StringTransport and a task.Clock; the filters run
their blocking checks inline (no thread pool in the env), the store is the
in-memory one and, for quarantine, the real spool.
"""
from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from exmta.config.schema import AcceptedDomain, Config, ReceiveConnectorConfig
from exmta.filters import FilterChain
from exmta.filters.base import HeaderEdits, MessageView
from exmta.model import Envelope, Recipient
from exmta.plugins import FilterEnv, load_filters, ordered
from exmta.queue.spool import SpoolStore
from exmta.receive.policy import DefaultReceivePolicy
from exmta.send.dkim_sign import sign_message
from exmta.smtp.server import ESMTPServerFactory
from exmta.testing.memstore import MemoryStore
from support import authzones, knot
from support.authzones import message
from support.sync import SyncPool, SyncReactor, result

pytestmark = pytest.mark.integration

NAMES = ("spf", "dkim", "arc", "dmarc", "authres")


class Server:
    def __init__(self, knot_server: knot.KnotServer, store: Any, clock: Clock, data_dir: str = ".") -> None:
        dns = {"dns_servers": [f"127.0.0.1:{knot_server.port}"], "dns_timeout": 3.0}
        specs = {n: {"plugin": n, **(dns if n != "authres" else {})} for n in NAMES}
        env = FilterEnv(reactor=clock, clock=clock, threadpool=None, hostname="mx.dest.test", data_dir=data_dir)
        filters = load_filters(specs, env)
        config = Config(hostname="mx.dest.test", accepted_domains=(AcceptedDomain("dest.test"),))
        rc = ReceiveConnectorConfig(name="default", hostname="mx.dest.test")
        self.store = store
        self.factory = ESMTPServerFactory(
            rc, DefaultReceivePolicy(config.accepted_domain, rc.relay_networks),
            FilterChain(ordered(filters, NAMES), clock), store, clock,
            local_domain=lambda d: config.accepted_domain(d) is not None,
        )

    def send(self, peer: str, sender: str, msg: bytes) -> list[bytes]:
        addr = IPv4Address("TCP", peer, 5000)
        proto = self.factory.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        proto.dataReceived(f"EHLO client.example.test\r\nMAIL FROM:<{sender}>\r\n".encode())
        if not transport.value().endswith(b"250 2.1.0 Ok\r\n"):
            return transport.value().split(b"\r\n")[:-1]
        proto.dataReceived(b"RCPT TO:<bob@dest.test>\r\nDATA\r\n")
        proto.dataReceived(msg.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        return transport.value().split(b"\r\n")[:-1]


def queued_id(lines: list[bytes]) -> str:
    assert lines[-1].startswith(b"250 2.0.0 Ok: queued as "), lines[-1]
    return lines[-1].rsplit(b" ", 1)[1].decode()


def test_pass_is_queued_with_authentication_results(knot_server: knot.KnotServer, keys: authzones.Keys) -> None:
    clock = Clock()
    s = Server(knot_server, MemoryStore(clock), clock)
    forged = b"Authentication-Results: mx.dest.test; dmarc=pass\r\n"
    qid = queued_id(s.send("192.0.2.10", "alice@example.test", sign_message(message(extra=forged), [keys.rsa])))
    content = s.store.content(qid)
    assert content.startswith(b"Authentication-Results: mx.dest.test;\r\n\tspf=pass")
    assert content.count(b"Authentication-Results:") == 1
    head = content.split(b"\r\n\r\n")[0]
    assert b"dkim=pass header.d=example.test" in head and b"dmarc=pass" in head
    assert s.store.queue_of(qid) == "incoming"


def test_dmarc_reject_at_end_of_data(knot_server: knot.KnotServer) -> None:
    clock = Clock()
    s = Server(knot_server, MemoryStore(clock), clock)
    lines = s.send("198.51.100.7", "alice@example.test", message())
    assert lines[-1].startswith(b"550 5.7.1 DMARC policy of example.test rejects this message")
    assert s.store.queue_ids() == []


def test_spf_temperror_is_451_at_mail(knot_server: knot.KnotServer) -> None:
    clock = Clock()
    s = Server(knot_server, MemoryStore(clock), clock)
    lines = s.send("192.0.2.10", "alice@tempinc.spf.test", message())
    assert lines[-1].startswith(b"451 4.7.24 SPF check of tempinc.spf.test failed temporarily")


def test_quarantine_goes_to_hold_and_is_released(knot_server: knot.KnotServer) -> None:
    clock = Clock()
    store = MemoryStore(clock)
    s = Server(knot_server, store, clock)
    qid = queued_id(s.send("198.51.100.7", "a@quar.test", message(from_="a@quar.test")))
    assert store.queue_of(qid) == "hold"
    assert store.envelope(qid).held_reason.startswith("DMARC policy of quar.test is quarantine")
    store.release(qid)
    assert store.queue_of(qid) == "incoming"


def test_spool_commit_with_held_reason_goes_to_hold(tmp_path: Any) -> None:
    clock = Clock()
    clock.advance(1_800_000_000)
    store = SpoolStore(str(tmp_path / "spool"), SyncReactor(), SyncPool(), clock)
    woken: list[str] = []
    store.add_listener(woken.append)
    w = store.open_writer()
    w.write(b"Subject: q\r\n\r\nbody\r\n")
    env = Envelope("a@quar.test", [Recipient("b@dest.test")], held_reason="DMARC quarantine")
    qid = result(store.commit(w, env))
    assert woken == [] and store.next_due() is None
    assert result(store.claim(clock.seconds(), 10)) == []
    [held] = result(store.list_messages("hold"))
    assert (held.queue_id, held.held_reason) == (qid, "DMARC quarantine")
    result(store.release(qid))
    assert woken == [qid]
    [entry] = result(store.claim(clock.seconds(), 10))
    assert entry.queue_id == qid and entry.envelope.held_reason is None


def test_message_view_quarantine_first_reason_wins() -> None:
    view = MessageView(b"Subject: x\r\n\r\nb\r\n")
    assert view.quarantine_reason is None
    view.quarantine("first\r\nreason")
    view.quarantine("second")
    assert view.quarantine_reason == "first  reason"


def test_header_edits_folded_values_and_matching_removal() -> None:
    e = HeaderEdits()
    e.insert_header("Authentication-Results", "mx.test;\r\n\tspf=pass")
    for bad in ("a\r\nb", "a\nb", "a\rb", "a\r\n ", "a\r\n\t"):
        with pytest.raises(ValueError):
            e.add_header("X", bad)
    e.remove_header_matching("Authentication-Results", r"^\s*mx\.test\s*;")
    block = (b"Authentication-Results: MX.TEST;\r\n spf=fail\r\nAuthentication-Results: other.test; spf=pass\r\n"
             b"Subject: s\r\n")
    # ops apply in order: the insert comes first, the removal then drops both claims of mx.test
    assert e.apply(block) == b"Authentication-Results: other.test; spf=pass\r\nSubject: s\r\n"
    e2 = HeaderEdits()
    e2.remove_header_matching("Authentication-Results", r"^\s*mx\.test\s*;")
    e2.insert_header("Authentication-Results", "mx.test;\r\n\tspf=pass")
    assert e2.apply(block) == (b"Authentication-Results: mx.test;\r\n\tspf=pass\r\n"
                               b"Authentication-Results: other.test; spf=pass\r\nSubject: s\r\n")
