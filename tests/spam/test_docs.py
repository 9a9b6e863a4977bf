"""docs/spam.rst's and etc/exmta.toml's rspamd tables are accepted by the plugin itself (the doc TOML test
checks the schema; this asks the plugin, as `exmta check-config` does), and the docs index names spam.rst."""
from __future__ import annotations

import tomllib
from pathlib import Path

from exmta.plugins import check_filters
from tests.config.test_doc_toml_blocks import commented_sections, literal_blocks

ROOT = Path(__file__).resolve().parents[2]


def test_spam_doc_blocks_pass_the_plugin(tmp_path):
    tables = {}
    for _, text in literal_blocks(ROOT / "docs" / "spam.rst"):
        if text.startswith("["):
            tables.update(tomllib.loads(text).get("filters", {}))
    assert set(tables) == {"rspamd", "rspamd_in", "rspamd_partners"}
    assert check_filters(tables, "mx.example.test", str(tmp_path)) == []
    assert "   spam\n" in (ROOT / "docs" / "index.rst").read_text()


def test_etc_example_rspamd_section_passes_the_plugin(tmp_path):
    filters = tomllib.loads(commented_sections((ROOT / "etc" / "exmta.toml").read_text()))["filters"]
    ours = {k: v for k, v in filters.items() if v["plugin"] == "rspamd"}
    assert set(ours) == {"rspamd"}
    assert check_filters(ours, "mx.example.test", str(tmp_path)) == []
    bad = dict(ours["rspamd"], on_failure="reject")  # a scanner failure is never a 5xx
    assert "on_failure must be one of tempfail, accept" in check_filters({"r": bad}, "mx", str(tmp_path))[0]
