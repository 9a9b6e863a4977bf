"""docs/exchange.rst as written: the devices connector, `exmta connector which`, the cmdlet table (issue 12)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from exmta.cli import main as exmta_cli
from exmta.cli import make_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
DOC = REPO_ROOT / "docs" / "exchange.rst"


def block_after(marker: str) -> str:
    import textwrap

    text = DOC.read_text()
    start = text.index(marker) + len(marker)
    m = re.match(r"\n\n((?:    .*\n|\n)+)", text[start:])
    assert m, marker
    return textwrap.dedent(m.group(1)).strip("\n") + "\n"


@pytest.fixture
def conf(tmp_path, monkeypatch) -> Path:
    import trustme

    cert = trustme.CA().issue_cert("mail.contoso.example")
    (tmp_path / "tls").mkdir()
    cert.private_key_pem.write_to_path(str(tmp_path / "tls" / "mail.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls" / "mail.pem"))
    path = tmp_path / "exmta.toml"
    path.write_text(block_after("``exmta.toml``::"))
    monkeypatch.chdir(tmp_path)
    return path


def test_which_connector_output_is_as_documented(conf, capsys):
    transcript = block_after("a scanner that cannot do TLS and an address on the internet::")
    commands = re.split(r"^\$ ", transcript, flags=re.M)[1:]
    assert len(commands) == 2
    for chunk in commands:
        command, _, expected = chunk.partition("\n")
        argv = shlex.split(command)
        assert argv[0] == "exmta"
        assert exmta_cli(argv[1:]) == 0
        assert capsys.readouterr().out == expected


def test_an_address_no_connector_admits(tmp_path, capsys):
    path = tmp_path / "exmta.toml"
    path.write_text('[receive.lan]\nlisten = ["tcp:25"]\nremote_ranges = ["10.0.0.0/8"]\n')
    assert exmta_cli(["connector", "which", "-c", str(path), "192.0.2.1"]) == 1
    assert capsys.readouterr().out == ("tcp:25: no receive connector admits 192.0.2.1: 554 5.7.1 at connect "
                                       "(and a REJECT in the tracking log)\n")
    assert exmta_cli(["connector", "which", "-c", str(path), "printer-1"]) == 2


def test_after_auth_and_exchange_servers_rights(tmp_path, capsys):
    path = tmp_path / "exmta.toml"
    (tmp_path / "users.jsonl").write_text("")
    path.write_text('[receive.hybrid]\nlisten = ["tcp:25"]\nremote_ranges = ["10.0.5.10/32"]\n'
                    'externally_secured = true\npermission_groups = ["exchange_servers"]\n')
    assert exmta_cli(["connector", "which", "-c", str(path), "10.0.5.10"]) == 0
    out = capsys.readouterr().out
    assert "may relay to any domain (permission groups)" in out and "headers kept" in out


def test_every_command_in_the_cmdlet_table_parses():
    text = DOC.read_text()
    table = text.split("The cmdlets and their exmta commands", 1)[1].split("Our names beside", 1)[0]
    commands = re.findall(r"``(exmta [^`]+)``", table)
    assert len(commands) >= 12
    parser = make_parser()
    for command in commands:
        argv = shlex.split(re.sub(r"\[(--[^\]]+)\]", r"\1", command))[1:]  # "[--state hold]": an option given
        argv = [{"Q": "relay", "ID": "66153286ACEFBFD3B84EE"}.get(a, a) for a in argv]
        if argv[:2] == ["connector", "which"]:
            argv[-1] = "192.0.2.1"
        parser.parse_args(argv)  # SystemExit on an unknown command or option
