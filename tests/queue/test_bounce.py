"""make_dsn: RFC 3464 reports parsed back with the email package, field by field."""
from __future__ import annotations

import email
import email.policy
import io
from email.message import EmailMessage
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exmta.model import Body, Envelope, MailParams, Recipient, RecipientStatus, Reply
from exmta.queue.bounce import make_dsn

NOW = 1_700_003_600.0
ARRIVED = 1_700_000_000.0
ORIGINAL = (
    b"From: Alice <alice@sender.example>\r\n"
    b"To: bob@remote.example\r\n"
    b"Subject: Quarterly report\r\n"
    b"Message-ID: <orig-1@sender.example>\r\n"
    b"\r\n"
    b"The numbers are in.\r\n"
)


def envelope(*rcpts: Recipient, sender: str = "alice@sender.example", **params) -> Envelope:
    return Envelope(
        sender=sender,
        recipients=list(rcpts) or [failed_rcpt()],
        params=MailParams(**params),
        queue_id="Q1",
        received_at=ARRIVED,
        message_id="<orig-1@sender.example>",
    )


def failed_rcpt(address: str = "bob@remote.example", **kw) -> Recipient:
    defaults = dict(
        status=RecipientStatus.FAILED,
        attempts=1,
        last_reply=Reply.make(550, "5.1.1", "<bob@remote.example>: Recipient address rejected: User unknown"),
        last_attempt=NOW - 10,
    )
    defaults.update(kw)
    return Recipient(address, **defaults)


def parse(data: bytes) -> EmailMessage:
    if not data.isascii():  # RFC 6532 UTF-8 headers: the bytes parser would surrogate-escape them
        return email.message_from_string(data.decode("utf-8", "replace"), policy=email.policy.default)
    return email.message_from_bytes(data, policy=email.policy.default)


def status_blocks(msg: EmailMessage) -> list[email.message.Message]:
    part = msg.get_payload()[1]
    if part.get_content_type() == "message/delivery-status":
        return part.get_payload()
    # message/global-delivery-status is parsed as one message (headers = first block): split by hand
    [inner] = part.get_payload()
    text = "".join(f"{k}: {v}\n" for k, v in inner.items()) + "\n" + inner.get_payload()
    return [email.message_from_string(b + "\n") for b in text.replace("\r\n", "\n").strip().split("\n\n")]


def test_failed_dsn_every_field() -> None:
    rcpt = failed_rcpt(orcpt="rfc822;Bob@Remote.Example")
    env = envelope(rcpt, envid="ENV-42")
    data, dsn_env = make_dsn(env, [rcpt], "failed", "mx.exmta.example", ORIGINAL, NOW, "postmaster",
                             remote_hosts={"bob@remote.example": "mx1.remote.example[192.0.2.7]:25"})
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    msg = parse(data)
    assert b'\r\nFrom: "Mail Delivery System" <MAILER-DAEMON@mx.exmta.example>\r\n' in b"\r\n" + data
    [sender] = msg["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Mail Delivery System", "MAILER-DAEMON@mx.exmta.example")
    assert [a.addr_spec for a in msg["To"].addresses] == ["alice@sender.example"]
    assert msg["Subject"] == "Undeliverable: Quarterly report"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<orig-1@sender.example>"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert msg["Message-ID"] != "<orig-1@sender.example>" and msg["Message-ID"].endswith("@mx.exmta.example>")
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, status, original = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    text = human.get_content()
    assert "Delivery has failed to these recipients or groups:" in text
    assert "bob@remote.example" in text and "wasn't found" in text
    assert "Remote server returned '550 5.1.1 <bob@remote.example>: Recipient address rejected" in text
    assert "Generating server: mx.exmta.example" in text
    assert "postmaster@mx.exmta.example" in text

    assert status.get_content_type() == "message/delivery-status"
    per_message, per_rcpt = status_blocks(msg)
    assert per_message["Reporting-MTA"] == "dns; mx.exmta.example"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVED
    assert per_rcpt["Original-Recipient"] == "rfc822;Bob@Remote.Example"
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@remote.example"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx1.remote.example"
    assert per_rcpt["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <bob@remote.example>: Recipient address rejected: User unknown"
    )
    assert parsedate_to_datetime(per_rcpt["Last-Attempt-Date"]).timestamp() == NOW - 10
    assert per_rcpt["Will-Retry-Until"] is None

    assert original.get_content_type() == "message/rfc822"
    inner = original.get_payload()[0]
    assert inner["Subject"] == "Quarterly report"
    assert inner.get_content().strip() == "The numbers are in."

    assert dsn_env.sender == "" and dsn_env.kind == "dsn"
    assert [(r.address, r.notify) for r in dsn_env.recipients] == [("alice@sender.example", ("NEVER",))]
    assert dsn_env.message_id == msg["Message-ID"]
    assert dsn_env.size == len(data) == dsn_env.params.size
    assert dsn_env.received_at == NOW
    assert dsn_env.params.body is Body.SEVEN_BIT and not dsn_env.params.smtputf8


