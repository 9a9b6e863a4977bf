"""The milter filter without sockets: modifications onto the view, verdicts, settings, the header journal."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from exmta.filters.base import HeaderEdits, MessageView
from exmta.milter.client import MilterFailed, MilterSettings, Outcome
from exmta.milter.filter import MilterFilter, header_fields, parse_settings, verdict_for_reply
from exmta.milter.protocol import Reply
from exmta.model import Action, Address, Envelope, MailParams, RcptParams, Recipient, TransactionView

RAW = (b"Received: from x\r\n\tby y\r\nFrom: a@example.test\r\nSubject: one\r\nSubject: two\r\n"
       b"\r\nbody\r\n")
TXN = TransactionView(Address("a", "example.test"), MailParams(size=10),
                      ((Address("u", "example.test"), RcptParams()), (Address("v", "example.test"), RcptParams())))
SETTINGS = MilterSettings("m", "inet:127.0.0.1:1")


def flt(action="tempfail"):
    return MilterFilter("milters", [MilterSettings("m", "inet:127.0.0.1:1", default_action=action)], reactor=None)


def test_header_fields_as_milters_get_them():
    assert header_fields(MessageView(RAW).raw_headers) == [
        (b"Received", b"from x\n\tby y"), (b"From", b"a@example.test"), (b"Subject", b"one"), (b"Subject", b"two")]


def test_positional_journal_operations():
    journal = HeaderEdits()
    journal.change_header("Subject", 2, "TWO")
    journal.change_header("subject", 1, "")          # empty: removed
    journal.change_header("X-New", 3, "appended")    # no such field: appended
    journal.insert_header_at(0, "X-Top", "t")
    journal.insert_header_at(2, "X-Third", "3")
    journal.insert_header_at(99, "X-Last", "l")
    block = MessageView(RAW).raw_headers
    assert journal.apply(block) == (b"X-Top: t\r\nReceived: from x\r\n\tby y\r\nX-Third: 3\r\nFrom: a@example.test\r\n"
                                    b"Subject: TWO\r\nX-New: appended\r\nX-Last: l\r\n")
    with pytest.raises(ValueError):
        journal.change_header("Subject", 1, "x\r\nBcc: evil@example.test")


def test_every_modification_lands_on_the_view():
    view = MessageView(RAW)
    mods = [Reply("addheader", name="X-Folded", value="a\n\tb"), Reply("insheader", index=0, name="X-Top", value="t"),
            Reply("chgheader", index=2, name="Subject", value="new"), Reply("replbody", body=b"x\ny\n"),
            Reply("replbody", body=b"z\n"), Reply("addrcpt", address="<w@example.test>"),
            Reply("addrcpt_par", address="<n@example.test>", args=("NOTIFY=NEVER", "ORCPT=rfc822;o@x.test")),
            Reply("delrcpt", address="<U@example.test>"), Reply("quarantine", text="hold it")]
    assert flt().apply(SETTINGS, Outcome("continue", modifications=mods), TXN, view) is None
    assert view.new_body == b"x\r\ny\r\nz\r\n"
    assert view.quarantine_reason == "milter m: hold it"
    edited = view.edited_headers()
    assert edited.startswith(b"X-Top: t\r\n") and edited.endswith(b"X-Folded: a\r\n\tb\r\n")
    assert b"Subject: one\r\nSubject: new\r\n" in edited
    env = view.edit_envelope(Envelope(sender="a@example.test",
                                      recipients=[Recipient("u@example.test"), Recipient("v@example.test")]))
    assert [(r.address, r.notify, r.orcpt) for r in env.recipients] == [
        ("v@example.test", None, None), ("w@example.test", None, None),
        ("n@example.test", ("NEVER",), "rfc822;o@x.test")]


def test_a_bad_modification_applies_nothing():
    view = MessageView(RAW)
    mods = [Reply("addheader", name="X-Ok", value="fine"), Reply("addheader", name="X-Evil", value="a\nBcc: b@c")]
    with pytest.raises(MilterFailed, match="modification refused"):
        flt().apply(SETTINGS, Outcome("continue", modifications=mods), TXN, view)
    assert not view.edits and view.new_body is None and view.recipient_edits == []
    with pytest.raises(MilterFailed):
        flt().apply(SETTINGS, Outcome("continue", modifications=[Reply("addrcpt", address="a b@c")]), TXN, view)
    assert view.recipient_edits == []


def test_verdicts():
    f = flt()
    view = MessageView(RAW)
    assert f.apply(SETTINGS, Outcome("discard"), TXN, view).action is Action.DISCARD
    v = f.apply(SETTINGS, Outcome("reject"), TXN, view)
    assert (v.action, v.reply.code, v.reply.status) == (Action.REJECT, 550, "5.7.1")
    v = f.apply(SETTINGS, Outcome("tempfail"), TXN, view)
    assert (v.action, v.reply.code, v.reply.status) == (Action.TEMPFAIL, 451, "4.7.1")
    v = f.apply(SETTINGS, Outcome("reject", "554 5.7.0 Virus found"), TXN, view)
    assert (v.reply.code, v.reply.status, v.reply.text) == (554, "5.7.0", "Virus found")
    both = [Reply("delrcpt", address="<u@example.test>"), Reply("delrcpt", address="<v@example.test>")]
    assert f.apply(SETTINGS, Outcome("continue", modifications=both), TXN, view).action is Action.DISCARD


@pytest.mark.parametrize("text, code, status, lines", [
    ("550 5.7.1 No", 550, "5.7.1", ("No",)),
    ("451 4.3.0 Busy", 451, "4.3.0", ("Busy",)),
    ("550 No status", 550, "5.7.1", ("No status",)),
    ("450 5.1.1 mismatched class", 450, "4.7.1", ("mismatched class",)),
    ("550-5.7.1 first\r\n550 5.7.1 second", 550, "5.7.1", ("first", "second")),
])
def test_reply_codes(text, code, status, lines):
    v = verdict_for_reply(text)
    assert (v.reply.code, v.reply.status, v.reply.lines) == (code, status, lines)
    assert v.action is (Action.REJECT if code >= 500 else Action.TEMPFAIL)


@pytest.mark.parametrize("action, expected", [("tempfail", (Action.TEMPFAIL, 451, "4.7.1")),
                                              ("reject", (Action.REJECT, 550, "5.7.1")),
                                              ("accept", None), ("quarantine", None)])
def test_default_actions(action, expected):
    f = flt(action)
    view = MessageView(RAW)
    v = f.default_action(f.milters[0], view, "no reply")
    assert (None if v is None else (v.action, v.reply.code, v.reply.status)) == expected
    assert (view.quarantine_reason is not None) == (action == "quarantine")


def test_settings():
    [s] = parse_settings("x", {"milters": [{"name": "dkim", "socket": "unix:/run/opendkim.sock",
                                            "connect_timeout": "5s", "command_timeout": 10, "content_timeout": "2m",
                                            "default_action": "accept",
                                            "macros": {"connect": ["j", "{client_addr}"], "eom": "i {msg_id}"}}]})
    assert (s.connect_timeout, s.command_timeout, s.content_timeout, s.default_action) == (5.0, 10.0, 120.0, "accept")
    assert s.macros["connect"] == ("j", "{client_addr}") and s.macros["eom"] == ("i", "{msg_id}")
    assert "{mail_addr}" in s.macros["mail"]  # stages not configured keep the defaults


@pytest.mark.parametrize("config, why", [
    ({}, "milters must be a non-empty list"),
    ({"milters": []}, "milters must be a non-empty list"),
    ({"milters": [{"socket": "inet:127.0.0.1:1"}], "colour": 1}, "unknown key(s) colour"),
    ({"milters": [{"socket": "inet:127.0.0.1:1", "colour": 1}]}, "milters[0]: unknown key(s) colour"),
    ({"milters": [{}]}, "milters[0].socket is required"),
    ({"milters": [{"socket": "local:/x"}]}, "socket 'local:/x'"),
    ({"milters": [{"socket": "inet:h:1", "default_action": "bounce"}]}, "default_action must be one of"),
    ({"milters": [{"socket": "inet:h:1", "command_timeout": 0}]}, "command_timeout must be a positive"),
    ({"milters": [{"socket": "inet:h:1", "connect_timeout": "soon"}]}, "duration"),
    ({"milters": [{"socket": "inet:h:1", "macros": {"quit": ["i"]}}]}, "unknown stage 'quit'"),
    ({"milters": [{"socket": "inet:h:1", "macros": {"eom": ["{bad name}"]}}]}, "macro names"),
    ({"milters": [{"socket": "inet:h:1", "name": "a"}, {"socket": "inet:h:2", "name": "a"}]}, "unique"),
])
def test_bad_settings_are_refused(config, why):
    with pytest.raises(ValueError) as info:
        parse_settings("x", config)
    assert why in str(info.value)


def test_facts_from_the_session():
    session = SimpleNamespace(peer_ip="2001:db8::1", peer_port=4000, local_ip="2001:db8::25", local_port=25,
                              connector="inbound", helo_name="client.test", auth_identity="alice",
                              tls=SimpleNamespace(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384",
                                                  peer_certificate_subject=None))
    view = MessageView(RAW)
    view.queue_id = "Q1"
    facts = MilterFilter("m", [], reactor=None, hostname="mx.test").facts(session, TXN, view)
    assert facts.family == "6" and facts.helo == "client.test" and facts.mail_args == ("SIZE=10",)
    m = facts.macros
    assert (m["j"], m["i"], m["{daemon_name}"], m["{if_addr}"], m["_"], m["{auth_authen}"], m["{tls_version}"]) == \
        ("mx.test", "Q1", "inbound", "2001:db8::25", "unknown [2001:db8::1]", "alice", "TLSv1.3")
    assert [r for r, _ in facts.recipients] == ["u@example.test", "v@example.test"]
    assert facts.rcpt_macros[1]["{rcpt_addr}"] == "v@example.test"
