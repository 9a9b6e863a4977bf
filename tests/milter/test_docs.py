"""docs/milter.rst's and etc/exmta.toml's milter tables are accepted by the plugin itself, as
`exmta check-config` asks it (the doc TOML test checks the schema)."""
from __future__ import annotations

import tomllib
from pathlib import Path

from exmta.plugins import check_filters
from tests.config.test_doc_toml_blocks import commented_sections, literal_blocks

ROOT = Path(__file__).resolve().parents[2]


def test_milter_doc_blocks_pass_the_plugin(tmp_path):
    tables = {}
    for _, text in literal_blocks(ROOT / "docs" / "milter.rst"):
        if text.startswith("["):
            tables.update(tomllib.loads(text).get("filters", {}))
    assert set(tables) == {"milter", "dkim_signer", "rspamd_milter"}
    assert check_filters(tables, "mx.example.test", str(tmp_path)) == []


def test_etc_example_milter_section_passes_the_plugin(tmp_path):
    filters = tomllib.loads(commented_sections((ROOT / "etc" / "exmta.toml").read_text()))["filters"]
    ours = {k: v for k, v in filters.items() if v["plugin"] == "milter"}
    assert set(ours) == {"milter"} and ours["milter"]["milters"][0]["name"] == "opendkim"
    assert check_filters(ours, "mx.example.test", str(tmp_path)) == []
    bad = dict(ours["milter"], milters=[dict(ours["milter"]["milters"][0], default_action="bounce")])
    assert "default_action must be one of" in check_filters({"m": bad}, "mx", str(tmp_path))[0]
