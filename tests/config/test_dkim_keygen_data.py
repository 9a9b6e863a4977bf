"""`exmta dkim keygen --data DIR` writes the key where README's [dkim] example reads it (issue 12, item 11)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from exmta.cli import main as exmta_cli
from exmta.config.load import parse_config

README = (Path(__file__).resolve().parents[2] / "README.rst").read_text()


def test_readme_keygen_commands_feed_the_dkim_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = [re.sub(r"\s+#.*$", "", line.strip()) for line in README.splitlines()
                if line.strip().startswith("exmta dkim keygen")]
    assert len(commands) == 2
    for command in commands:
        assert exmta_cli(shlex.split(command)[1:]) == 0
    out = capsys.readouterr().out
    assert 'key_file = "dkim/s2026r.pem"' in out and 'key_file = "dkim/s2026e.key"' in out
    assert (tmp_path / "exmta-data" / "dkim" / "s2026r.pem").stat().st_mode & 0o777 == 0o600
    keys = [{"domain": "contoso.example", "selector": s, "algorithm": a, "key_file": f"dkim/{s}.{x}"}
            for s, a, x in (("s2026r", "rsa-sha256", "pem"), ("s2026e", "ed25519-sha256", "key"))]
    config = parse_config({"server": {"data_dir": "exmta-data"}, "receive": {"in": {}}, "dkim": {"keys": keys}})
    assert [k.key_file for k in config.dkim_keys] == [str(tmp_path / "exmta-data" / "dkim" / "s2026r.pem"),
                                                     str(tmp_path / "exmta-data" / "dkim" / "s2026e.key")]
