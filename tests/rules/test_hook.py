"""Transport rules in the data path: SMTP end of data (real server, StringTransport, Clock, memory store),
pickup submission, live reload, tracking, NDRs for refused recipients, and DKIM surviving untouched mail."""
from __future__ import annotations

import email
from email import policy
from pathlib import Path

import dkim
import pytest
from support import mime_samples as S
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer, provider

from exmta.config.schema import AcceptedDomain, Config, ReceiveConnectorConfig
from exmta.filters import FilterChain
from exmta.interfaces import IMessageTracker, IRuleAction, IRuleExtension
from exmta.model import Envelope, Recipient, TrackingEventId
from exmta.receive.policy import DefaultReceivePolicy
from exmta.routing.router import StaticRouter
from exmta.rules.hook import TransportRules
from exmta.smtp.server import ESMTPServerFactory
from exmta.testing.memstore import MemoryStore

RULES = """
[[rule]]
name = "Tag external"
priority = 0
[rule.conditions]
FromScope = "NotInOrganization"
[rule.actions]
PrependSubject = "[EXTERNAL] "
ApplyHtmlDisclaimerText = "<p>This message came from outside Example.</p>"

[[rule]]
name = "Payroll is internal only"
priority = 1
[rule.conditions]
SentTo = "payroll@local.test"
FromScope = "NotInOrganization"
[rule.actions]
RejectMessageReasonText = "Payroll takes no external mail"
RejectMessageEnhancedStatusCode = "5.7.901"

[[rule]]
name = "Copy finance"
priority = 2
[rule.conditions]
SenderDomainIs = "finance.local.test"
[rule.actions]
BlindCopyTo = "compliance@local.test"

[[rule]]
name = "Big zips to hold"
priority = 3
[rule.conditions]
AttachmentExtensionMatchesWords = "zip"
[rule.actions]
Quarantine = true

[[rule]]
name = "Partner over TLS"
priority = 4
[rule.conditions]
RecipientDomainIs = "partner.test"
[rule.actions]
RouteMessageOutboundConnector = "partner-tls"
RouteMessageOutboundRequireTls = true

[[rule]]
name = "Drop test spam"
priority = 5
[rule.conditions]
SubjectContainsWords = "DROPME"
[rule.actions]
DeleteMessage = true
"""


@implementer(IMessageTracker)
class Tracker:
    def __init__(self) -> None:
        self.events: list = []

    def track(self, event) -> None:
        self.events.append(event)

    def rule_hits(self) -> list[tuple[str, str]]:
        return [(e.details["rule"], e.details["mode"]) for e in self.events
                if e.event_id is TrackingEventId.AGENTINFO and e.details.get("agent") == "TransportRule"]


