"""The README's TLS walk-through, run as written: openssl, the TOML, check-config, twistd, swaks, smtplib."""
from __future__ import annotations

import re
import shlex
import smtplib
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from support.procs import free_port, wait_until

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.rst"


def literal_block(after: str) -> str:
    """The ``::`` literal block that follows the paragraph containing ``after``."""
    text = README.read_text()
    start = text.index(after)
    start = text.index("::\n", start) + 3
    lines = []
    for line in text[start:].splitlines()[1:]:
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines).strip("\n") + "\n"


def shell_command(block: str) -> list[str]:
    return shlex.split(block.replace("\\\n", " "))


def test_readme_tls_walkthrough(tmp_path, exmta_factory):
    workdir = tmp_path / "exmta0"
    workdir.mkdir()
    mkdir, openssl = literal_block("a self-signed one will do").strip().split("\n", 1)
    assert mkdir == "mkdir -p tls"
    (workdir / "tls").mkdir()
    subprocess.run(shell_command(openssl), cwd=workdir, check=True, capture_output=True, timeout=60)

    toml = literal_block("Then ``tls.toml``")
    submission = free_port()
    toml = toml.replace("tcp:2525:", "tcp:{port}:").replace("tcp:5870:", f"tcp:{submission}:")
    toml = toml.replace('data_dir = "./exmta-data"', 'data_dir = "{data_dir}"')
    check = subprocess.run([sys.executable, "-m", "exmta.cli", "check-config", "/dev/stdin"], input=toml
                           .replace("{port}", "2525").replace("{data_dir}", str(tmp_path / "d")),
                           cwd=workdir, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    ex = exmta_factory(toml=toml, workdir=workdir)

    swaks = shell_command(literal_block("Send a message over STARTTLS with swaks"))
    swaks = [a.replace("5870", str(submission)) for a in swaks] + ["--header", "Subject: swaks"]
    r = subprocess.run(swaks, cwd=workdir, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TLS started with cipher TLSv1.3" in r.stdout

    code = literal_block("and with Python's smtplib").replace("5870", str(submission))
    code = code.replace('"tls/mail.pem"', repr(str(workdir / "tls" / "mail.pem")))
    exec(compile(code, "README smtplib example", "exec"), {})

    wait_until(lambda: len(ex.maildir_messages("alice@contoso.example")) == 2, 30, "two messages for alice")
    messages = ex.maildir_messages("alice@contoso.example")
    assert all(re.search(rb"\(using TLSv1\.3 with cipher \S+\)", m) for m in messages)

    # the inbound connector offers STARTTLS, the submission connector insists on it
    with smtplib.SMTP("127.0.0.1", ex.port, timeout=10) as s:
        s.ehlo("c.test")
        assert s.has_extn("starttls")
    with smtplib.SMTP("127.0.0.1", submission, timeout=10) as s:
        s.ehlo("c.test")
        assert s.mail("app@contoso.example") == (530, b"5.7.0 Must issue a STARTTLS command first")
    with smtplib.SMTP("127.0.0.1", submission, timeout=10) as s:
        s.ehlo("c.test")
        s._host = "mail.contoso.example"
        with pytest.raises(ssl.SSLCertVerificationError):  # nobody trusts it without the CA file
            s.starttls(context=ssl.create_default_context(cafile=None, capath="/nonexistent"))
    assert ex.error_lines() == []
