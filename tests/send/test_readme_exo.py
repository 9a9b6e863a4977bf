"""README's "Relay to Exchange Online without Basic auth", run as written, then against the real parts.

The secret file is made with the README's own commands, ``check-config`` is
run on ``exo.toml`` unchanged; then the same file, with only what points at
Microsoft replaced by the loopback stand-ins (token endpoint, smart host and
its CA, the LAN range, the port), carries a device's message through
XOAUTH2 to Dovecot.
"""
from __future__ import annotations

import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support.procs import LOOPBACK
from support.xoauth2_parts import SECRET, Parts

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.rst"


def literal_block(after: str) -> str:
    """The ``::`` literal block that follows the paragraph containing ``after`` (dedented)."""
    text = README.read_text()
    start = text.index("::\n", text.index(after)) + 3
    lines, indent = [], None
    for line in text[start:].splitlines()[1:]:
        if line.strip():
            width = len(line) - len(line.lstrip())
            if indent is None:
                indent = width
            if width < indent:
                break
        lines.append(line[indent or 0:])
    return "\n".join(lines).strip("\n") + "\n"


def test_readme_exo_config_passes_check_config(tmp_path: Path) -> None:
    setup = literal_block("Keep the client secret in a file")
    subprocess.run(["bash", "-euc", setup], cwd=tmp_path, check=True, timeout=30)
    assert (tmp_path / "exo-client-secret").stat().st_mode & 0o777 == 0o600
    toml = literal_block("Write ``exo.toml``")
    (tmp_path / "exo.toml").write_text(toml)
    check, start = literal_block("Check it, start it").strip().splitlines()
    assert check == ".venv/bin/exmta check-config exo.toml" and start == ".venv/bin/twistd -n exmta -c exo.toml"
    r = subprocess.run([sys.executable, "-m", "exmta.cli", "check-config", "exo.toml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # and the warning in the text is true: without validated TLS it is refused
    (tmp_path / "weak.toml").write_text(toml.replace('tls_auth_level = "domain"', ""))
    r = subprocess.run([sys.executable, "-m", "exmta.cli", "check-config", "weak.toml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and 'needs tls = "mandatory" and tls_auth_level = "domain"' in r.stderr


def test_readme_exo_config_relays_through_xoauth2(tmp_path: Path, exmta_factory: Any) -> None:
    parts = Parts(tmp_path / "parts", mailbox="relay@contoso.example")
    try:
        workdir = tmp_path / "exmta0"
        workdir.mkdir()
        (workdir / "exo-client-secret").write_text(SECRET)
        toml = literal_block("Write ``exo.toml``")
        for old, new in [
            ('data_dir = "./exmta-data"', 'data_dir = "{data_dir}"'),
            ('listen = ["tcp:2525"]', 'listen = ["tcp:{port}:interface=127.0.0.1"]'),
            ('"192.168.10.0/24"', '"127.0.0.0/8"'),
            ('smarthosts = ["smtp.office365.com:587"]',
             'smarthosts = ["{next_hop}"]\ntls_domain = "submission.example.test"\ntls_ca_file = "{ca_file}"'),
            ('tenant = "contoso.onmicrosoft.com"', 'token_endpoint = "{token_url}"'),
            ('client_id = "00000000-0000-0000-0000-000000000000"', 'client_id = "exmta-app"'),
        ]:
            assert old in toml, old
            toml = toml.replace(old, new)
        ex = parts.exmta(exmta_factory, toml=toml, workdir=workdir)
        with smtplib.SMTP(LOOPBACK, ex.port, local_hostname="printer.lan", timeout=10) as c:
            c.sendmail("scanner@contoso.example", ["bob@fabrikam.example"],
                       b"From: scanner@contoso.example\r\nSubject: README\r\n\r\nscan\r\n")
        (got,) = parts.sink.wait_for(1, timeout=60)
        assert got.message()["Subject"] == "README" and got.rcpt_tos == ["bob@fabrikam.example"]
        assert "Login: user=<relay@contoso.example>, method=XOAUTH2" in parts.dovecot.log_text()
        parts.no_secret_anywhere(ex, protocol_log=False)
    finally:
        parts.stop()
