"""The rspamd filter's decisions with a stand-in client: rspamd's edits through the header journal, the
X-Spam headers, the SCL and its thresholds, trust, and the failure modes (never a 5xx for a failure)."""
from __future__ import annotations

from email.header import decode_header, make_header
from types import SimpleNamespace

import pytest
from twisted.internet.defer import Deferred

from exmta.filters.base import MessageView
from exmta.model import Action, Address, RcptParams
from exmta.plugins import check_filters
from exmta.spam.rspamd import RspamdUnavailable, RspamdVerdict, SymbolResult
from exmta.spam.rspamd_filter import HEADER, RspamdFilter

MESSAGE = (b"Received: from client.example.test ([192.0.2.7])\r\n\tby mx.example.test (exmta) with ESMTP id Q42;"
           b" Mon, 7 Dec 2026 10:00:00 +0000\r\n"
           b"From: a@example.test\r\nSubject: hello\r\nX-Spam-Status: No, score=-100 (forged)\r\n"
           b"X-MS-Exchange-Organization-SCL: -1\r\nX-Spam-Level: forged\r\n\r\nbody\r\n")
STRANGER = SimpleNamespace(peer_ip="198.51.100.7", helo_name="client.example.test", auth_identity=None, tls=None)
TXN = SimpleNamespace(sender=Address("a", "example.test"), recipients=[(Address("b", "example.test"), RcptParams())])


class StandIn:
    """A client answering ``verdict`` (or raising it) and remembering what it was sent."""

    def __init__(self, verdict):
        self.verdict = verdict
        self.calls = []

    async def check_stream(self, chunks, length, headers):
        data = b"".join([c async for c in chunks])
        self.calls.append((data, length, headers))
        if isinstance(self.verdict, Exception):
            raise self.verdict
        return self.verdict


def verdict(action="no action", score=0.0, required=15.0, **kw):
    return RspamdVerdict(action=action, score=score, required_score=required, **kw)


def make(answer, **config):
    options = RspamdFilter.parse("rspamd", {"socket": "tcp:127.0.0.1:11333", **config})
    for key in ("socket", "timeout", "max_concurrent"):
        options.pop(key)
    client = StandIn(answer)
    return RspamdFilter("rspamd", client, hostname="mx.example.test", **options), client


def stranger_view(data=MESSAGE):
    view = MessageView(data)
    view.edits.remove_headers_with_prefix("X-MS-Exchange-Organization-")  # the server's header firewall
    return view


def run(flt, view, session=STRANGER):
    d = Deferred.fromCoroutine(flt.on_data(session, TXN, view))
    return d.result


def fields(view, name):
    head = view.edited_headers().decode()
    return [line.split(":", 1)[1].strip() for line in head.replace("\r\n\t", " ").split("\r\n")
            if line.lower().startswith(name.lower() + ":")]


def test_spam_gets_headers_and_scl_through_the_journal():
    answer = verdict("add header", 7.0, symbols=(SymbolResult("EXMTA_TEST_SCORE", 6.0, ("6",)),
                                                 SymbolResult("RDNS_NONE", 1.0), SymbolResult("ARC_NA", 0.0)),
                     add_headers=(("X-Spam-Level", "*******", -1), ("Authentication-Results", "mx; dkim=none", 1),
                                  ("X-MS-Exchange-Organization-SCL", "-1", -1)),
                     remove_headers=(("X-Spam-Level", 0), ("X-MS-Exchange-Organization-AuthAs", 0)))
    flt, client = make(answer)
    view = stranger_view()
    assert run(flt, view).action is Action.CONTINUE
    [(data, length, headers)] = client.calls
    assert data == MESSAGE and length == len(MESSAGE)
    assert headers["IP"] == ["198.51.100.7"] and headers["Queue-Id"] == ["Q42"]
    assert headers["Rcpt"] == ["b@example.test"]
    assert fields(view, "X-MS-Exchange-Organization-SCL") == ["5"]   # the client's -1 is gone, rspamd's refused
    assert fields(view, "X-Spam-Level") == ["*******"]               # the forged one removed, rspamd's added
    assert fields(view, "X-Spam-Status") == ["Yes, score=7.00 required=15.00 action=add_header"]
    assert fields(view, "X-Spam-Score") == ["7.00"]
    assert fields(view, "X-Spam-Symbols") == ["EXMTA_TEST_SCORE(6.00), RDNS_NONE(1.00)"]
    assert view.edited_headers().startswith(b"Authentication-Results: mx; dkim=none\r\n")  # order >= 0: on top
    assert view.agent_details["rspamd"]["check"].startswith("spam-verdict: add header score=7.00/15.00 scl=5")


