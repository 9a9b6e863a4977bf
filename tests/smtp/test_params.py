"""exmta.smtp.params: RFC 5321 paths, MAIL/RCPT parameters, xtext."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exmta.model import Address, Body, MailParams, NULL_ADDRESS, RcptParams
from exmta.smtp import replies
from exmta.smtp.params import ParamError, parse_mail, parse_rcpt, xtext_decode, xtext_encode


def mail_error(arg: str, **kw) -> str:
    with pytest.raises(ParamError) as info:
        parse_mail(arg, **kw)
    return str(info.value.reply)


def rcpt_error(arg: str, **kw) -> str:
    with pytest.raises(ParamError) as info:
        parse_rcpt(arg, **kw)
    return str(info.value.reply)


# ------------------------------------------------------------ paths


@pytest.mark.parametrize("arg, local, domain", [
    ("FROM:<a@example.test>", "a", "example.test"),
    ("from:<a.b+tag@Example.TEST>", "a.b+tag", "Example.TEST"),
    ("FROM: <a@example.test>", "a", "example.test"),           # space after the colon
    ("FROM:a@example.test", "a", "example.test"),              # no brackets (lenient)
    ('FROM:<"john doe"@example.test>', '"john doe"', "example.test"),
    ('FROM:<"a\\"b"@example.test>', '"a\\"b"', "example.test"),
    ("FROM:<a@[192.0.2.1]>", "a", "[192.0.2.1]"),
    ("FROM:<a@[IPv6:2001:db8::1]>", "a", "[IPv6:2001:db8::1]"),
    ("FROM:<@relay.test,@other.test:a@example.test>", "a", "example.test"),  # source route dropped
    ("FROM:<a@example.test.>", "a", "example.test."),  # trailing dot: for the policy to judge
])
def test_sender_paths(arg, local, domain):
    sender, params = parse_mail(arg)
    assert sender == Address(local, domain)
    assert params == MailParams()


def test_null_sender():
    assert parse_mail("FROM:<>") == (NULL_ADDRESS, MailParams())
    assert parse_mail("FROM:<> BODY=8BITMIME")[0].is_null


@pytest.mark.parametrize("arg, reply", [
    ("FROM:<a@example.test", replies.BAD_SENDER_SYNTAX),
    ('FROM:<"a@example.test>', replies.BAD_SENDER_SYNTAX),
    ("FROM:<a@[192.0.2.1>", replies.BAD_SENDER_SYNTAX),
    ("FROM:<a@[300.0.0.1]>", replies.BAD_SENDER_SYNTAX),
    ("FROM:<a@-bad.test>", replies.BAD_SENDER_SYNTAX),
    ("FROM:<a@exa mple.test>", replies.BAD_SENDER_SYNTAX),
    ("FROM:<a>", replies.BAD_SENDER_SYNTAX),
    ("FROM:<@x.test a@b.test>", replies.BAD_SENDER_SYNTAX),
    ("FROM:<a@b.test>junk", replies.BAD_SENDER_SYNTAX),
    ("FROM:", replies.MAIL_SYNTAX),
    ("TO:<a@b.test>", replies.MAIL_SYNTAX),
    ("FROM:<a@" + "x" * 64 + ".test>", replies.BAD_SENDER_SYNTAX),  # label over 63
])
def test_bad_sender_paths(arg, reply):
    assert mail_error(arg) == str(reply)


def test_recipient_path_errors_use_5_1_3():
    assert rcpt_error("TO:<a@b.test") == "501 5.1.3 Bad recipient address syntax"
    assert rcpt_error('TO:<"a@b.test>') == "501 5.1.3 Bad recipient address syntax"
    assert rcpt_error("TO:<>") == "501 5.1.3 Bad recipient address syntax"
    assert rcpt_error("TO:<someone>") == "501 5.1.3 Bad recipient address syntax"


def test_bare_postmaster_recipient():
    assert parse_rcpt("TO:<Postmaster>") == (Address("Postmaster", ""), RcptParams())
    assert parse_rcpt("TO:<postmaster@example.test>")[0] == Address("postmaster", "example.test")


def test_source_route_in_rcpt_is_stripped():
    assert parse_rcpt("TO:<@hop1.test,@hop2.test:user@final.test>")[0] == Address("user", "final.test")


def test_smtputf8_addresses_need_smtputf8():
    assert mail_error("FROM:<jöhn@example.test>") == str(replies.NEED_SMTPUTF8)
    sender, params = parse_mail("FROM:<jöhn@exämple.test> SMTPUTF8")
    assert sender == Address("jöhn", "exämple.test") and params.smtputf8
    assert rcpt_error("TO:<ü@example.test>") == str(replies.NEED_SMTPUTF8)
    assert parse_rcpt("TO:<ü@example.test>", smtputf8=True)[0] == Address("ü", "example.test")


def test_smtputf8_is_not_available_after_helo():
    assert mail_error("FROM:<jöhn@example.test> SMTPUTF8", esmtp=False) == str(replies.NEED_SMTPUTF8)


def test_path_length_limit():
    long_local = "a" * 250
    assert mail_error(f"FROM:<{long_local}@example.test>") == str(replies.BAD_SENDER_SYNTAX)


# ------------------------------------------------------------ MAIL parameters


def test_all_mail_parameters():
    sender, params = parse_mail(
        "FROM:<a@b.test> SIZE=12345 BODY=8bitmime SMTPUTF8 RET=hdrs ENVID=QQ+2B123 AUTH=x+40y.test"
    )
    assert params == MailParams(
        size=12345, body=Body.EIGHT_BIT, smtputf8=True, ret="HDRS", envid="QQ+123", auth="x@y.test",
    )


def test_auth_null_and_binarymime():
    params = parse_mail("FROM:<a@b.test> AUTH=<> BODY=BINARYMIME")[1]
    assert params.auth == "<>" and params.body is Body.BINARY
    assert mail_error("FROM:<a@b.test> BODY=BINARYMIME", binarymime=False) == str(replies.UNKNOWN_PARAMETER)


@pytest.mark.parametrize("arg, reply", [
    ("FROM:<a@b.test> NONSENSE=1", replies.UNKNOWN_PARAMETER),
    ("FROM:<a@b.test> BODY=9BIT", replies.UNKNOWN_PARAMETER),
    ("FROM:<a@b.test> SIZE=1 size=2", replies.DUPLICATE_PARAMETER),
    ("FROM:<a@b.test> SIZE=abc", replies.SYNTAX_ERROR),
    ("FROM:<a@b.test> SIZE=" + "9" * 21, replies.SYNTAX_ERROR),
    ("FROM:<a@b.test> SIZE", replies.SYNTAX_ERROR),
    ("FROM:<a@b.test> SMTPUTF8=yes", replies.SYNTAX_ERROR),
    ("FROM:<a@b.test> RET=ALL", replies.SYNTAX_ERROR),
    ("FROM:<a@b.test> ENVID=" + "x" * 101, replies.SYNTAX_ERROR),
    ("FROM:<a@b.test> ENVID=bad+ZZ", replies.SYNTAX_ERROR),
    ("FROM:<a@b.test> =1", replies.SYNTAX_ERROR),
    ("FROM:<a@b.test> SIZE=", replies.SYNTAX_ERROR),
])
def test_bad_mail_parameters(arg, reply):
    assert mail_error(arg) == str(reply)


def test_unknown_parameter_is_555():
    assert mail_error("FROM:<a@x.test> SIZE=99999999999 BODY=BINARYMIME SMTPUTF8 NONSENSE=1").startswith("555 5.5.4")


def test_no_parameters_after_helo():
    assert mail_error("FROM:<a@b.test> SIZE=10", esmtp=False) == str(replies.UNKNOWN_PARAMETER)
    assert parse_mail("FROM:<a@b.test>", esmtp=False)[0] == Address("a", "b.test")


def test_extra_spaces_between_parameters():
    assert parse_mail("FROM:<a@b.test>  SIZE=5   BODY=7BIT")[1] == MailParams(size=5)


# ------------------------------------------------------------ RCPT parameters


def test_rcpt_notify_and_orcpt():
    rcpt, params = parse_rcpt("TO:<c@d.test> NOTIFY=success,FAILURE ORCPT=rfc822;c+2Bx@d.test")
    assert rcpt == Address("c", "d.test")
    assert params == RcptParams(notify=("SUCCESS", "FAILURE"), orcpt="rfc822;c+x@d.test")
    assert parse_rcpt("TO:<c@d.test> NOTIFY=NEVER")[1].notify == ("NEVER",)
    assert parse_rcpt("TO:<c@d.test> ORCPT=utf-8;\\x{E9}@d.test")[1].orcpt == "utf-8;é@d.test"


@pytest.mark.parametrize("arg, reply", [
    ("TO:<c@d.test> NOTIFY=NEVER,SUCCESS", replies.SYNTAX_ERROR),
    ("TO:<c@d.test> NOTIFY=SOMETIMES", replies.SYNTAX_ERROR),
    ("TO:<c@d.test> NOTIFY=DELAY,DELAY", replies.SYNTAX_ERROR),
    ("TO:<c@d.test> ORCPT=c@d.test", replies.SYNTAX_ERROR),
    ("TO:<c@d.test> ORCPT=rfc822;", replies.SYNTAX_ERROR),
    ("TO:<c@d.test> SIZE=10", replies.UNKNOWN_PARAMETER),
    ("TO:<c@d.test> NOTIFY=NEVER NOTIFY=NEVER", replies.DUPLICATE_PARAMETER),
    ("<c@d.test>", replies.RCPT_SYNTAX),
])
def test_bad_rcpt_parameters(arg, reply):
    assert rcpt_error(arg) == str(reply)


# ------------------------------------------------------------ xtext


def test_xtext_examples():
    assert xtext_encode("a+b=c d@é") == "a+2Bb+3Dc+20d@+C3+A9"
    assert xtext_decode("a+2Bb+3Dc+20d@+C3+A9") == "a+b=c d@é"
    assert xtext_decode("lower+2b") == "lower+"
    for bad in ("a+2", "a+GG", "a=b", "a b"):
        with pytest.raises(ValueError):
            xtext_decode(bad)


@given(st.text(max_size=50))
def test_xtext_round_trip(text):
    encoded = xtext_encode(text)
    assert encoded.isascii() and " " not in encoded and "=" not in encoded
    assert xtext_decode(encoded) == text


_path_alphabet = st.sampled_from(list('<>@"\\[]:,. =+-;aZ09é\x00\t{}') + [
    "IPv6:", "FROM:", "TO:", "SIZE=", "NOTIFY=", "ORCPT=utf-8;", "ORCPT=rfc822;", "\\x{", "D800}", "FFFFFF}",
    "ENVID=", "AUTH=", "BODY=", "+FF", "+2", "SMTPUTF8",
])


@settings(max_examples=1000, deadline=None)
@given(st.lists(_path_alphabet, max_size=30).map("".join), st.booleans(), st.booleans())
def test_any_argument_parses_or_gives_a_reply(text, esmtp, smtputf8):
    for arg in ("FROM:" + text, text):
        try:
            sender, params = parse_mail(arg, esmtp=esmtp)
        except ParamError as e:
            assert 500 <= e.reply.code < 600
        else:
            assert sender.is_null or sender.domain
    for arg in ("TO:" + text, text):
        try:
            rcpt, params = parse_rcpt(arg, smtputf8=smtputf8, esmtp=esmtp)
        except ParamError as e:
            assert 500 <= e.reply.code < 600
        else:
            assert rcpt.domain or rcpt.local.lower() == "postmaster"
            assert smtputf8 or rcpt.is_ascii()


def test_xtext_with_invalid_utf8_decodes_to_replacement_characters():
    assert xtext_decode("a+FFb") == "a\ufffdb"
    assert parse_mail("FROM:<a@b.test> ENVID=x+C3")[1].envid == "x\ufffd"


@pytest.mark.parametrize("value", ["utf-8;\\x{FFFFFF}@x.test", "utf-8;\\x{D800}@x.test"])
def test_orcpt_utf8_bad_code_points(value):
    assert rcpt_error(f"TO:<c@d.test> ORCPT={value}") == str(replies.SYNTAX_ERROR)
