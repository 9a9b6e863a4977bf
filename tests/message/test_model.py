"""The MIME model on realistic, broken and hostile messages."""
from __future__ import annotations

import email
import tracemalloc
from email import policy

import pytest
from support import mime_samples as S

from exmta.message import Limits, html_to_text, MimeMessage, apply_disclaimer, is_executable, remove_parts
from exmta.message.edit import DisclaimerRejected


def parse_back(msg: MimeMessage, edit) -> email.message.EmailMessage:
    """The edited message as the email package reads it (header ops applied the journal's way)."""
    from exmta.filters.base import HeaderEdits
    journal = HeaderEdits()
    journal.ops = list(edit.header_ops)
    data = journal.apply(msg.raw_headers) + b"\r\n" + (edit.body if edit.body is not None else msg.body)
    return email.message_from_bytes(data, policy=policy.default)


def test_headers_are_parsed_before_and_without_the_tree():
    msg = MimeMessage(S.NON_ASCII_NAMES)
    assert msg.subject == "Prüfbericht und Anhang"
    assert msg.header_values("From") == ["Jürgen Müller <juergen@example.test>"]
    assert msg._root is None  # no tree yet


def test_utf8_headers_rfc6532():
    msg = MimeMessage("Subject: Grüße aus Köln\r\nFrom: jörg@bücher.test\r\n\r\nx\r\n".encode())
    assert msg.subject == "Grüße aus Köln"
    assert msg.header_values("From") == ["jörg@bücher.test"]


def test_alternative_with_inline_image():
    msg = MimeMessage(S.ALTERNATIVE_INLINE)
    types = [p.content_type for p in msg.walk()]
    assert types == ["multipart/alternative", "text/plain", "multipart/related", "text/html", "image/png"]
    (image,) = msg.attachments()
    assert image.filename == "logo.png" and image.true_type == "image/png" and image.size == 67
    assert [p.path for p in msg.body_parts()] == ["1", "2.1"]
    assert "the figures are attached" in msg.body_text() and "<p>" not in msg.body_text()
    assert not msg.could_not_be_inspected


def test_forwarded_message_is_walked_into():
    msg = MimeMessage(S.FORWARDED)
    paths = {p.path: p for p in msg.walk()}
    assert paths["2"].content_type == "message/rfc822"
    inner = paths["2.1"]
    assert inner.header_values("Subject") == ["Facture réglée"]
    (zipped,) = msg.attachments()
    assert zipped.path == "2.1.2" and zipped.filename == "invoice.zip" and zipped.true_type == "application/zip"
    assert not msg.could_not_be_inspected


def test_rfc2231_and_rfc2047_names():
    msg = MimeMessage(S.NON_ASCII_NAMES)
    names = [(p.filename, p.extension, p.true_type) for p in msg.attachments()]
    assert names == [("Prüfbericht ä.pdf", "pdf", "application/pdf"),
                     ("résumé.docx", "docx", "application/zip")]
    assert "Grüße" in msg.body_text()


def test_calendar_invite():
    msg = MimeMessage(S.CALENDAR)
    cal = [p for p in msg.walk() if p.content_type == "text/calendar"][0]
    assert cal.headers.get_param("method") == "REQUEST"
    assert "METHOD:REQUEST" in cal.text()


def test_broken_mime_is_read_leniently():
    msg = MimeMessage(S.BROKEN)
    parts = list(msg.walk())
    assert [p.content_type for p in parts] == ["multipart/mixed", "text/plain", "text/plain",
                                                 "application/octet-stream", "text/plain"]
    assert "missing closing boundary" in parts[0].defects
    assert parts[1].text().startswith("café")
    assert "unknown charset x-unknown-charset" in parts[1].defects
    assert parts[2].text().startswith("naïve")
    assert parts[3].payload().startswith(b"Hello world")
    assert "the closing boundary never comes" in parts[4].text()
    assert not msg.could_not_be_inspected


