"""exmta/ passes ruff (rules and reasons: ruff.toml), so the README's test command lints too."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing_in_exmta():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "exmta"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All checks passed" in done.stdout
