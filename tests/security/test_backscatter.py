"""Backscatter (issue 11 item 6) and recipient validation against LDAP (issue 10 item 13).

Before: recipients of internal_relay domains, and of authoritative ones without
a recipient list, were never validated, so ``MAIL FROM:<victim>`` to a
non-existent recipient brought the victim a DSN carrying the whole original;
``NOTIFY=SUCCESS`` from an anonymous sender confirmed mailboxes.
"""
from __future__ import annotations

import smtplib
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from exmta.config.schema import AcceptedDomain, Config, ReceiveConnectorConfig
from exmta.filters import FilterBase, FilterChain
from exmta.filters.authres import SPFResult, auth_state
from exmta.model import Verdict
from exmta.receive.directory import DirectoryRecipients
from exmta.receive.policy import DefaultReceivePolicy
from exmta.smtp.server import ESMTPServerFactory
from exmta.testing.memstore import MemoryStore
from support import procs
from support import slapd as slapd_mod
from support.exmta_proc import ExmtaProcess, exmta_toml
from support.sinks import SmtpSink
from support.slapd import SlapdServer

SECRET = b"SECRET-BODY-LINE that must not travel back to a forged sender"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    assert slapd_mod.available(), "slapd is not installed: run scripts/install-test-deps.sh"
    with SlapdServer(tmp_path_factory.mktemp("ldap")) as server:
        yield server


@pytest.mark.integration
def test_rcpt_is_validated_against_the_directory_for_authoritative_and_internal_relay(
        slapd: SlapdServer, exmta_factory) -> None:
    toml = exmta_toml(relay_networks=(), extra=(
        f'[auth.corp]\nkind = "ldap"\nuri = "{slapd.uri}"\nca_file = "{slapd.ca_file}"\n'
        f'base_dn = "{slapd.base_dn}"\nbind_dn = "{slapd.bind_dn}"\nbind_password = "{slapd.bind_password}"\n'))
    toml = toml.replace("[accepted_domains]\n", '[accepted_domains]\n"legacy.example.test" = "internal_relay"\n')
    toml = toml.replace("[server]\n", '[server]\nrecipient_directory = "corp"\nrecipient_cache_ttl = "30s"\n')
    ex: ExmtaProcess = exmta_factory(toml=toml)
    with smtplib.SMTP(procs.LOOPBACK, ex.port, timeout=30) as c:
        c.ehlo("c.example")
        assert c.mail("victim@remote.example")[0] == 250
        got = {rcpt: c.rcpt(rcpt) for rcpt in (
            "alice@example.test",          # mail
            "a.example@example.test",      # proxyAddresses smtp:
            "ALICE@Example.Test",          # case does not matter
            "bob@example.test",
            "nosuch@example.test",         # authoritative, not in the directory
            "alice@legacy.example.test",   # internal_relay, a proxyAddresses value
            "nosuch@legacy.example.test",  # internal_relay, not in the directory
            "nosuch@example.test",         # again: from the cache, same answer
        )}
    codes = {rcpt: (code, text.split()[0]) for rcpt, (code, text) in got.items()}
    assert codes == {
        "alice@example.test": (250, b"2.1.5"), "a.example@example.test": (250, b"2.1.5"),
        "ALICE@Example.Test": (250, b"2.1.5"), "bob@example.test": (250, b"2.1.5"),
        "nosuch@example.test": (550, b"5.1.1"),
        "alice@legacy.example.test": (250, b"2.1.5"), "nosuch@legacy.example.test": (550, b"5.1.1"),
    }


def test_directory_answers_are_cached_for_the_ttl_and_lookups_coalesce() -> None:
    from twisted.internet.defer import Deferred

    clock = Clock()
    pending: list[tuple[str, Deferred]] = []

    def run(fn, address):  # the test plays the thread pool
        d: Deferred = Deferred()
        pending.append((address, d))
        return d

    lookup = DirectoryRecipients(lambda a: True, run, clock, ttl=60)
    results: list = []
    lookup.lookup("Alice@example.test").addCallback(results.append)
    lookup.lookup("alice@example.test").addCallback(results.append)   # same address: one search
    assert len(pending) == 1
    pending.pop()[1].callback(True)
    assert results == [True, True]
    lookup.lookup("alice@example.test").addCallback(results.append)   # cached
    assert len(pending) == 0 and results[-1] is True
    clock.advance(61)
    lookup.lookup("alice@example.test").addCallback(results.append)   # expired: asked again
    assert len(pending) == 1 and lookup.searches == 2