def test_missing_boundary_parameter_is_a_defect_not_a_crash():
    msg = MimeMessage(b"Subject: x\r\nContent-Type: multipart/mixed\r\n\r\nbody\r\n")
    assert msg.root.children == [] and "multipart without a boundary" in msg.root.defects


def test_executable_true_type_beats_the_name():
    exe = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + bytes(200)
    msg = MimeMessage(S.with_attachment(exe, "holiday.jpg", "image/jpeg"))
    (att,) = msg.attachments()
    assert att.content_type == "image/jpeg" and att.true_type == "application/x-dosexec"
    assert is_executable(att)


# ---------------------------------------------------------------- limits


def peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / (1 << 20)
    finally:
        tracemalloc.stop()


def test_thousand_nested_multiparts_stop_at_max_depth():
    raw = S.nested_multiparts(1000)
    msg = MimeMessage(raw)
    assert peak_mib(lambda: msg.could_not_be_inspected) < 16
    assert msg.could_not_be_inspected and msg.problems == ["max_depth 30"]


def test_hundred_thousand_parts_stop_at_max_parts():
    raw = S.many_parts(100_000)
    msg = MimeMessage(raw)
    assert peak_mib(lambda: msg.could_not_be_inspected) < 32
    assert msg.problems == ["max_parts 2000"]
    assert len(msg.root.children) == 1999


@pytest.fixture(scope="module")
def gigabyte_zip() -> bytes:
    return S.zip_bomb(1 << 30)


def test_gigabyte_archive_stops_at_the_expansion_ratio(gigabyte_zip):
    msg = MimeMessage(S.with_attachment(gigabyte_zip, "report.zip", "application/zip"))
    assert peak_mib(lambda: msg.could_not_be_inspected) < 64
    assert len(msg.problems) == 1 and "max_archive_ratio" in msg.problems[0]


def test_gigabyte_archive_stops_at_the_size_limit_too(gigabyte_zip):
    msg = MimeMessage(S.with_attachment(gigabyte_zip, "report.zip"),
                      Limits(max_archive_ratio=1e9, max_archive_size=100 << 20))
    assert msg.could_not_be_inspected and "max_archive_size" in msg.problems[0]


def test_archive_members_are_sniffed_without_inflating_them(gigabyte_zip):
    msg = MimeMessage(S.with_attachment(gigabyte_zip, "report.zip"),
                      Limits(max_archive_ratio=1e9, max_archive_size=2 << 30))
    assert peak_mib(lambda: msg.inspect()) < 64
    (att,) = msg.attachments()
    assert msg.problems == [] and att.archive.members == [("zeros.bin", "application/octet-stream")]


def test_decoded_size_limit():
    msg = MimeMessage(S.with_attachment(bytes(300_000), "big.bin"), Limits(max_decoded_size=100_000))
    assert msg.could_not_be_inspected and msg.problems == ["max_decoded_size 100000"]


def test_time_limit_uses_the_given_clock():
    ticks = iter(range(0, 10_000, 5))
    msg = MimeMessage(S.many_parts(50), Limits(max_seconds=60), clock=lambda: float(next(ticks)))
    assert msg.could_not_be_inspected and msg.problems == ["max_seconds 60"]


def test_unreadable_archive_could_not_be_inspected():
    msg = MimeMessage(S.with_attachment(b"PK\x03\x04 this is not a zip", "a.zip", "application/zip"))
    assert msg.could_not_be_inspected and "unreadable archive" in msg.problems[0]


def test_limits_from_toml_table():
    assert Limits.from_mapping({"max_depth": 5}).max_depth == 5
    with pytest.raises(ValueError, match="unknown limit"):
        Limits.from_mapping({"depth": 5})
    with pytest.raises(ValueError, match="max_parts"):
        Limits.from_mapping({"max_parts": -1})


# ---------------------------------------------------------------- body edits


def visible(text: str, ctype: str) -> str:
    return html_to_text(text) if ctype == "text/html" else text