class Rig:
    def __init__(self, tmp_path: Path, text: str = RULES, plugins=None) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.path = tmp_path / "rules.toml"
        self.path.write_text(text)
        config = Config(hostname="mx.test", accepted_domains=(AcceptedDomain("local.test"),
                                                              AcceptedDomain("*.local.test")))
        self.rc = ReceiveConnectorConfig(name="default", hostname="mx.test", relay_networks=("10.0.0.0/8",))
        self.store = MemoryStore(self.clock)
        self.tracker = Tracker()
        self.rules = TransportRules(
            str(self.path), self.clock, internal_domain=lambda d: config.accepted_domain(d) is not None,
            tracker=self.tracker, store=self.store, hostname="mx.test", wall_clock=lambda: 1_800_000_000.0,
            trusted=lambda session: session.peer_ip.startswith("10."), plugins=plugins)  # the relay network is internal
        self.factory = ESMTPServerFactory(
            self.rc, DefaultReceivePolicy(config.accepted_domain, self.rc.relay_networks),
            FilterChain([], self.clock), self.store, self.clock, tracker=self.tracker,
            local_domain=lambda d: config.accepted_domain(d) is not None)
        self.factory.transport_rules = self.rules

    def send(self, sender: str, rcpts: list[str], message: bytes, peer: str = "198.51.100.9",
             rcpt_params: str = "") -> bytes:
        addr = IPv4Address("TCP", peer, 5000)
        proto = self.factory.buildProtocol(addr)
        t = StringTransport(peerAddress=addr)
        proto.makeConnection(t)
        rcpt_lines = "".join(f"RCPT TO:<{r}>{rcpt_params}\r\n" for r in rcpts)
        cmds = f"EHLO c.test\r\nMAIL FROM:<{sender}>\r\n{rcpt_lines}DATA\r\n"
        proto.dataReceived(cmds.encode())
        t.clear()
        proto.dataReceived(message.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        return t.value()

    def queued(self, reply: bytes) -> str:
        assert reply.startswith(b"250 2.0.0 Ok: queued as "), reply
        return reply.split()[-1].decode()


@pytest.fixture
def rig(tmp_path):
    return Rig(tmp_path)


def test_external_mail_is_tagged_and_gets_a_disclaimer(rig):
    qid = rig.queued(rig.send("x@outside.test", ["bob@local.test"], S.ALTERNATIVE_INLINE))
    content = rig.store.content(qid)
    msg = email.message_from_bytes(content, policy=policy.default)
    assert msg["Subject"] == "[EXTERNAL] Quarterly figures"
    assert "This message came from outside Example." in msg.get_body(("plain",)).get_content()
    assert "the figures are attached" in msg.get_body(("plain",)).get_content()
    assert "<p>This message came from outside Example.</p>" in msg.get_body(("html",)).get_content()
    assert content.startswith(b"Received: from c.test")  # our trace field kept in front
    assert rig.tracker.rule_hits() == [("Tag external", "enforce")]


def test_one_recipient_refused_the_rest_delivered_and_the_sender_gets_an_ndr(rig):
    qid = rig.queued(rig.send("x@outside.test", ["payroll@local.test", "bob@local.test"], S.PLAIN))
    assert [r.address for r in rig.store.envelope(qid).recipients] == ["bob@local.test"]
    dsns = [q for q in rig.store.queue_ids() if rig.store.envelope(q).kind == "dsn"]
    assert len(dsns) == 1
    ndr = rig.store.content(dsns[0])
    assert rig.store.envelope(dsns[0]).recipients[0].address == "x@outside.test"
    assert b"payroll@local.test" in ndr and b"5.7.901" in ndr


def test_every_recipient_refused_is_a_5xx_in_the_session(rig):
    out = rig.send("x@outside.test", ["payroll@local.test"], S.PLAIN)
    assert out == b"550 5.7.901 Payroll takes no external mail\r\n"
    assert rig.store.queue_ids() == []
    assert rig.tracker.rule_hits()[-1] == ("Payroll is internal only", "enforce")
    assert any(e.event_id is TrackingEventId.REJECT for e in rig.tracker.events)


def test_bcc_quarantine_route_and_tls_reach_the_envelope(rig):
    raw = S.FORWARDED.replace(b"From: carol@example.test", b"From: carol@finance.local.test")
    qid = rig.queued(rig.send("carol@finance.local.test", ["x@partner.test"], raw, peer="10.1.1.1"))
    env = rig.store.envelope(qid)
    assert [r.address for r in env.recipients] == ["x@partner.test", "compliance@local.test"]
    assert env.held_reason == "transport rule Big zips to hold" and rig.store.queue_of(qid) == "hold"
    assert env.route_connector == "partner-tls" and env.require_tls
    assert Envelope.from_json(env.to_json()).route_connector == "partner-tls"
    router = StaticRouter([], {})
    routes = router.route(env, [r.address for r in env.recipients])
    assert {r.connector for r in routes} == {"partner-tls"}


def test_delete_accepts_and_drops(rig):
    raw = S.PLAIN.replace(b"Subject: hello", b"Subject: DROPME now")
    out = rig.send("x@outside.test", ["bob@local.test"], raw)
    assert out.startswith(b"250 2.0.0 Ok: queued as ") and rig.store.queue_ids() == []
    assert any(e.event_id is TrackingEventId.DROP for e in rig.tracker.events)


def test_untouched_message_keeps_its_dkim_signature(rig):
    from exmta.send.dkim_sign import generate_key
    private, public = generate_key("rsa-sha256", 1024)
    raw = S.FORWARDED.replace(b"From: carol@example.test", b"From: carol@finance.local.test")
    raw = raw.replace(b"application/zip", b"application/pdf").replace(b"invoice.zip", b"invoice.pdf")
    sig = dkim.sign(raw, b"s1", b"finance.local.test", private, include_headers=[b"from", b"to", b"subject"])
    signed = sig + raw
    qid = rig.queued(rig.send("carol@finance.local.test", ["bob@local.test"], signed, peer="10.1.1.1"))
    assert rig.tracker.rule_hits() == [("Copy finance", "enforce")]  # a rule ran, and acted on the envelope
    content = rig.store.content(qid)
    stored = content[content.index(b"DKIM-Signature"):]

    def dns(name, timeout=5):
        assert name == b"s1._domainkey.finance.local.test."
        return b"v=DKIM1; k=rsa; p=" + public
    assert dkim.verify(stored, dnsfunc=dns)
    assert stored == signed


def test_a_failure_inside_the_rules_is_a_451(tmp_path):
    @provider(IRuleExtension)
    class Boom:
        kind = "action"

        @staticmethod
        def build(value):
            @implementer(IRuleAction)
            class Act:
                def apply(self, context, out):
                    raise RuntimeError("bug in a rule extension")
            return Act()

    rig = Rig(tmp_path, '[[rule]]\nname = "boom"\n[rule.actions]\nBoom = true\n',
              plugins={"action": {"Boom": Boom}, "condition": {}})
    out = rig.send("x@outside.test", ["bob@local.test"], S.PLAIN)
    assert out == b"451 4.3.0 Error: temporary failure in transport rules\r\n"
    assert rig.store.queue_ids() == []


def test_live_reload_and_a_bad_file_keeps_the_old_rules(rig):
    rig.path.write_text('[[rule]]\nname = "only"\n[rule.actions]\nSetHeaderName = "X-Only"\nSetHeaderValue = "1"\n')
    rig.clock.advance(5)
    assert [r.name for r in rig.rules.current().rules] == ["only"]
    rig.path.write_text('[[rule]]\nname = "bad"\nmode = "loud"\n[rule.actions]\nNope = 1\n# changed size\n')
    rig.clock.advance(5)
    assert [r.name for r in rig.rules.current().rules] == ["only"]
    assert rig.rules.last_problems == ["rule 'bad'.mode: must be enforce, audit or audit_and_notify",
                                       "rule 'bad'.actions.Nope: unknown action (see docs/rules.rst for the list)"]
    qid = rig.queued(rig.send("x@outside.test", ["bob@local.test"], S.PLAIN))
    assert b"X-Only: 1\r\n" in rig.store.content(qid)


def test_pickup_submission_runs_the_rules_and_ndrs_a_reject(rig):
    env = Envelope(sender="x@outside.test", recipients=[Recipient("payroll@local.test")], connector="pickup")
    d = rig.rules.submit(S.PLAIN, env)  # no thread pool: runs inline
    from twisted.internet.defer import Deferred
    result: list = []
    Deferred.fromCoroutine(d).addBoth(result.append)
    assert result == [None]
    (ndr,) = rig.store.queue_ids()
    assert rig.store.envelope(ndr).kind == "dsn" and b"5.7.901" in rig.store.content(ndr)
    env = Envelope(sender="x@outside.test", recipients=[Recipient("bob@local.test")], connector="pickup")
    result = []
    Deferred.fromCoroutine(rig.rules.submit(S.PLAIN, env)).addBoth(result.append)
    qid = result[0]
    assert b"Subject: [EXTERNAL] hello" in rig.store.content(qid)


def test_the_file_is_watched_without_mail(rig):
    loop = rig.rules.watch()
    try:
        rig.path.write_text('[[rule]]\nname = "watched"\n[rule.actions]\nLogEventText = "x"\n')
        rig.clock.advance(rig.rules.reload_interval)
        assert [r.name for r in rig.rules.ruleset.rules] == ["watched"]
    finally:
        loop.stop()


def test_a_refused_recipient_with_notify_never_gets_no_ndr(rig):
    qid = rig.queued(rig.send("x@outside.test", ["payroll@local.test", "bob@local.test"], S.PLAIN,
                              rcpt_params=" NOTIFY=NEVER"))
    assert [r.address for r in rig.store.envelope(qid).recipients] == ["bob@local.test"]
    assert rig.store.queue_ids() == [qid]  # no DSN queued