def test_optional_fields_absent_without_envid_orcpt_or_remote_host() -> None:
    rcpt = failed_rcpt(last_attempt=None)
    data, _ = make_dsn(envelope(rcpt), [rcpt], "failed", "mx.exmta.example", ORIGINAL, NOW)
    per_message, per_rcpt = status_blocks(parse(data))
    assert per_message["Original-Envelope-Id"] is None
    assert per_rcpt["Original-Recipient"] is None
    assert per_rcpt["Remote-MTA"] is None
    assert per_rcpt["Last-Attempt-Date"] is None


def test_ret_hdrs_returns_headers_only() -> None:
    rcpt = failed_rcpt()
    data, _ = make_dsn(envelope(rcpt, ret="HDRS"), [rcpt], "failed", "mx.exmta.example", ORIGINAL, NOW)
    third = parse(data).get_payload()[2]
    assert third.get_content_type() == "text/rfc822-headers"
    body = third.get_payload(decode=True)
    assert b"Subject: Quarterly report" in body and b"The numbers are in." not in body


def test_ret_full_explicit_returns_everything() -> None:
    rcpt = failed_rcpt()
    data, _ = make_dsn(envelope(rcpt, ret="FULL"), [rcpt], "failed", "h", ORIGINAL, NOW)
    assert parse(data).get_payload()[2].get_content_type() == "message/rfc822"
    assert data.count(b"The numbers are in.") == 1


def test_large_original_is_returned_as_headers_only() -> None:
    rcpt = failed_rcpt()
    big = ORIGINAL + b"x" * 998 + b"\r\n"
    data, _ = make_dsn(envelope(rcpt), [rcpt], "failed", "h", io.BytesIO(big), NOW, max_full_size=500)
    third = parse(data).get_payload()[2]
    assert third.get_content_type() == "text/rfc822-headers"
    assert b"x" * 100 not in data
    small, _ = make_dsn(envelope(rcpt), [rcpt], "failed", "h", io.BytesIO(big), NOW, max_full_size=5000)
    assert parse(small).get_payload()[2].get_content_type() == "message/rfc822"


def test_default_limit_is_one_mebibyte() -> None:
    rcpt = failed_rcpt()
    big = ORIGINAL + (b"y" * 998 + b"\r\n") * 1100  # just over 1 MiB
    data, _ = make_dsn(envelope(rcpt), [rcpt], "failed", "h", io.BytesIO(big), NOW)
    assert parse(data).get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert len(data) < 10_000


def test_header_block_without_end_is_bounded() -> None:
    rcpt = failed_rcpt()
    endless = b"Subject: x\r\n" + b"X-Junk: " + b"j" * 990 + b"\r\n"
    endless = endless * 2000  # 2 MB of headers, no empty line
    data, _ = make_dsn(envelope(rcpt), [rcpt], "failed", "h", io.BytesIO(endless), NOW)
    third = parse(data).get_payload()[2]
    assert third.get_content_type() == "text/rfc822-headers"
    returned = third.get_payload(decode=True)
    assert 200_000 < len(returned) <= 256 * 1024 and returned.endswith(b"\r\n")


