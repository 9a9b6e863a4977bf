"""`exmta check-config` given a transport rules file (etc/rules.toml) checks it as `exmta rules check` does:
every exmta file a user copies can be checked with the one command."""
from __future__ import annotations

from pathlib import Path

from exmta.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_the_example_rules_file_passes_check_config(capsys) -> None:
    assert main(["check-config", str(REPO / "etc" / "rules.toml")]) == 0
    assert "a transport rules file" in capsys.readouterr().out


def test_a_broken_rules_file_is_refused_by_check_config(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "rules.toml"
    bad.write_text('[[rule]]\nname = "x"\nnosuchkey = 1\n')
    assert main(["check-config", str(bad)]) == 2
    assert "nosuchkey" in capsys.readouterr().err


def test_a_configuration_is_still_checked_as_one(tmp_path: Path, capsys) -> None:
    conf = tmp_path / "exmta.toml"
    conf.write_text('[receive.default]\nlisten = ["tcp:2525:interface=127.0.0.1"]\n')
    assert main(["check-config", str(conf)]) == 0
    assert "configuration OK" in capsys.readouterr().out


def test_a_configuration_on_standard_input_is_read_once(tmp_path: Path) -> None:
    """`exmta check-config /dev/stdin < FILE` (the README's TLS walk-through): not consumed by the rules sniff."""
    import subprocess
    import sys

    conf = '[receive.default]\nlisten = ["tcp:2525:interface=127.0.0.1"]\n'
    r = subprocess.run([sys.executable, "-m", "exmta.cli", "check-config", "/dev/stdin"], input=conf, text=True,
                       capture_output=True, timeout=60, cwd=str(tmp_path))
    assert r.returncode == 0 and "configuration OK" in r.stdout, r.stderr
