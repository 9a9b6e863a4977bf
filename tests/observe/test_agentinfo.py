"""Filter verdicts in the message tracking log (StringTransport + Clock): one AGENTINFO event per verdict
other than CONTINUE, naming the filter, phase, verdict and reply; REJECT/DROP name the deciding filter;
policy refusals at RCPT are REJECT events with reason "policy"; ``exmta track --event AGENTINFO`` finds them."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from exmta import cli
from exmta.config.schema import AcceptedDomain, ReceiveConnectorConfig
from exmta.filters.base import FILTER_ERROR, FilterBase, FilterChain
from exmta.model import Action, TrackingEvent, TrackingEventId, Verdict
from exmta.observe.tracking import MultiTracker, TrackingLog
from exmta.receive.policy import DefaultReceivePolicy
from exmta.smtp.server import ESMTPServerFactory
from exmta.testing.memstore import MemoryStore

A = TrackingEventId.AGENTINFO


class RcptBlock(FilterBase):
    """Refuses one recipient at RCPT (e.g. a recipient block list agent)."""

    name = "rcptblock"

    def on_rcpt(self, session: Any, txn: Any, rcpt: Any, params: Any) -> Verdict:
        if rcpt.local == "blocked":
            return Verdict.reject(550, "5.7.1", "Recipient blocked by policy agent")
        return Verdict.CONTINUE


class DataDiscard(FilterBase):
    """Silently drops messages whose Subject says so (an asynchronous filter)."""

    name = "dropper"

    def on_data(self, session: Any, txn: Any, message: Any) -> Deferred[Verdict]:
        subject = " ".join(message.field_values("Subject"))
        return Deferred.fromCoroutine(self._decide(subject))

    async def _decide(self, subject: str) -> Verdict:
        return Verdict.discard() if "drop me" in subject else Verdict.CONTINUE


class Events:
    def __init__(self) -> None:
        self.events: list[TrackingEvent] = []

    def track(self, event: TrackingEvent) -> None:
        self.events.append(event)


def session(filters: list[Any], tracker: Any, clock: Clock, relay: tuple[str, ...] = ()) -> Any:
    accepted = AcceptedDomain("local.test")
    factory = ESMTPServerFactory(
        ReceiveConnectorConfig(name="inbound", hostname="mx.test"),
        DefaultReceivePolicy(lambda d: accepted if accepted.matches(d) else None, relay),
        FilterChain(filters, clock), MemoryStore(clock), clock, tracker=tracker,
        local_domain=lambda d: d == "local.test")
    addr = IPv4Address("TCP", "192.0.2.7", 40000)
    proto = factory.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
    proto.makeConnection(transport)
    return proto, transport


def talk(proto: Any, transport: StringTransport, *lines: bytes) -> list[str]:
    replies = []
    for line in lines:
        transport.clear()
        proto.dataReceived(line)
        replies.append(transport.value().decode())
    return replies


def clock() -> Clock:
    c = Clock()
    c.advance(1_700_000_000)
    return c


def test_filter_reject_at_rcpt_is_agentinfo_and_reject_with_the_filter_name() -> None:
    tracker, c = Events(), clock()
    proto, t = session([RcptBlock()], tracker, c)
    got = talk(proto, t, b"EHLO c.test\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<blocked@local.test>\r\n",
               b"RCPT TO:<ok@local.test>\r\n", b"DATA\r\n", b"Message-ID: <m1@example.org>\r\n\r\nhi\r\n.\r\n")
    assert got[2] == "550 5.7.1 Recipient blocked by policy agent\r\n" and got[3].startswith("250")
    proto.connectionLost(Failure(ConnectionDone()))
    agent, reject, receive = tracker.events
    assert agent.event_id is A and agent.source == "AGENT" and agent.queue_id == ""
    assert agent.details["filter"] == "rcptblock" and agent.details["phase"] == "rcpt"
    assert agent.details["verdict"] == "reject"
    assert agent.reply == "550 5.7.1 Recipient blocked by policy agent"
    assert agent.sender == "a@example.org" and agent.recipients == ("blocked@local.test",)
    assert agent.connector == "inbound" and agent.remote_host == "192.0.2.7" and agent.timestamp == 1_700_000_000
    assert reject.event_id is TrackingEventId.REJECT and reject.recipients == ("blocked@local.test",)
    assert reject.details["reason"] == "filter" and reject.details["filter"] == "rcptblock"
    assert reject.reply == agent.reply
    # the accepted recipient's message is received as usual, with no agent event of its own
    assert receive.event_id is TrackingEventId.RECEIVE and receive.recipients == ("ok@local.test",)


def test_filter_discard_at_data_is_agentinfo_then_drop_with_the_filter_name() -> None:
    tracker, c = Events(), clock()
    proto, t = session([RcptBlock(), DataDiscard()], tracker, c)
    got = talk(proto, t, b"EHLO c.test\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@local.test>\r\n",
               b"DATA\r\n", b"Subject: please drop me\r\nMessage-ID: <d1@example.org>\r\n\r\nbody\r\n.\r\n")
    assert got[-1].startswith("250 2.0.0 Ok: queued as ")  # DISCARD answers 250 and queues nothing
    assert proto.factory.store.queue_ids() == []
    agent, drop = tracker.events
    assert agent.event_id is A and drop.event_id is TrackingEventId.DROP
    assert agent.queue_id == drop.queue_id != ""  # the writer's queue id ties them (exmta track --queue-id)
    assert got[-1].rstrip().endswith(agent.queue_id)
    assert agent.details == {"session_id": proto._sid, "filter": "dropper", "phase": "data", "verdict": "discard"}
    assert agent.reply is None and agent.message_id == "<d1@example.org>" and agent.size > 0
    assert agent.recipients == ("b@local.test",)
    assert drop.details["reason"] == "filter" and drop.details["filter"] == "dropper"


def test_policy_refusals_at_rcpt_are_reject_events_with_reason_policy() -> None:
    tracker, c = Events(), clock()
    proto, t = session([RcptBlock()], tracker, c)
    got = talk(proto, t, b"EHLO c.test\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<x@elsewhere.test>\r\n")
    assert got[-1].startswith("554 5.7.1") or got[-1].startswith("550 5.7")  # relay denied
    [reject] = tracker.events  # a policy refusal: no AGENTINFO (no filter ran)
    assert reject.event_id is TrackingEventId.REJECT and reject.details["reason"] == "policy"
    assert "filter" not in reject.details and reject.recipients == ("x@elsewhere.test",)
    assert reject.reply == got[-1].rstrip("\r\n") and reject.sender == "a@example.org"


class EveryPhase(FilterBase):
    name = "tagger"

    def on_helo(self, session: Any) -> Verdict:
        return Verdict.tempfail(450, "4.7.1", "slow down") if session.helo_name == "bad" else Verdict.CONTINUE

    def on_mail(self, session: Any, sender: Any, params: Any) -> Verdict:
        return Verdict.reject(553, "5.7.1", "sender refused") if sender.local == "spam" else Verdict.CONTINUE


def test_helo_and_mail_verdicts_are_agentinfo_events() -> None:
    tracker, c = Events(), clock()
    proto, t = session([EveryPhase()], tracker, c)
    got = talk(proto, t, b"EHLO bad\r\n", b"EHLO good\r\n", b"MAIL FROM:<spam@example.org>\r\n")
    assert got[0].startswith("450") and got[2].startswith("553")
    helo, mail = tracker.events
    assert (helo.details["phase"], helo.details["verdict"], helo.reply) == ("helo", "tempfail", "450 4.7.1 slow down")
    assert (mail.details["phase"], mail.details["verdict"], mail.sender) == ("mail", "reject", "spam@example.org")
    assert {helo.details["filter"], mail.details["filter"]} == {"tagger"} and helo.recipients == ()


def test_the_chain_names_the_deciding_filter_and_metrics_still_see_it_once() -> None:
    class Broken(FilterBase):
        name = "broken"

        def on_mail(self, session: Any, sender: Any, params: Any) -> Verdict:
            raise RuntimeError("boom")

    c = clock()
    seen: list[tuple[str, str, str]] = []
    chain = FilterChain([EveryPhase(), RcptBlock()], c)
    chain.verdict_observer = lambda *a: seen.append(a)
    from exmta.model import Address, Session
    results: list[Verdict] = []
    chain.on_mail(Session("192.0.2.1"), Address("spam", "example.org"), None).addCallback(results.append)
    [v] = results
    assert v == Verdict.reject(553, "5.7.1", "sender refused")  # equality ignores the name
    assert v.filter_name == "tagger" and v.action is Action.REJECT
    assert seen == [("tagger", "mail", "reject")]
    chain.on_mail(Session("192.0.2.1"), Address("ok", "example.org"), None).addCallback(results.append)
    assert results[1] is Verdict.CONTINUE and results[1].filter_name is None
    failing = FilterChain([Broken()], c)
    failing.on_mail(Session("192.0.2.1"), Address("ok", "example.org"), None).addCallback(results.append)
    assert results[2] == FILTER_ERROR and results[2].filter_name == "broken"
    assert FILTER_ERROR.filter_name is None  # the shared constant is not changed


def test_exmta_track_finds_agentinfo_events_in_a_real_log(tmp_path: Path) -> None:
    c = clock()
    log = TrackingLog(str(tmp_path / "tracking.jsonl"), c)
    memory = Events()
    proto, t = session([RcptBlock(), DataDiscard()], MultiTracker(log, memory), c)
    talk(proto, t, b"EHLO c.test\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<blocked@local.test>\r\n",
         b"RCPT TO:<b@local.test>\r\n", b"DATA\r\n", b"Subject: drop me\r\n\r\nx\r\n.\r\n")
    proto.connectionLost(Failure(ConnectionDone()))
    log.close()
    out = io.StringIO()
    with redirect_stdout(out):
        rc = cli.main(["track", "--event", "AGENTINFO", "--format", "json", "--log", str(tmp_path / "tracking.jsonl")])
    assert rc == 0
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["filter"], r["phase"], r["verdict"]) for r in records] == [
        ("rcptblock", "rcpt", "reject"), ("dropper", "data", "discard")]
    assert all(r["event_id"] == "AGENTINFO" and r["source"] == "AGENT" for r in records)
    table = io.StringIO()
    with redirect_stdout(table):
        assert cli.main(["track", "--event", "AGENTINFO,DROP", "--log", str(tmp_path / "tracking.jsonl")]) == 0
    lines = table.getvalue().splitlines()
    assert len(lines) == 4 and "agent=rcptblock phase=rcpt verdict=reject" in lines[1]
    assert "agent=dropper phase=data verdict=discard" in lines[2] and "DROP" in lines[3]
    assert "reason=filter" in lines[3] and "agent=dropper" in lines[3]


class Tagger(FilterBase):
    """Tags every message with a header (e.g. a spam score) and lets it in."""

    name = "spamscore"

    def on_data(self, session: Any, txn: Any, message: Any) -> Verdict:
        message.edits.add_header("X-Spam-Score", "1.5")
        message.edits.remove_header("X-Old-Score")
        return Verdict.CONTINUE


class Holder(FilterBase):
    name = "dmarc"

    def on_data(self, session: Any, txn: Any, message: Any) -> Verdict:
        message.quarantine("DMARC policy of example.org is quarantine")
        return Verdict.CONTINUE


def test_header_edits_and_quarantine_are_agentinfo_events_naming_the_filter() -> None:
    tracker, c = Events(), clock()
    proto, t = session([Tagger(), RcptBlock(), Holder()], tracker, c)
    got = talk(proto, t, b"EHLO c.test\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@local.test>\r\n",
               b"DATA\r\n", b"Subject: s\r\nMessage-ID: <t1@example.org>\r\n\r\nbody\r\n.\r\n")
    assert got[-1].startswith("250 2.0.0 Ok: queued as ")
    receive, tagged, held = tracker.events
    assert receive.event_id is TrackingEventId.RECEIVE and {tagged.event_id, held.event_id} == {A}
    assert tagged.queue_id == held.queue_id == receive.queue_id and tagged.message_id == "<t1@example.org>"
    assert tagged.details == {"session_id": proto._sid, "phase": "data", "verdict": "continue",
                              "filter": "spamscore", "header_edits": 2}
    assert (held.details["filter"], held.details["verdict"]) == ("dmarc", "quarantine")
    assert held.details["reason"] == "DMARC policy of example.org is quarantine" and "header_edits" not in held.details
    assert proto.factory.store.queue_of(receive.queue_id) == "hold"
    from exmta.admin.track import format_table
    from exmta.observe.tracking import record_of
    row = format_table([record_of(tagged)]).splitlines()[1]
    assert row.endswith("agent=spamscore phase=data verdict=continue header_edits=2")
    # a message no filter touched has RECEIVE only
    tracker.events.clear()
    proto2, t2 = session([RcptBlock()], tracker, c)
    talk(proto2, t2, b"EHLO c.test\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@local.test>\r\n",
         b"DATA\r\n", b"Subject: s\r\n\r\nbody\r\n.\r\n")
    assert [e.event_id for e in tracker.events] == [TrackingEventId.RECEIVE]