def test_binarymime_original_is_not_nested() -> None:
    rcpt = failed_rcpt()
    data, _ = make_dsn(envelope(rcpt, body=Body.BINARY), [rcpt], "failed", "h", ORIGINAL, NOW)
    assert parse(data).get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_delayed_report() -> None:
    rcpt = Recipient("bob@remote.example", attempts=3, last_reply=Reply.make(451, "4.4.1", "Connection timed out"),
                     last_attempt=NOW)
    data, _ = make_dsn(envelope(rcpt), [rcpt], "delayed", "mx.exmta.example", ORIGINAL, NOW,
                       retry_until=ARRIVED + 5 * 86400)
    msg = parse(data)
    assert msg["Subject"] == "Delivery delayed: Quarterly report"
    _, per_rcpt = status_blocks(msg)
    assert per_rcpt["Action"] == "delayed"
    assert per_rcpt["Status"] == "4.4.1"
    assert parsedate_to_datetime(per_rcpt["Will-Retry-Until"]).timestamp() == ARRIVED + 5 * 86400
    assert "Delivery is delayed" in msg.get_payload()[0].get_content()
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_delivered_report_and_expired_status() -> None:
    ok = Recipient("u@local.example", status=RecipientStatus.DELIVERED, last_reply=Reply.make(250, "2.0.0", "Saved"))
    data, _ = make_dsn(envelope(ok), [ok], "delivered", "h", ORIGINAL, NOW)
    _, block = status_blocks(parse(data))
    assert block["Action"] == "delivered" and block["Status"] == "2.0.0"
    expired = Recipient("b@r.example", status=RecipientStatus.EXPIRED, last_reply=Reply.make(421, "4.4.2", "Bye"))
    data, _ = make_dsn(envelope(expired), [expired], "failed", "h", ORIGINAL, NOW)
    msg = parse(data)
    _, block = status_blocks(msg)
    assert block["Status"] == "5.4.7" and block["Diagnostic-Code"] == "smtp; 421 4.4.2 Bye"
    assert "QUEUE.Expired" in msg.get_payload()[0].get_content()


def test_several_recipients_one_block_each() -> None:
    a = failed_rcpt("a@remote.example")
    b = failed_rcpt("b@remote.example", last_reply=Reply.make(552, "5.2.2", "Mailbox full"))
    data, _ = make_dsn(envelope(a, b), [a, b], "failed", "h", ORIGINAL, NOW)
    blocks = status_blocks(parse(data))
    assert [blk["Final-Recipient"] for blk in blocks[1:]] == ["rfc822; a@remote.example", "rfc822; b@remote.example"]
    assert [blk["Status"] for blk in blocks[1:]] == ["5.1.1", "5.2.2"]


def test_smtputf8_original_gives_a_global_report() -> None:
    rcpt = failed_rcpt("jörg@bücher.example", orcpt="utf-8;jörg@bücher.example")
    env = envelope(rcpt, sender="zoë@sender.example", smtputf8=True, body=Body.EIGHT_BIT)
    original = "Subject: Grüße\r\nFrom: zoë@sender.example\r\n\r\nHallo\r\n".encode()
    data, dsn_env = make_dsn(env, [rcpt], "failed", "h", original, NOW)
    msg = parse(data)
    assert [a.addr_spec for a in msg["To"].addresses] == ["zoë@sender.example"]
    assert msg["Subject"] == "Undeliverable: Grüße"
    assert msg.get_payload()[1].get_content_type() == "message/global-delivery-status"
    _, block = status_blocks(msg)
    assert block["Final-Recipient"] == "utf-8; jörg@bücher.example"
    assert block["Original-Recipient"] == "utf-8;jörg@bücher.example"
    assert msg.get_payload()[2].get_content_type() == "message/global"
    assert "jörg@bücher.example" in msg.get_payload()[0].get_content()
    assert dsn_env.params.smtputf8 and dsn_env.params.body is Body.EIGHT_BIT
    assert [r.address for r in dsn_env.recipients] == ["zoë@sender.example"]


def test_encoded_subject_and_lf_original() -> None:
    rcpt = failed_rcpt()
    original = b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\nFrom: a@b.example\n\nbody\n"
    data, dsn_env = make_dsn(envelope(rcpt), [rcpt], "failed", "h", original, NOW)
    assert data.isascii() and dsn_env.params.body is Body.SEVEN_BIT
    assert b"\n" not in data.replace(b"\r\n", b"")
    msg = parse(data)
    assert msg["Subject"] == "Undeliverable: Grüße"
    assert msg.get_payload()[2].get_payload()[0]["From"] == "a@b.example"


def test_long_diagnostic_is_cut_and_lines_stay_short() -> None:
    rcpt = failed_rcpt(last_reply=Reply.make(550, "5.7.1", *(["policy " * 60] * 5)))
    data, _ = make_dsn(envelope(rcpt), [rcpt], "failed", "h", ORIGINAL, NOW)
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    _, block = status_blocks(parse(data))
    assert block["Diagnostic-Code"].startswith("smtp; 550 5.7.1 policy") and block["Diagnostic-Code"].endswith("...")


