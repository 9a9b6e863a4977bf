"""``exmta explain``: the reply catalogue, the command, and the tracking log's explanations."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from exmta.cli import main
from exmta.diagnose.explain import explain, parse_reply, short
from exmta.model import Outcome, RecipientResult, Reply, TrackingEventId
from exmta.observe.tracking import event_details

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "queue"))


@pytest.mark.parametrize("reply, code, vendor, words", [
    ("550 5.7.68 TenantInboundAttribution; Rejecting", "5.7.68", "Microsoft 365", "Direct Send"),
    ("550 5.7.64 TenantAttribution; Relay Access Denied SMTP", "5.7.64", "Microsoft 365", "TenantAttribution"),
    ("550 5.7.1 Unable to relay", "5.7.1", "Microsoft 365", "relay"),
    ("530 5.7.57 Client not authenticated to send mail", "5.7.57", "Microsoft 365", "authenticated"),
    ("550 5.7.606 Access denied, banned sending IP [192.0.2.1]", "5.7.606-649", "Microsoft 365", "banned"),
    ("550 5.7.649 Access denied, banned sending IP [192.0.2.1]", "5.7.606-649", "Microsoft 365", "banned"),
    ("451 4.7.500 Server busy. Please try again later", "4.7.500-699", "Microsoft 365", "throttling"),
    ("451 4.7.699 Access denied", "4.7.500-699", "Microsoft 365", "throttling"),
    ("550 5.7.708 Access denied, traffic not accepted from this IP", "5.7.708", "Microsoft 365", "IP"),
    ("550 5.7.750 Client blocked from sending from unregistered domains", "5.7.750", "Microsoft 365",
     "unregistered"),
    ("550 5.4.1 Recipient address rejected: Access denied. AS(201806281)", "5.4.1", "Microsoft 365",
     "Edge Blocking"),
    ("550 5.7.23 The message was rejected because of Sender Policy Framework violation", "5.7.23",
     "Microsoft 365", "SPF"),
    ("550 5.7.509 Access denied, sending domain example.com does not pass DMARC verification",
     "5.7.509", "Microsoft 365", "DMARC"),
    ("550 5.1.1 User unknown", "5.1.1", "RFC 3463", "mailbox"),
    ("421 4.4.2 Connection dropped", "4.4.2", "RFC 3463", "connection"),
    ("550 5.4.1 No answer from host", "5.4.1", "RFC 3463", "answer"),
    ("451 4.7.5 MTA-STS policy of example.net: certificate name mismatch", "4.7.5", "exmta", "MTA-STS"),
])
def test_catalogue(reply: str, code: str, vendor: str, words: str) -> None:
    found = explain(reply)
    assert found is not None
    assert (found.code, found.vendor) == (code, vendor)
    assert words.lower() in (found.title + found.meaning).lower()
    assert found.action and found.source


def test_unknown_detail_falls_back_to_class_and_subject() -> None:
    found = explain("550 5.9.99 something new")
    assert found is not None and found.code == "5.9.x" and "Permanent" in found.title
    assert short("550 5.9.99 something new") is None  # too vague for the tracking log
    assert explain("hello") is None


def test_parse_reply_forms() -> None:
    assert parse_reply("550 5.7.68 TenantInboundAttribution") == (550, "5.7.68", "TenantInboundAttribution")
    assert parse_reply("5.7.708") == (None, "5.7.708", "")
    assert parse_reply("550-5.7.1 first\r\n550 5.7.1 Unable to relay")[1] == "5.7.1"
    assert parse_reply("Remote Server returned '550 #5.7.68 TenantInboundAttribution'")[1] == "5.7.68"


def test_command_table_json_and_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "550 5.7.68 TenantInboundAttribution; Rejecting"]) == 0
    out = capsys.readouterr().out
    assert "5.7.68" in out and "Direct Send" in out and "techcommunity.microsoft.com" in out
    assert main(["explain", "--json", "451 4.7.650 The mail server has been temporarily rate limited"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["explanation"]["code"] == "4.7.500-699"
    assert main(["explain", "nothing here"]) == 1


def test_tracking_details_explain_defer_and_fail_only() -> None:
    tenant = RecipientResult("a@contoso.example", Outcome.FAILED,
                             Reply.make(550, "5.7.68", "TenantInboundAttribution; Rejecting"))
    fail = event_details(TrackingEventId.FAIL, 100.0, 160.0, tenant, None)
    assert "Direct Send" in fail["explanation"] and fail["latency"] == 60.0
    later = RecipientResult("a@x.example", Outcome.DEFERRED, Reply.make(451, "4.7.500", "Server busy"))
    assert "throttling" in event_details(TrackingEventId.DEFER, 1.0, 2.0, later, {"next_attempt": 3})["explanation"]
    ok = RecipientResult("a@x.example", Outcome.DELIVERED, Reply.make(250, "2.0.0", "OK"))
    assert "explanation" not in event_details(TrackingEventId.SEND, 1.0, 2.0, ok, None)


def test_scheduler_fail_event_carries_the_explanation() -> None:
    """A next hop's 5.7.68 reaches the tracking log's FAIL event with the explanation."""
    from test_scheduler import Harness

    h = Harness()
    h.submit("dev@contoso.example")
    h.turn()
    h.out.answer(outcome=Outcome.FAILED, reply=Reply.make(550, "5.7.68", "TenantInboundAttribution; Rejecting"))
    h.turn()
    fail = h.tracker.of(TrackingEventId.FAIL)[0]
    assert fail.reply.startswith("550 5.7.68") and "partner inbound connector" in fail.details["explanation"]
    h.turn()
    h.out.answer()  # the DSN to the sender
    h.turn()
    h.stop()


def test_docs_example_output(capsys: pytest.CaptureFixture[str]) -> None:
    """The example in docs/diagnose.rst prints what the doc shows."""
    import shlex

    doc = (Path(__file__).resolve().parents[2] / "docs" / "diagnose.rst").read_text()
    block = doc.split("and where that is written::\n\n", 1)[1].split("\n\n", 1)[0]
    lines = [ln[4:] for ln in block.splitlines()]
    assert lines[0].startswith("$ exmta explain ")
    assert main(shlex.split(lines[0][2:])[1:]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:len(lines) - 1] == lines[1:]
