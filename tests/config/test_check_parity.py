"""`exmta check-config` refuses everything `twistd exmta` refuses at start (issue 12, items 1-3).

The same broken files go to both: check-config in process, and ``twistd -n exmta -c FILE`` as a real
process (not ``--check``), which must exit with the same problem instead of starting.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from exmta.cli import main as exmta_cli
from exmta.config.check import check_file
from exmta.config.load import ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; "
          "sys.argv[0] = 'twistd'; run()"]

BASE = """
[server]
hostname = "mx.example.test"
[accepted_domains]
"example.test" = "authoritative"
[receive.in]
listen = ["tcp:0:interface=127.0.0.1"]
{receive}
[send.out]
smarthosts = ["[127.0.0.1]:2601"]
[[route]]
domains = ["*"]
connector = "out"
{extra}
"""

# (id, text in [receive.in], text at the end, what the problem text must contain)
BROKEN = [
    ("filter-timeout-not-a-duration", 'filters = ["spf"]', '[filters.spf]\nplugin = "spf"\ntimeout = "soon"',
     "filters.spf.timeout: expected a duration"),
    ("filter-on-error-unknown", 'filters = ["spf"]', '[filters.spf]\nplugin = "spf"\non_error = "ignore"',
     "filters.spf.on_error: must be one of"),
    ("filter-plugin-misspelled", 'filters = ["spf"]', '[filters.spf]\nplugin = "sfp"',
     "filters.spf.plugin: no filter plugin 'sfp' is installed"),
    ("filter-option-unknown", 'filters = ["tag"]', '[filters.tag]\nplugin = "authres"\ncolour = "red"',
     "filters.tag: unknown key(s) colour"),
    ("filter-option-bad-value", 'filters = ["dmarc"]', '[filters.dmarc]\nplugin = "dmarc"\nquarantine = "bin"',
     "filters.dmarc: quarantine must be one of"),
    ("recipient-list-missing", "", '', "relative to the configuration file's directory"),
    ("tls-cert-missing", "", '[receive.in.tls]\ncert = "tls/nope.pem"',
     "certificate file does not exist (relative paths are relative to the configuration file's directory"),
    ("unknown-setting", "max_recipents = 10", "", "receive.in.max_recipents: unknown setting"),
    ("dnsbl-list-undefined", 'dnsbl_sites = ["zen"]', "", "receive.in.dnsbl_sites: no [connection_filter.lists.zen]"),
    ("dnsbl-codes-bad", 'dnsbl_sites = ["zen"]',
     '[connection_filter.lists.zen]\nzone = "zen.test"\ncodes = ["127.0.0.[9..2]"]',
     "connection_filter.lists.zen.codes: return code"),
]


def write(tmp_path: Path, case: str, receive: str, extra: str) -> Path:
    text = BASE.format(receive=receive, extra=extra)
    if case == "recipient-list-missing":
        text = text.replace('hostname = "mx.example.test"',
                            'hostname = "mx.example.test"\nrecipient_list = "recipients.txt"')
    path = tmp_path / "conf" / "exmta.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, receive, extra, expected", BROKEN, ids=[b[0] for b in BROKEN])
def test_check_config_and_twistd_refuse_the_same_file(tmp_path, capsys, case, receive, extra, expected):
    path = write(tmp_path, case, receive, extra)
    assert exmta_cli(["check-config", str(path)]) == 2
    assert expected in capsys.readouterr().err

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(TWISTD + ["-n", "--pidfile=", "exmta", "-c", str(path), "--data", str(tmp_path / "d")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert expected in proc.stdout + proc.stderr
    assert not (tmp_path / "d" / "queue").exists()  # refused before anything was created


def test_documented_filter_timeout_with_a_unit_builds(tmp_path):
    """docs/filters.rst's ``timeout = "5s"`` passes the check and builds the service (it crashed at start)."""
    from twisted.internet import reactor

    from exmta.service import build_service

    path = write(tmp_path, "ok", 'filters = ["spf"]',
                 '[filters.spf]\nplugin = "spf"\ntimeout = "5s"\non_error = "continue"')
    config, _ = check_file(str(path), data_dir=str(tmp_path / "d"))
    assert config.filters["spf"]["timeout"] == 5.0
    top = build_service(config, reactor)  # builds, never started
    factory = next(f for f in top.getServiceNamed("receive-drain").factories)
    assert factory.filters.settings_for(factory.filters.filters[0]) == (5.0, "continue")


def test_every_path_is_relative_to_the_configuration_file(tmp_path, monkeypatch):
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "recipients.txt").write_text("alice@example.test\n")
    path = write(tmp_path, "recipient-list-missing", "", "")
    path.rename(conf / "exmta.toml")
    monkeypatch.chdir(tmp_path)  # elsewhere: the file's directory counts, not this one
    text = (conf / "exmta.toml").read_text().replace('[server]', '[server]\ndata_dir = "data"\n'
                                                     'tracking_log = "log/t.jsonl"')
    (conf / "exmta.toml").write_text(text)
    config = load_config(str(conf / "exmta.toml"))
    assert config.recipient_list == str(conf / "recipients.txt")
    assert config.data_dir == str(conf / "data")
    assert config.tracking_log == str(conf / "log" / "t.jsonl")
    (conf / "recipients.txt").unlink()
    with pytest.raises(ConfigError) as info:
        load_config(str(conf / "exmta.toml"))
    assert (f"server.recipient_list: {conf / 'recipients.txt'}: the file does not exist ('recipients.txt' is "
            f"relative to the configuration file's directory {conf})") in info.value.problems
