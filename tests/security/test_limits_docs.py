"""docs/limits.rst and etc/exmta.toml: the examples load, the defaults shown are the schema's."""
from __future__ import annotations

import shlex
from pathlib import Path

from exmta.cli import make_parser
from exmta.config.load import load_config
from exmta.config.schema import Config, ReceiveConnectorConfig
from support.rst import literal_blocks

ROOT = Path(__file__).resolve().parents[2]
RECEIVE_KEYS = ("max_header_size", "max_header_field", "max_refused_recipients", "refused_recipients_tarpit_after",
                "refused_recipients_tarpit", "proxy_header_timeout", "trusted_proxies")
SERVER_KEYS = ("filter_threads", "filter_checks_in_flight", "filter_checks_per_client", "recipient_cache_ttl")



def test_the_documented_config_loads_with_the_values_it_shows(tmp_path: Path) -> None:
    [toml] = [b for b in literal_blocks((ROOT / "docs" / "limits.rst").read_text()) if "[server]" in b]
    path = tmp_path / "exmta.toml"
    path.write_text(toml)
    config = load_config(str(path))
    rc = config.receive[0]
    assert (config.recipient_directory, config.recipient_cache_ttl, config.filter_checks_per_client) == \
        ("corp", 120.0, 5)
    assert (rc.trusted_proxies, rc.proxy_header_timeout, rc.max_header_size, rc.max_refused_recipients,
            rc.refused_recipients_tarpit_after) == (("10.0.0.10/32", "10.0.0.11/32"), 5.0, 128 * 1024, 10, 3)


def test_the_documented_commands_parse() -> None:
    [shell] = [b for b in literal_blocks((ROOT / "docs" / "limits.rst").read_text()) if "exmta lockouts" in b]
    parser = make_parser()
    for line in shell.strip().splitlines():
        args = parser.parse_args(shlex.split(line)[1:])
        assert args.func.__module__ == "exmta.auth.lockout_cli"


def test_etc_example_shows_the_schema_defaults() -> None:
    text = (ROOT / "etc" / "exmta.toml").read_text()
    for key in RECEIVE_KEYS + SERVER_KEYS + ("recipient_directory", "exmta lockouts"):
        assert key in text, key
    config = load_config(str(ROOT / "etc" / "exmta.toml"))
    default_rc, default = ReceiveConnectorConfig(name="x"), Config()
    for key in RECEIVE_KEYS:
        assert getattr(config.receive[0], key) == getattr(default_rc, key), key
    for key in SERVER_KEYS:
        assert getattr(config, key) == getattr(default, key), key
