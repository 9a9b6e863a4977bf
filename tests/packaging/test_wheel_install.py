"""``pip install`` of a built wheel gives a working ``twistd exmta`` (issue 12, item 8).

The wheel is built from this tree and installed into a fresh virtualenv that
does not see the checkout, the way a user installs a package; the plugin must
come from the wheel (``twisted/plugins/exmta_plugin.py``), not the tree.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def run(args: list[str], cwd: Path, timeout: float = 600, code: int = 0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == code, f"{args}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def doc_block(after: str) -> str:
    """The literal block after ``after`` in docs/filters.rst."""
    text = (REPO_ROOT / "docs" / "filters.rst").read_text()
    start = text.index(after) + len(after)
    m = re.match(r"\n\n((?:    .*\n|\n)+)", text[start:])
    assert m, after
    return textwrap.dedent(m.group(1))


def test_wheel_installs_the_twistd_plugin(tmp_path):
    source = tmp_path / "src"  # a copy: pip builds in the source tree (build/, egg-info), not in the checkout
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", "dropin.cache"))
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)], tmp_path)
    (wheel,) = wheels.glob("exmta-*.whl")
    venv.EnvBuilder(with_pip=True).create(tmp_path / "venv")
    bin_dir = tmp_path / "venv" / "bin"
    run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(wheel)], tmp_path)

    out = run([str(bin_dir / "python"), "-c", "import exmta, twisted.plugins.exmta_plugin as p; print(p.__file__)"],
              tmp_path).stdout
    assert str(tmp_path / "venv") in out and str(REPO_ROOT) not in out
    helped = run([str(bin_dir / "twistd"), "--help"], tmp_path).stdout
    assert any(line.split()[:1] == ["exmta"] for line in helped.splitlines()), helped
    # twistd wrote Twisted's plugin cache beside the plugin (the venv is writable)
    assert (Path(out.strip()).parent / "dropin.cache").exists()
    assert "configuration OK" in run([str(bin_dir / "twistd"), "exmta", "--check"], tmp_path).stdout
    checked = run([str(bin_dir / "exmta"), "check-config", str(REPO_ROOT / "etc" / "exmta.toml")], tmp_path)
    assert "configuration OK" in checked.stdout

    # docs/filters.rst's plugin, built from its pyproject.toml as written, is found by the checks
    plugin = tmp_path / "extag"
    (plugin / "exmta_extag").mkdir(parents=True)
    (plugin / "exmta_extag" / "__init__.py").write_text(doc_block("``exmta_extag/__init__.py``::"))
    (plugin / "pyproject.toml").write_text(doc_block("builds and installs the plugin::"))
    run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "."], plugin)
    conf = tmp_path / "exmta.toml"
    conf.write_text(doc_block("``exmta.toml``::") + '\n[accepted_domains]\n"contoso.example" = "authoritative"\n'
                    '[send.out]\nsmarthosts = ["[192.0.2.1]:25"]\n[[route]]\ndomains = ["*"]\nconnector = "out"\n')
    assert "configuration OK" in run([str(bin_dir / "exmta"), "check-config", str(conf)], tmp_path).stdout
    assert "configuration OK" in run([str(bin_dir / "twistd"), "exmta", "-c", str(conf), "--check"], tmp_path).stdout
    conf.write_text(conf.read_text().replace('tag = "[EXT]"', 'tag = "[EXT]"\ncolour = "red"'))
    refused = run([str(bin_dir / "exmta"), "check-config", str(conf)], tmp_path, code=2)
    assert "filters.extag: unknown key(s) colour" in refused.stderr
