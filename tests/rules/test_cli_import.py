"""``exmta rules check|test|import`` and the import of Export-TransportRuleCollection files."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from support import mime_samples as S
from support.rulekit import ctx

from exmta.cli import main
from exmta.rules import parse_rules
from exmta.rules.exchange import import_collection, parse_command, to_toml

FIXTURE = Path(__file__).parent / "fixtures" / "transport-rules-export.xml"


def test_powershell_arguments_are_read():
    params = parse_command("New-TransportRule -Name 'It''s mine' -Enabled $false -SCLOver 7 "
                           "-SenderDomainIs 'a.example','b.example' -SentTo @('x@y.example') "
                           "-Comments \"say `\"hi`\"\" -StopRuleProcessing")
    assert params == {"Name": "It's mine", "Enabled": False, "SCLOver": 7,
                      "SenderDomainIs": ["a.example", "b.example"], "SentTo": ["x@y.example"],
                      "Comments": 'say "hi"', "StopRuleProcessing": True}
    with pytest.raises(ValueError, match="not a New-TransportRule"):
        parse_command("Remove-Item -Recurse C:\\")


def imported():
    return import_collection(FIXTURE.read_text(encoding="utf-8").encode("utf-16"))  # as Exchange writes it


def test_the_export_becomes_a_valid_rules_file():
    result = imported()
    text = to_toml(result, "export.xml")
    ruleset = parse_rules(tomllib.loads(text), "<import>", send_connector_known=lambda n: n == "partner-tls")
    by_name = {r.name: r for r in ruleset.rules}
    assert [r.name for r in ruleset.rules][:3] == ["External disclaimer", "Payroll internal only",
                                                    "Tag external subject"]
    assert by_name["Copy finance to compliance"].mode == "audit"
    bad_mailer = by_name["Block bad mailer"]
    assert (not bad_mailer.enabled and bad_mailer.mode == "audit_and_notify" and bad_mailer.stop_processing
            and bad_mailer.activation == 1798761600.0)
    assert by_name["Tag external subject"].sender_address_location == "header_or_envelope"


def test_unmappable_parameters_are_listed_and_their_rules_disabled():
    result = imported()
    assert result.unmapped == [
        ("CEO moderation", "ModerateMessageByUser", "moderation needs an approval workflow exmta does not have"),
        ("Card numbers", "MessageContainsDataClassifications", "DLP sensitive information types are not available"),
    ]
    ruleset = parse_rules(tomllib.loads(to_toml(result)), "<import>")
    enabled = {r.name: r.enabled for r in ruleset.rules}
    assert enabled["CEO moderation"] is False and enabled["Card numbers"] is False
    assert enabled["Payroll internal only"] is True


def test_imported_rules_behave_as_in_exchange():
    ruleset = parse_rules(tomllib.loads(to_toml(imported())), "<import>")
    internal = {"internal_domain": lambda d: d in ("contoso.com", "finance.contoso.com")}
    d = ruleset.evaluate(ctx(S.PLAIN, "mallory@evil.example", "payroll@contoso.com", **internal))
    assert str(d.reject) == "550 5.7.901 Payroll accepts internal mail only"
    d = ruleset.evaluate(ctx(S.PLAIN, "bob@fabrikam.com", "alice@contoso.com", **internal))
    assert d.header_ops == [] and not d.hits  # the partner exception
    d = ruleset.evaluate(ctx(S.PLAIN.replace(b"alice@example.test", b"alice@contoso.com"), "alice@contoso.com",
                             "x@partner.example", trusted=True, **internal))
    assert [h.rule for h in d.hits] == ["External disclaimer", "Partner over TLS"]
    assert d.route_connector == "partner-tls" and d.require_tls
    assert "confidential & for the addressee" in d.apply_to(S.PLAIN).decode()


def test_cli_import_writes_the_file_and_lists_what_it_left_out(tmp_path, capsys):
    out = tmp_path / "rules.toml"
    assert main(["rules", "import", str(FIXTURE), "-o", str(out)]) == 1  # something was left out
    err = capsys.readouterr().err
    assert "9 rule(s) imported" in err and "-ModerateMessageByUser: moderation" in err
    assert main(["rules", "check", str(out)]) == 0
    assert "9 rule(s) OK (6 enabled)" in capsys.readouterr().out
    assert main(["rules", "import", str(FIXTURE), "-o", str(out)]) == 2  # never overwrites


def test_cli_check_reports_every_problem(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nname = "x"\n[rule.conditions]\nFromScope = "Mars"\n[rule.actions]\nPrependSubject = 1\n')
    assert main(["rules", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "rule 'x'.conditions.FromScope: must be InOrganization or NotInOrganization" in err
    assert "rule 'x'.actions.PrependSubject: must be a non-empty text" in err


def test_cli_dry_run_shows_matches_and_the_diff(tmp_path, capsys):
    rules = tmp_path / "rules.toml"
    rules.write_text("""
[[rule]]
name = "Tag external"
[rule.conditions]
FromScope = "NotInOrganization"
[rule.actions]
PrependSubject = "[EXTERNAL] "
ApplyHtmlDisclaimerText = "External sender"

[[rule]]
name = "Payroll"
[rule.conditions]
SentTo = "payroll@example.test"
[rule.actions]
RejectMessageReasonText = "No"
""")
    eml = tmp_path / "m.eml"
    eml.write_bytes(S.PLAIN.replace(b"\r\n", b"\n"))
    assert main(["rules", "test", str(eml), "--from", "x@outside.test", "--to", "bob@example.test",
                 "--rules", str(rules), "--internal-domain", "example.test"]) == 0
    out = capsys.readouterr().out
    assert "  MATCH: 'Tag external' (enforce)\n      because FromScope='NotInOrganization'\n" in out
    assert "  no match: 'Payroll'" in out
    assert "result: queued for bob@example.test" in out
    assert "-Subject: hello\n+Subject: [EXTERNAL] hello" in out
    assert "+External sender" in out
    assert main(["rules", "test", str(eml), "--from", "x@outside.test", "--to", "payroll@example.test",
                 "--rules", str(rules)]) == 0
    assert "result: rejected: 550 5.7.1 No" in capsys.readouterr().out