def test_reject_at_or_above_the_connectors_threshold():
    flt, _ = make(verdict("reject", 16.0))
    result = run(flt, stranger_view())
    assert result.action is Action.REJECT and result.reply.code == 550 and result.reply.status == "5.7.1"
    flt, _ = make(verdict("add header", 9.0), scl_reject=5, reject_text="Junk refused here")
    result = run(flt, stranger_view())
    assert result.action is Action.REJECT and "Junk refused here" in result.reply.text


def test_quarantine_between_q_and_r():
    flt, _ = make(verdict("rewrite subject", 11.0, subject="*** SPAM *** hello"), scl_quarantine=6, scl_reject=8)
    view = stranger_view()
    assert run(flt, view).action is Action.CONTINUE
    assert view.quarantine_reason.startswith("rspamd rspamd: SCL 6: rewrite subject score=11.00")
    assert fields(view, "Subject") == ["*** SPAM *** hello"]
    assert fields(view, "X-MS-Exchange-Organization-SCL") == ["6"]


def test_no_thresholds_delivers_with_scl():
    flt, _ = make(verdict("reject", 40.0), scl_reject=False)
    view = stranger_view()
    assert run(flt, view).action is Action.CONTINUE and fields(view, "X-MS-Exchange-Organization-SCL") == ["9"]


def test_subject_rewrite_encodes_non_ascii_and_can_be_off():
    flt, _ = make(verdict("rewrite subject", 9.0, subject="*** SPAM *** größe"))
    view = stranger_view()
    run(flt, view)
    [subject] = fields(view, "Subject")
    assert subject.isascii() and str(make_header(decode_header(subject))) == "*** SPAM *** größe"
    flt, _ = make(verdict("rewrite subject", 9.0, subject="*** SPAM *** hello"), rewrite_subject=False,
                  milter_headers=False, spam_headers=False)
    view = stranger_view()
    run(flt, view)
    assert fields(view, "Subject") == ["hello"] and fields(view, "X-Spam-Level") == ["forged"]
    assert fields(view, "X-Spam-Status") == ["No, score=-100 (forged)"]  # dropped only when we write ours
    assert fields(view, "X-MS-Exchange-Organization-SCL") == ["5"]  # 9 is between 6 and 15: 5 + int(2 * 3 / 9)


def test_trusted_sources_get_scl_minus_one():
    flt, client = make(verdict("reject", 99.0))
    alice = SimpleNamespace(peer_ip="198.51.100.7", helo_name="x", auth_identity="alice", tls=None)
    view = stranger_view()
    assert run(flt, view, alice).action is Action.CONTINUE and not client.calls  # trusted = "skip"
    assert fields(view, "X-MS-Exchange-Organization-SCL") == ["-1"]
    flt, client = make(verdict("reject", 99.0), trusted_networks=["198.51.100.0/24"])
    view = stranger_view()
    run(flt, view)
    assert fields(view, "X-MS-Exchange-Organization-SCL") == ["-1"] and not client.calls
    # the connector trusts the session with organisation headers (no firewall op): its own SCL stays
    flt, client = make(verdict())
    view = MessageView(MESSAGE.replace(b"SCL: -1", b"SCL: 3"))
    run(flt, view)
    assert fields(view, "X-MS-Exchange-Organization-SCL") == ["3"] and not client.calls


def test_trusted_scanned_only_refused_by_rspamds_own_reject():
    alice = SimpleNamespace(peer_ip="198.51.100.7", helo_name="x", auth_identity="alice", tls=None)
    flt, client = make(verdict("add header", 12.0), trusted="scan", scl_reject=1)
    view = stranger_view()
    assert run(flt, view, alice).action is Action.CONTINUE and client.calls
    assert client.calls[0][2]["User"] == ["alice"]
    assert fields(view, "X-MS-Exchange-Organization-SCL") == ["-1"]
    flt, _ = make(verdict("reject", 30.0), trusted="scan")
    assert run(flt, stranger_view(), alice).action is Action.REJECT


@pytest.mark.parametrize("action, config, expected", [
    ("soft reject", {}, (451, "4.7.1")),
    ("greylist", {}, None),
    ("greylist", {"on_greylist": "tempfail"}, (451, "4.7.1")),
])
def test_soft_reject_and_greylist(action, config, expected):
    flt, _ = make(verdict(action, 4.5, message="Try later please"), **config)
    result = run(flt, stranger_view())
    if expected is None:
        assert result.action is Action.CONTINUE
    else:
        assert result.action is Action.TEMPFAIL and (result.reply.code, result.reply.status) == expected