def test_ascii_report_stays_seven_bit() -> None:
    rcpt = failed_rcpt(last_reply=Reply.make(550, "5.7.1", "Zurückgewiesen"))
    data, dsn_env = make_dsn(envelope(rcpt, envid="ä1"), [rcpt], "failed", "h", ORIGINAL, NOW)
    status_part = data.split(b"Content-Type: message/delivery-status\r\n\r\n")[1].split(b"\r\n--")[0]
    assert status_part.isascii()
    per_message, block = status_blocks(parse(data))
    assert block["Diagnostic-Code"] == "smtp; 550 5.7.1 Zur?ckgewiesen"
    assert per_message["Original-Envelope-Id"] == "?1"
    # the readable part keeps the text, quoted-printable
    assert "Zurückgewiesen" in parse(data).get_payload()[0].get_content()
    assert dsn_env.params.body is Body.SEVEN_BIT and data.isascii()


def test_original_without_subject() -> None:
    rcpt = failed_rcpt()
    data, _ = make_dsn(envelope(rcpt), [rcpt], "failed", "h", b"From: a@b.example\r\n\r\nx\r\n", NOW)
    assert parse(data)["Subject"] == "Undeliverable"


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "bounced"}, "kind"),
    ({"recipients": []}, "at least one"),
    ({"sender": ""}, "null sender"),
])
def test_refuses_impossible_reports(kwargs: dict, match: str) -> None:
    rcpt = failed_rcpt()
    env = envelope(rcpt, sender=kwargs.get("sender", "alice@sender.example"))
    with pytest.raises(ValueError, match=match):
        make_dsn(env, kwargs.get("recipients", [rcpt]), kwargs.get("kind", "failed"), "h", ORIGINAL, NOW)


# ---------------------------------------------------------------- property: always well-formed

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
LOCAL = st.text(st.sampled_from("abcxyzäöü._-+"), min_size=1, max_size=20)


@settings(max_examples=60, deadline=None)
@given(
    reply_text=st.lists(TEXT, min_size=1, max_size=3),
    local=LOCAL,
    subject=TEXT,
    envid=st.none() | TEXT,
    kind=st.sampled_from(["failed", "delayed", "delivered"]),
    ret=st.sampled_from([None, "FULL", "HDRS"]),
    body=st.binary(max_size=2000),
)
def test_any_input_gives_a_well_formed_report(reply_text, local, subject, envid, kind, ret, body) -> None:
    rcpt = failed_rcpt(f"{local}@remote.example", last_reply=Reply.make(550, "5.0.0", *reply_text))
    env = envelope(rcpt, envid=envid, ret=ret, smtputf8=not local.isascii())
    header = "Subject: " + " ".join(subject.split())
    original = header.encode("utf-8") + b"\r\n\r\n" + body
    data, dsn_env = make_dsn(env, [rcpt], kind, "mx.exmta.example", original, NOW)
    head = data.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 998 for line in head.split(b"\r\n"))
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    blocks = status_blocks(msg)
    assert blocks[1]["Action"] == kind
    assert blocks[1]["Status"][0] == {"failed": "5", "delayed": "4", "delivered": "2"}[kind]
    status_part = data.split(b"delivery-status\r\n\r\n")[1].split(b"\r\n--=_exmta")[0]
    assert utf8_ok(status_part, env.params.smtputf8)
    assert dsn_env.size == len(data)
    assert dsn_env.params.body.value == ("7BIT" if data.isascii() else "8BITMIME")


def utf8_ok(part: bytes, smtputf8: bool) -> bool:
    if smtputf8:
        part.decode("utf-8")
        return True
    return part.isascii()


def test_relayed_report() -> None:
    r = Recipient("r@remote.example", notify=("SUCCESS",), status=RecipientStatus.DELIVERED,
                  last_reply=Reply.make(250, "2.0.0", "Ok: queued as X"))
    data, dsn_env = make_dsn(envelope(r), [r], "relayed", "h", ORIGINAL, NOW,
                             remote_hosts={"r@remote.example": "mx.remote.example[192.0.2.1]:25"})
    msg = parse(data)
    _, block = status_blocks(msg)
    assert block["Action"] == "relayed" and block["Status"] == "2.0.0"
    assert msg["Subject"].startswith("Relayed")
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"  # never the whole message
    assert "contact your email administrator" not in msg.get_payload()[0].get_content()
