"""Black box: ``twistd -n exmta`` with a transport rules file, relaying to an aiosmtpd sink.

A disclaimer on mail leaving the organisation, [EXTERNAL] on mail from outside, payroll@ closed
to outside senders (one recipient refused with an NDR, or the whole message in the session), the
rule hits in the tracking log, and a live edit of the rules file (a bad one keeps the old rules).
"""
from __future__ import annotations

import json
import smtplib
from pathlib import Path
from typing import Any, Callable

import pytest

from support import exmta_proc, procs
from support.sinks import SmtpSink

pytestmark = pytest.mark.integration

RULES = """
[[rule]]
name = "External disclaimer"
[rule.conditions]
FromScope = "InOrganization"
SentToScope = "NotInOrganization"
[rule.actions]
ApplyHtmlDisclaimerText = "<p>Example Corp: confidential.</p>"

[[rule]]
name = "Payroll internal only"
[rule.conditions]
SentTo = "payroll@example.test"
FromScope = "NotInOrganization"
[rule.actions]
RejectMessageReasonText = "Payroll accepts internal mail only"
RejectMessageEnhancedStatusCode = "5.7.901"

[[rule]]
name = "Tag external"
[rule.conditions]
FromScope = "NotInOrganization"
[rule.actions]
PrependSubject = "[EXTERNAL] "
"""


def mail(sender: str, to: str, subject: str) -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@t>\r\n"
            f"\r\nHello there.\r\n").encode()


def tracked(ex: exmta_proc.ExmtaProcess) -> list[dict[str, Any]]:
    path = ex.data_dir / "log" / "tracking.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


@pytest.fixture
def server(tmp_path: Path, smtp_sink: SmtpSink,
           exmta_factory: Callable[..., exmta_proc.ExmtaProcess]) -> exmta_proc.ExmtaProcess:
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    extra = f'[transport_rules]\nfile = "{rules}"\nreload_interval = "0.2s"\n'
    # the connector stands for Exchange's internal servers (ExternalAuthoritative): its sessions are
    # inside the organisation, so FromScope = InOrganization holds for an address of an accepted domain
    internal = ('remote_ranges = ["127.0.0.0/8"]\npermission_groups = ["anonymous", "exchange_servers"]\n'
                'externally_secured = true')
    return exmta_factory(toml=exmta_proc.exmta_toml(smarthost=smtp_sink.next_hop, extra=extra,
                                                    receive_extra=internal))


def test_rules_in_the_data_path(server: exmta_proc.ExmtaProcess, smtp_sink: SmtpSink, tmp_path: Path) -> None:
    with smtplib.SMTP(procs.LOOPBACK, server.port, timeout=30) as c:
        c.sendmail("alice@example.test", ["x@remote.test"], mail("alice@example.test", "x@remote.test", "one"))
        c.sendmail("eve@outside.test", ["payroll@example.test", "y@remote.test"],
                   mail("eve@outside.test", "y@remote.test", "two"))
        with pytest.raises(smtplib.SMTPDataError) as refused:
            c.sendmail("eve@outside.test", ["payroll@example.test"], mail("eve@outside.test", "payroll", "three"))
        assert refused.value.smtp_code == 550
        assert refused.value.smtp_error == b"5.7.901 Payroll accepts internal mail only"
    got = smtp_sink.wait_for(3, timeout=30)
    by_rcpt = {tuple(m.rcpt_tos): m for m in got}
    outbound = by_rcpt[("x@remote.test",)].message()
    assert outbound["Subject"] == "one" and "Example Corp: confidential." in outbound.get_content()
    assert "Hello there." in outbound.get_content()
    external = by_rcpt[("y@remote.test",)].message()
    assert external["Subject"] == "[EXTERNAL] two" and "confidential" not in external.get_content()
    ndr = by_rcpt[("eve@outside.test",)]
    assert ndr.mail_from == "" and b"payroll@example.test" in ndr.content and b"5.7.901" in ndr.content
    procs.wait_until(lambda: sum(e["event_id"] == "AGENTINFO" for e in tracked(server)) >= 4, 10, "rule hits")
    hits = [(e["rule"], e["mode"]) for e in tracked(server) if e.get("agent") == "TransportRule"]
    assert hits.count(("Payroll internal only", "enforce")) == 2 and ("External disclaimer", "enforce") in hits

    # a live edit: a new rule is in force without a restart; a broken edit keeps it
    (tmp_path / "rules.toml").write_text(RULES + '\n[[rule]]\nname = "Reloaded"\n[rule.actions]\n'
                                         'SetHeaderName = "X-Reloaded"\nSetHeaderValue = "yes"\n')
    procs.wait_until(lambda: "4 rule(s) loaded" in server.log_text(), 20, "the reload")
    (tmp_path / "rules.toml").write_text(RULES + '\n[[rule]]\nname = "Broken"\nmode = "loud"\n'
                                         '[rule.actions]\nLogEventText = "x"\n# bigger\n')
    procs.wait_until(lambda: "rule 'Broken'.mode" in server.log_text(), 20, "the refused reload")
    with smtplib.SMTP(procs.LOOPBACK, server.port, timeout=30) as c:
        c.sendmail("alice@example.test", ["z@remote.test"], mail("alice@example.test", "z@remote.test", "four"))
    last = smtp_sink.wait_for(4, timeout=30)[-1].message()
    assert last["X-Reloaded"] == "yes"


def test_rules_run_in_receive_workers(tmp_path: Path, smtp_sink: SmtpSink,
                                      exmta_factory: Callable[..., exmta_proc.ExmtaProcess]) -> None:
    """With receive workers the rules run in the worker that took the session; hits reach the tracking log."""
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    server = exmta_factory(toml=exmta_proc.exmta_toml(
        smarthost=smtp_sink.next_hop, receive_workers=1, extra=f'[transport_rules]\nfile = "{rules}"\n'))
    with smtplib.SMTP(procs.LOOPBACK, server.port, timeout=30) as c:
        c.sendmail("eve@outside.test", ["payroll@example.test", "y@remote.test"],
                   mail("eve@outside.test", "y@remote.test", "five"))
    got = {tuple(m.rcpt_tos): m for m in smtp_sink.wait_for(2, timeout=30)}
    assert got[("y@remote.test",)].message()["Subject"] == "[EXTERNAL] five"
    assert b"5.7.901" in got[("eve@outside.test",)].content  # the NDR, queued by the worker
    procs.wait_until(lambda: {e.get("rule") for e in tracked(server)} >= {"Payroll internal only", "Tag external"},
                     10, "rule hits from the worker")
