"""mypy (with the zope.interface plugin, mypy.ini) finds nothing new in exmta/.

The findings that were there when mypy was added are listed in ``mypy-baseline.txt`` beside this
file, without line numbers (so unrelated edits do not move them); a finding that is not there
fails the test. Fix a listed one and remove its line; after a deliberate change, rewrite the list
with ``.venv/bin/python tests/unit/test_typecheck.py --update``.
"""
from __future__ import annotations

import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASELINE = Path(__file__).with_name("mypy-baseline.txt")
_FINDING = re.compile(r"^(?P<file>[^:\s]+\.py):\d+: error: (?P<text>.*)$")


def findings(cache_dir: str) -> list[str]:
    """``file: message  [code]`` for each error mypy reports on exmta/ (line numbers dropped)."""
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", cache_dir, "exmta"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode in (0, 1), done.stdout + done.stderr  # 2: mypy itself failed
    out = []
    for line in done.stdout.splitlines():
        m = _FINDING.match(line)
        if m:
            out.append(f"{m['file']}: {m['text']}")
    assert out or "Success" in done.stdout, done.stdout + done.stderr
    return sorted(out)


def test_mypy_finds_nothing_new(tmp_path):
    current = collections.Counter(findings(str(tmp_path / "mypy-cache")))
    baseline = collections.Counter(line for line in BASELINE.read_text().splitlines()
                                   if line and not line.startswith("#"))
    new = sorted((current - baseline).elements())
    assert not new, "new mypy findings (fix them; mypy.ini, tests/unit/test_typecheck.py):\n" + "\n".join(new)


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: test_typecheck.py --update   (rewrites mypy-baseline.txt)")
    with tempfile.TemporaryDirectory() as cache:
        lines = findings(cache)
    BASELINE.write_text("# mypy findings in exmta/ accepted when mypy was added (tests/unit/test_typecheck.py)\n"
                        + "".join(f"{line}\n" for line in lines))
    print(f"{len(lines)} findings written to {BASELINE}")
