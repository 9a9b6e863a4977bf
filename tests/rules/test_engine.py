"""Rule evaluation: Exchange's predicates, exceptions, modes, dates, priorities and actions."""
from __future__ import annotations

import email
from email import policy

import pytest
from support.rulekit import ctx, rules
from support import mime_samples as S

from exmta.config.load import ConfigError


def run(text: str, raw: bytes = S.PLAIN, sender: str = "alice@example.test", *rcpts: str, **kw):
    c = ctx(raw, sender, *rcpts, **kw)
    return rules(text).evaluate(c)


def leaving(decision, raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(decision.apply_to(raw), policy=policy.default)


PREPEND_EXTERNAL = """
[[rule]]
name = "Tag external"
[rule.conditions]
FromScope = "NotInOrganization"
[rule.actions]
PrependSubject = "[EXTERNAL] "
"""


def test_from_scope_needs_an_internal_address_and_a_trusted_session():
    assert run(PREPEND_EXTERNAL, S.PLAIN, "someone@outside.test").hits[0].rule == "Tag external"
    # internal address, but an anonymous session: still outside the organisation (spoofing)
    assert run(PREPEND_EXTERNAL, S.PLAIN, "alice@example.test").hits
    assert not run(PREPEND_EXTERNAL, S.PLAIN, "alice@example.test", trusted=True).hits


def test_prepend_subject_goes_through_the_header_journal():
    d = run(PREPEND_EXTERNAL, S.PLAIN, "x@outside.test")
    assert d.header_ops == [("replace", "Subject", "[EXTERNAL] hello")] and d.body is None
    out = d.apply_to(S.PLAIN)
    assert out == S.PLAIN.replace(b"Subject: hello", b"Subject: [EXTERNAL] hello")


def test_non_ascii_prefix_is_rfc2047_encoded():
    d = run(PREPEND_EXTERNAL.replace("[EXTERNAL] ", "[EXTERN – Vorsicht] "), S.PLAIN, "x@outside.test")
    assert leaving(d, S.PLAIN)["Subject"] == "[EXTERN – Vorsicht] hello"
    assert d.header_ops[0][2].startswith("=?utf-8?")


@pytest.mark.parametrize("location, sender, header_from, hit", [
    ("envelope", "bad@spam.test", "alice@example.test", True),
    ("envelope", "alice@example.test", "bad@spam.test", False),
    ("header", "alice@example.test", "bad@spam.test", True),
    ("header", "bad@spam.test", "alice@example.test", False),
    ("header_or_envelope", "alice@example.test", "bad@spam.test", True),
    ("header_or_envelope", "bad@spam.test", "alice@example.test", True),
])
def test_sender_address_location(location, sender, header_from, hit):
    text = f"""
[[rule]]
name = "Block spam.test"
sender_address_location = "{location}"
[rule.conditions]
SenderDomainIs = "spam.test"
[rule.actions]
DeleteMessage = true
"""
    raw = S.PLAIN.replace(b"From: alice@example.test", b"From: " + header_from.encode())
    assert run(text, raw, sender).delete is hit


def test_recipient_predicates_reject_only_the_matching_recipients():
    text = """
[[rule]]
name = "Payroll is internal only"
[rule.conditions]
SentTo = "payroll@example.test"
FromScope = "NotInOrganization"
[rule.actions]
RejectMessageReasonText = "Payroll does not take external mail"
RejectMessageEnhancedStatusCode = "5.7.901"
"""
    d = run(text, S.PLAIN, "x@outside.test", "payroll@example.test", "bob@example.test")
    assert d.reject is None and list(d.rejected_recipients) == ["payroll@example.test"]
    assert str(d.rejected_recipients["payroll@example.test"]) == "550 5.7.901 Payroll does not take external mail"
    assert d.final_recipients(["payroll@example.test", "bob@example.test"]) == ["bob@example.test"]
    whole = run(text, S.PLAIN, "x@outside.test", "payroll@example.test")
    assert str(whole.reject) == "550 5.7.901 Payroll does not take external mail"


def test_exceptions_veto_and_recipient_exceptions_remove_recipients():
    text = """
[[rule]]
name = "Copy outbound"
[rule.conditions]
SentToScope = "NotInOrganization"
[rule.exceptions]
RecipientDomainIs = "partner.test"
[rule.actions]
BlindCopyTo = "archive@example.test"
"""
    assert not run(text, S.PLAIN, "a@example.test", "x@partner.test").hits
    d = run(text, S.PLAIN, "a@example.test", "x@partner.test", "y@other.test")
    assert d.hits[0].recipients == ("y@other.test",) and d.add_recipients == ["archive@example.test"]
    vetoed = text.replace('RecipientDomainIs = "partner.test"', 'SubjectContainsWords = "hello"')
    assert not run(vetoed, S.PLAIN, "a@example.test", "y@other.test").hits


def test_words_are_whole_words_and_patterns_are_regexes():
    base = """
[[rule]]
name = "r"
[rule.conditions]
{cond}
[rule.actions]
SetHeaderName = "X-Hit"
SetHeaderValue = "yes"
"""
    assert run(base.format(cond='SubjectOrBodyContainsWords = ["line of"]')).hits
    assert not run(base.format(cond='SubjectContainsWords = ["hell"]')).hits
    assert run(base.format(cond='SubjectMatchesPatterns = ["^hel+o$"]')).hits
    assert run(base.format(cond='HeaderContainsMessageHeader = "Message-ID"\nHeaderContainsWords = "plain-1"')).hits
    assert not run(base.format(cond='HeaderMatchesMessageHeader = "X-None"\nHeaderMatchesPatterns = "."')).hits
    assert run(base.format(cond='MessageSizeOver = "100 B"')).hits
    assert not run(base.format(cond='MessageSizeOver = "20 MB"')).hits
    assert run(base.format(cond='SenderIpRanges = ["192.0.2.0/24", "10.0.0.1-10.0.0.9"]'),
               client_ip="10.0.0.5").hits
    assert not run(base.format(cond='SenderIpRanges = "192.0.2.0/24"'), client_ip="198.51.100.1").hits
    assert run(base.format(cond='ReceivedOnConnector = ["submission"]'), connector="submission").hits
    assert run(base.format(cond="SenderIsAuthenticated = false")).hits
    assert run(base.format(cond="SCLOver = 5"), scl=5).hits and not run(base.format(cond="SCLOver = 5"), scl=4).hits


def test_attachment_predicates_and_removal_with_a_notice():
    text = """
[[rule]]
name = "No executables"
[rule.conditions]
AttachmentHasExecutableContent = true
[rule.actions]
RemoveAttachments = true
RemoveAttachmentsNotice = "{name} was removed: executable content."
"""
    exe = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + bytes(200)
    raw = S.with_attachment(exe, "photo.jpg", "image/jpeg")
    d = run(text, raw)
    out = leaving(d, raw)
    assert [p.get_content_type() for p in out.walk()] == ["multipart/mixed", "text/plain", "text/plain"]
    assert list(out.walk())[2].get_content().strip() == "photo.jpg was removed: executable content."
    assert not run(text, S.NON_ASCII_NAMES).hits
    ext = text.replace("AttachmentHasExecutableContent = true", 'AttachmentExtensionMatchesWords = ["pdf"]')
    d = run(ext, S.NON_ASCII_NAMES)
    names = [p.get_filename() for p in leaving(d, S.NON_ASCII_NAMES).walk()]
    assert names == [None, None, None, "résumé.docx"]  # only the PDF went
    assert run(text.replace("AttachmentHasExecutableContent = true",
                            'AttachmentTrueTypeMatches = ["image/*"]'), S.ALTERNATIVE_INLINE).hits


def test_could_not_be_inspected_is_a_condition():
    text = """
[[rule]]
name = "Hold what we cannot read"
[rule.conditions]
AttachmentProcessingLimitExceeded = true
[rule.actions]
Quarantine = true
"""
    assert run(text, S.nested_multiparts(1000)).quarantine == "transport rule Hold what we cannot read"
    assert run(text, S.PLAIN).quarantine is None


@pytest.mark.parametrize("kind, sample, hit", [
    ("Calendaring", S.CALENDAR, True), ("Calendaring", S.PLAIN, False),
    ("Signed", S.SMIME_SIGNED, True), ("Encrypted", S.SMIME_SIGNED, False),
])
def test_message_type(kind, sample, hit):
    text = f"""
[[rule]]
name = "t"
[rule.conditions]
MessageTypeMatches = "{kind}"
[rule.actions]
LogEventText = "seen"
"""
    assert bool(run(text, sample).hits) is hit


def test_modes_audit_only_records_and_audit_and_notify_adds_a_notice():
    text = PREPEND_EXTERNAL.replace('name = "Tag external"', 'name = "Tag external"\nmode = "audit"')
    d = run(text, S.PLAIN, "x@outside.test")
    assert d.hits[0].mode == "audit" and d.header_ops == [] and d.hits[0].actions == [
        "(audit) prepend subject '[EXTERNAL] '"]
    d = run(text.replace('"audit"', '"AuditAndNotify"'), S.PLAIN, "x@outside.test")
    assert d.header_ops == [("add", "X-Exmta-Rule-Test", "Tag external")]


def test_dates_enabled_priority_and_stop_processing():
    text = """
[[rule]]
name = "second"
priority = 2
[rule.actions]
SetHeaderName = "X-Second"
SetHeaderValue = "1"

[[rule]]
name = "first"
priority = 1
stop_processing = true
activation = 2027-01-01T00:00:00Z
[rule.actions]
SetHeaderName = "X-First"
SetHeaderValue = "1"

[[rule]]
name = "off"
priority = 0
enabled = false
[rule.actions]
DeleteMessage = true
"""
    before = run(text, now=1_790_000_000.0)   # 2026: "first" not active yet
    assert [h.rule for h in before.hits] == ["second"]
    after = run(text, now=1_800_000_000.0)    # 2027: "first" runs and stops the rest
    assert [h.rule for h in after.hits] == ["first"]
    expired = text.replace("activation = 2027-01-01T00:00:00Z", "expiry = 2027-01-01T00:00:00Z")
    assert [h.rule for h in run(expired, now=1_800_000_000.0).hits] == ["second"]


def test_envelope_actions():
    text = """
[[rule]]
name = "Partner over TLS"
[rule.conditions]
RecipientDomainIs = "partner.test"
[rule.actions]
RouteMessageOutboundConnector = "partner-tls"
RouteMessageOutboundRequireTls = true
AddToRecipients = "carol@example.test"
CopyTo = "dave@example.test"
SetSCL = -1
GenerateIncidentReport = "compliance@example.test"
LogEventText = "partner mail"
"""
    d = run(text, S.PLAIN, "a@example.test", "x@partner.test")
    assert d.route_connector == "partner-tls" and d.require_tls and d.scl == -1
    assert d.add_recipients == ["carol@example.test", "dave@example.test"]
    out = leaving(d, S.PLAIN)
    assert out["To"] == "bob@example.test, carol@example.test" and out["Cc"] == "dave@example.test"
    assert d.incident_reports[0][0] == "compliance@example.test"
    assert "RecipientDomainIs" in d.incident_reports[0][1] and d.events == ["partner mail"]
    redirect = run('[[rule]]\nname="r"\n[rule.actions]\nRedirectMessageTo = "legal@example.test"\n')
    assert redirect.final_recipients(["bob@partner.test"]) == ["legal@example.test"]


def test_disclaimer_action_is_not_added_twice():
    text = """
[[rule]]
name = "Disclaimer"
[rule.actions]
ApplyHtmlDisclaimerText = "<p>Example Corp confidential</p>"
ApplyHtmlDisclaimerFallbackAction = "Wrap"
"""
    d = run(text, S.ALTERNATIVE_INLINE)
    once = d.apply_to(S.ALTERNATIVE_INLINE)
    again = run(text, once)
    assert again.body is None and "disclaimer already present" in again.hits[0].actions


def test_signed_message_with_reject_fallback_is_refused():
    text = """
[[rule]]
name = "Disclaimer"
[rule.actions]
ApplyHtmlDisclaimerText = "Example Corp confidential"
ApplyHtmlDisclaimerFallbackAction = "Reject"
"""
    assert run(text, S.SMIME_SIGNED).reject.code == 550


def test_every_problem_named_with_rule_and_key():
    text = """
[[rule]]
name = "a"
mode = "sometimes"
priority = 1
[rule.conditions]
SentTo = []
Colour = "red"
HeaderContainsMessageHeader = "X-Foo"
[rule.actions]
RejectMessageEnhancedStatusCode = "5.1.1"
SetHeaderValue = "x"

[[rule]]
name = "a"
priority = 1
[rule.actions]
Explode = true
"""
    with pytest.raises(ConfigError) as e:
        rules(text)
    problems = e.value.problems
    assert "rule 'a'.mode: must be enforce, audit or audit_and_notify" in problems
    assert any(p.startswith("rule 'a'.conditions.SentTo: must be a non-empty") for p in problems)
    assert "rule 'a'.conditions.Colour: unknown condition (see docs/rules.rst for the list)" in problems
    assert "rule 'a'.conditions.HeaderContainsMessageHeader: needs HeaderContainsWords beside it" in problems
    assert any("RejectMessageEnhancedStatusCode must be 5.7.1" in p for p in problems)
    assert "rule 'a'.actions.SetHeaderValue: needs SetHeaderName beside it" in problems
    assert "rule 'a'.name: another rule has this name" in problems
    assert any("priority 1 too" in p for p in problems)
    assert "rule 'a'.actions.Explode: unknown action (see docs/rules.rst for the list)" in problems


def test_route_to_an_unknown_connector_is_a_problem():
    with pytest.raises(ConfigError, match="no send connector 'nowhere'"):
        rules('[[rule]]\nname="r"\n[rule.actions]\nRouteMessageOutboundConnector = "nowhere"\n',
              send_connector_known=lambda n: n == "outbound")


def docx(text: str) -> bytes:
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("word/document.xml", '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/'
                   f'2006/main"><w:body><w:p><w:r><w:t>{text}</w:t></w:r></w:p></w:body></w:document>')
    return buf.getvalue()


def encrypted_zip() -> bytes:
    """A ZIP whose member says it is encrypted (general purpose flag bit 0), as `zip -e` writes."""
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("secret.txt", "x" * 100)
    data = bytearray(buf.getvalue())
    data[6] |= 1                                # local file header flags
    central = data.find(b"PK\x01\x02")
    data[central + 8] |= 1                      # central directory flags
    return bytes(data)


@pytest.mark.parametrize("cond, payload, name, hit", [
    ('AttachmentContainsWords = ["merger"]', docx("The merger closes Friday"), "plan.docx", True),
    ('AttachmentContainsWords = ["merger"]', docx("Lunch menu"), "menu.docx", False),
    ('AttachmentContainsWords = ["merger"]', S.minimal_pdf("The merger closes Friday"), "plan.pdf", True),
    ('AttachmentContainsWords = ["merger"]', S.minimal_pdf("Lunch menu"), "menu.pdf", False),
    ('AttachmentMatchesPatterns = ["\\\\d{4}-\\\\d{4}-\\\\d{4}-\\\\d{4}"]', b"card 4111-1111-1111-1111", "a.txt", True),
    ("AttachmentIsPasswordProtected = true", encrypted_zip(), "secret.zip", True),
    ("AttachmentIsPasswordProtected = true", docx("open"), "open.docx", False),
    ('AttachmentSizeOver = "1 KB"', bytes(2000), "big.bin", True),
    ('AttachmentNameMatchesPatterns = ["^invoice.*\\\\.zip$"]', encrypted_zip(), "invoice-7.zip", True),
])
def test_attachment_content_predicates(cond, payload, name, hit):
    text = f"""
[[rule]]
name = "a"
[rule.conditions]
{cond}
[rule.actions]
LogEventText = "hit"
"""
    ctype = "text/plain" if name.endswith(".txt") else "application/octet-stream"
    assert bool(run(text, S.with_attachment(payload, name, ctype)).hits) is hit