def test_scanner_failure_is_tempfail_or_a_header_never_5xx():
    flt, _ = make(RspamdUnavailable("rspamd did not answer within 15 s"))
    result = run(flt, stranger_view())
    assert result.action is Action.TEMPFAIL and result.reply.code == 451 and result.reply.status == "4.7.1"
    flt, _ = make(RspamdUnavailable("cannot connect"), on_failure="accept")
    view = stranger_view()
    assert run(flt, view).action is Action.CONTINUE
    assert fields(view, HEADER) == ["not scanned (scanner failed: cannot connect)"]
    assert fields(view, "X-MS-Exchange-Organization-SCL") == []  # no verdict, no SCL (Exchange decides)
    assert view.agent_details["rspamd"] == {"check": "scanner-failed: scanner failed: cannot connect",
                                            "action": "header"}


def test_too_large_is_not_sent():
    flt, client = make(verdict(), max_size=100)
    view = stranger_view()
    assert run(flt, view).action is Action.CONTINUE and not client.calls
    assert fields(view, HEADER) == ["not scanned (larger than 100 octets)"]


@pytest.mark.parametrize("bad, message", [
    ({"on_failure": "reject"}, "on_failure must be one of tempfail, accept"),
    ({"scl_reject": 5, "scl_quarantine": 5}, "scl_quarantine must be below scl_reject"),
    ({"scl_reject": 10}, "scl_reject must be an SCL from 0 to 9"),
    ({"socket": "http://localhost:11333"}, "socket must be a client endpoint"),
    ({"socket": "tcp:127.0.0.1"}, "is not a valid client endpoint"),
    ({"socket": "tcp:127.0.0.1:port"}, "is not a valid client endpoint"),
    ({"trusted_networks": ["10.0.0.0/33"]}, "trusted_networks"),
    ({"colour": "red"}, "unknown key(s) colour"),
    ({"reject_text": "two\nlines"}, "reject_text must be one line"),
    ({"max_size": "lots"}, "expected a size"),
])
def test_config_problems_are_named(bad, message, tmp_path):
    table = {"plugin": "rspamd", "socket": "tcp:127.0.0.1:11333", **bad}
    problems = check_filters({"spam": table}, "mx.example.test", str(tmp_path))
    assert len(problems) == 1 and problems[0].startswith("filters.spam: ") and message in problems[0]


def test_rspamd_removes_the_nth_occurrence_or_every_one():
    data = MESSAGE.replace(b"\r\n\r\nbody", b"\r\nX-Tag: one\r\nX-Tag: two\r\nX-Tag: three\r\n\r\nbody")
    flt, _ = make(verdict(remove_headers=(("X-Tag", 2), ("X-Nope", 5))))
    view = stranger_view(data)
    run(flt, view)
    assert fields(view, "X-Tag") == ["one", "three"]
    flt, _ = make(verdict(remove_headers=(("X-Tag", -1),)))
    view = stranger_view(data)
    run(flt, view)
    assert fields(view, "X-Tag") == ["one", "two"]
    flt, _ = make(verdict(remove_headers=(("X-Tag", 0),), add_headers=(("Bad Name", "x", -1), ("X-Ok", "a\r\nb", -1))))
    view = stranger_view(data)
    assert run(flt, view).action is Action.CONTINUE  # a header rspamd got wrong is skipped, not a failure
    assert fields(view, "X-Tag") == [] and fields(view, "X-Ok") == []


def test_transport_rules_see_the_scl_this_filter_wrote():
    from exmta.rules.wiring import scl_of

    flt, _ = make(verdict("add header", 7.0))
    view = stranger_view()
    run(flt, view)
    assert scl_of(view, False) == 5  # SCLOver in a transport rule (they run after the filters)
    flt, _ = make(RspamdUnavailable("down"), on_failure="accept")
    view = stranger_view()
    run(flt, view)
    assert scl_of(view, False) is None  # the client's own SCL never counts from an untrusted source


def test_skipped_by_rspamd_settings_is_not_a_verdict():
    flt, _ = make(verdict(skipped=True))
    view = stranger_view()
    assert run(flt, view).action is Action.CONTINUE
    assert fields(view, HEADER) == ["not scanned (skipped by rspamd's settings)"]
    assert fields(view, "X-MS-Exchange-Organization-SCL") == []


def test_rspamd_removals_spare_fields_other_filters_added():
    flt, _ = make(verdict(remove_headers=(("Authentication-Results", 0),)))
    view = stranger_view(MESSAGE.replace(b"Subject:", b"Authentication-Results: forged; spf=pass\r\nSubject:"))
    view.edits.add_header("Authentication-Results", "mx.example.test; spf=fail")  # e.g. the authres filter
    run(flt, view)
    assert fields(view, "Authentication-Results") == ["mx.example.test; spf=fail"]