@pytest.mark.integration
def test_anonymous_sender_gets_headers_only_dsn_and_no_success_report(tmp_path: Path, exmta_factory,
                                                                      smtp_sink_factory) -> None:
    sink: SmtpSink = smtp_sink_factory(
        rcpt_policy=lambda address: "550 5.1.1 no such user" if address.startswith("nosuch@") else None)
    toml = exmta_toml(relay_networks=(), smarthost=sink.next_hop)
    toml = toml.replace("[accepted_domains]\n", '[accepted_domains]\n"relay.example" = "internal_relay"\n')
    ex: ExmtaProcess = exmta_factory(toml=toml)
    with smtplib.SMTP(procs.LOOPBACK, ex.port, timeout=30) as c:
        c.ehlo("c.example")
        assert c.mail("victim@remote.example", ["RET=FULL"])[0] == 250
        assert c.rcpt("nosuch@relay.example", ["NOTIFY=SUCCESS,FAILURE"])[0] == 250
        assert c.rcpt("ok@relay.example", ["NOTIFY=SUCCESS"])[0] == 250
        assert c.data(b"From: victim@remote.example\r\nSubject: probe\r\n\r\n" + SECRET + b"\r\n")[0] == 250
    [dsn] = [m for m in sink.wait_for(2, timeout=60) if m.mail_from == ""]
    assert dsn.rcpt_tos == ["victim@remote.example"]
    assert b"nosuch@relay.example" in dsn.content and b"text/rfc822-headers" in dsn.content
    assert SECRET not in dsn.content
    # nothing else will come: the queue is empty once the DSN went out
    procs.wait_until(lambda: not any((ex.data_dir / "queue" / "msg").iterdir()), 60, "an empty queue")
    reports = [m for m in sink.messages if m.mail_from == ""]
    assert len(reports) == 1 and b"ok@relay.example" not in reports[0].content


class ForgedSPF(FilterBase):
    """Plays the spf filter's verdict for the test: the MAIL FROM domain's SPF says fail."""

    name = "spf"

    def on_mail(self, session, sender, params):
        state = auth_state(session)
        state.mailfrom = SPFResult("fail", "mailfrom", "remote.example", str(sender))
        state.mailfrom_sender = str(sender)
        return Verdict.CONTINUE


def _memory_session(peer: str):
    clock = Clock()
    config = Config(hostname="mx.test", accepted_domains=(AcceptedDomain("local.test"),))
    rc = ReceiveConnectorConfig(name="default", hostname="mx.test", relay_networks=("10.0.0.0/8",))
    store = MemoryStore(clock)
    factory = ESMTPServerFactory(
        rc, DefaultReceivePolicy(config.accepted_domain, rc.relay_networks),
        FilterChain([ForgedSPF()], clock), store, clock,
        local_domain=lambda d: config.accepted_domain(d) is not None)
    addr = IPv4Address("TCP", peer, 5000)
    proto = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    proto.makeConnection(transport)
    return transport, store, proto


@pytest.mark.parametrize("peer, forged", [("198.51.100.9", True), ("10.1.2.3", False)])
def test_no_dsn_when_spf_failed_for_an_anonymous_sender(peer: str, forged: bool) -> None:
    t, store, proto = _memory_session(peer)
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<victim@remote.example> RET=FULL\r\n"
                       b"RCPT TO:<u@local.test> NOTIFY=SUCCESS,FAILURE\r\nDATA\r\n")
    proto.dataReceived(b"Subject: s\r\n\r\nbody\r\n.\r\n")
    last = t.value().split(b"\r\n")[-2]
    assert last.startswith(b"250 2.0.0 Ok: queued as ")
    env = store.envelope(last.rsplit(b" ", 1)[1].decode())
    if forged:   # anonymous and SPF fail: no DSN of any kind, and a bounce could only have headers
        assert [r.notify for r in env.recipients] == [("NEVER",)] and env.params.ret == "HDRS"
    else:        # a relay client: its DSN requests stand
        assert [r.notify for r in env.recipients] == [("SUCCESS", "FAILURE")] and env.params.ret == "FULL"
