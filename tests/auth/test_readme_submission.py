"""README.rst, followed to the letter: inbound on 2525 (anonymous) and submission on 5870 with STARTTLS + AUTH.

The configuration, the certificate command and the AUTH settings are taken
from the README's own literal blocks (only the ports are changed to free
ones), so the walk-through cannot rot without this test failing.
"""
from __future__ import annotations

import re
import smtplib
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from support.rst import literal_blocks
from support import procs
from support.exmta_proc import REPO_ROOT, ExmtaProcess

pytestmark = pytest.mark.integration

PASSWORD = "Readme passw0rd"



def block_with(blocks: list[str], *needles: str) -> str:
    [found] = [b for b in blocks if all(n in b for n in needles)]
    return found


@pytest.fixture
def readme_setup(tmp_path: Path, exmta_factory):
    blocks = literal_blocks((REPO_ROOT / "README.rst").read_text())
    work = tmp_path / "exmta0"  # the exmta_factory workdir: twistd runs there, beside tls.toml
    work.mkdir()
    openssl = block_with(blocks, "openssl req", "tls/mail.key")
    subprocess.run(["bash", "-euc", openssl], cwd=work, check=True, capture_output=True, timeout=60)
    subprocess.run([sys.executable, "-m", "exmta.cli", "users", "add", "users.jsonl", "alice@contoso.example",
                    "--password-stdin"], cwd=work, input=PASSWORD + "\n", check=True, capture_output=True,
                   text=True, timeout=60)
    toml = block_with(blocks, "[receive.submission]", "[receive.inbound.tls]")
    auth = block_with(blocks, 'auth = ["PLAIN", "LOGIN"]', 'auth_backend = "users.jsonl"')
    assert 'relay_networks = ["127.0.0.0/8"]\n' in toml
    toml = toml.replace('relay_networks = ["127.0.0.0/8"]\n', auth)
    inbound, submission = procs.free_ports(2)
    toml = toml.replace("tcp:2525:", f"tcp:{inbound}:").replace("tcp:5870:", f"tcp:{submission}:")
    exmta = exmta_factory(toml=toml, port=submission, workdir=work, data_dir=work / "exmta-data")
    return exmta, work, inbound, submission, blocks


def _maildir(work: Path, user: str) -> list[bytes]:
    new = work / "exmta-data" / "mail" / "contoso.example" / user / "new"
    return [p.read_bytes() for p in sorted(new.glob("*"))] if new.exists() else []


def test_readme_submission_with_swaks_and_smtplib(readme_setup):
    exmta, work, inbound, submission, blocks = readme_setup
    swaks = block_with(blocks, "swaks", "--auth PLAIN")
    argv = re.sub(r"\\\n\s*", " ", swaks).split()
    argv = [a.replace("127.0.0.1:5870", f"127.0.0.1:{submission}") for a in argv]
    proc = subprocess.run(argv + ["--auth-password", PASSWORD, "--timeout", "20"], cwd=work, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "235 2.7.0 Authentication successful" in proc.stdout

    ctx = ssl.create_default_context(cafile=str(work / "tls" / "mail.pem"))
    with smtplib.SMTP("127.0.0.1", submission, timeout=20) as s:
        s.ehlo("c.test")
        assert not s.has_extn("auth")  # not before STARTTLS
        s._host = "mail.contoso.example"
        s.starttls(context=ctx)
        s.ehlo("c.test")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert s.login("alice@contoso.example", PASSWORD)[0] == 235
        assert s.sendmail("alice@contoso.example", ["bob@contoso.example"],
                          b"From: alice@contoso.example\r\nSubject: hello\r\n\r\nsent with AUTH\r\n") == {}
    procs.wait_until(lambda: len(_maildir(work, "bob")) == 2, 30, "two messages in bob's Maildir")
    for message in _maildir(work, "bob"):
        assert b" with ESMTPSA id " in message


def test_readme_inbound_stays_anonymous(readme_setup):
    exmta, work, inbound, submission, blocks = readme_setup
    with smtplib.SMTP("127.0.0.1", inbound, timeout=20) as s:
        s.ehlo("c.test")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        assert s.sendmail("x@fabrikam.example", ["bob@contoso.example"], b"Subject: in\r\n\r\nx\r\n") == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.sendmail("x@fabrikam.example", ["someone@tailspin.example"], b"Subject: relay\r\n\r\nx\r\n")
        assert e.value.recipients["someone@tailspin.example"][0] in (550, 554)
    procs.wait_until(lambda: _maildir(work, "bob"), 30, "inbound delivery")