@pytest.mark.parametrize("name", sorted(S.REALISTIC))
def test_disclaimer_result_parses_and_keeps_the_original_text(name):
    raw = S.REALISTIC[name]
    msg = MimeMessage(raw)
    before = email.message_from_bytes(raw, policy=policy.default)
    edit = apply_disclaimer(msg, text="Sent from outside Example Corp.",
                            html_text="<p>Sent from <b>outside</b> Example Corp.</p>")
    after = parse_back(msg, edit)
    assert [type(d) for d in after.defects] == [type(d) for d in before.defects]  # no new defect
    texts_after = "\n".join(visible(p.get_payload(decode=True).decode("utf-8", "replace"), p.get_content_type())
                            for p in after.walk() if p.get_content_maintype() == "text")
    assert "Sent from outside Example Corp." in texts_after
    for part in before.walk():
        if part.get_content_type() in ("text/plain", "text/html") and not part.is_attachment():
            original = visible(part.get_payload(decode=True).decode("utf-8", "replace"), part.get_content_type())
            assert original.strip().splitlines()[0] in texts_after


def test_disclaimer_goes_into_both_alternatives():
    msg = MimeMessage(S.ALTERNATIVE_INLINE)
    edit = apply_disclaimer(msg, text="DISCLAIMER", html_text="<p>DISCLAIMER-HTML</p>")
    after = parse_back(msg, edit)
    assert after.get_body(("plain",)).get_content().rstrip().endswith("DISCLAIMER")
    html_part = after.get_body(("html",)).get_content()
    assert html_part.index("DISCLAIMER-HTML") < html_part.index("</body>")
    # the inline image is byte for byte the same
    assert S.PNG.encode() in edit.body


def test_disclaimer_prepend_to_plain_message_changes_only_the_body():
    msg = MimeMessage(S.PLAIN)
    edit = apply_disclaimer(msg, text="CAUTION: external", location="prepend")
    assert edit.header_ops == [] and edit.body.startswith(b"CAUTION: external\r\n\r\nJust a line")


def test_signed_body_wraps_and_keeps_the_signed_entity_byte_for_byte():
    msg = MimeMessage(S.SMIME_SIGNED)
    edit = apply_disclaimer(msg, text="DISCLAIMER", fallback="wrap")
    assert edit.note == "wrapped" and msg.body in edit.body
    after = parse_back(msg, edit)
    assert after.get_content_type() == "multipart/mixed"
    inner, notice = after.iter_parts()
    assert inner.get_content_type() == "multipart/signed" and notice.get_content().strip() == "DISCLAIMER"
    assert apply_disclaimer(msg, text="D", fallback="ignore").changed is False
    with pytest.raises(DisclaimerRejected):
        apply_disclaimer(msg, text="D", fallback="reject")


def test_non_ascii_disclaimer_switches_the_part_to_utf8_quoted_printable():
    msg = MimeMessage(S.PLAIN)
    edit = apply_disclaimer(msg, text="Vertraulich – nur für den Empfänger")
    assert ("replace", "Content-Transfer-Encoding", "quoted-printable") in edit.header_ops
    after = parse_back(msg, edit)
    assert "nur für den Empfänger" in after.get_content() and "Just a line of text." in after.get_content()


def test_attachment_removed_with_a_notice():
    msg = MimeMessage(S.NON_ASCII_NAMES)
    pdf = msg.attachments()[0]
    edit = remove_parts(msg, [pdf], "The attachment {name} was removed by policy.")
    after = parse_back(msg, edit)
    kinds = [p.get_content_type() for p in after.walk()]
    assert kinds == ["multipart/mixed", "text/plain", "text/plain", "application/octet-stream"]
    notice = list(after.walk())[2].get_content()
    assert notice.strip() == "The attachment Prüfbericht ä.pdf was removed by policy."
    assert after.get_body(("plain",)).get_content().strip() == "Grüße"
    assert not after.defects
