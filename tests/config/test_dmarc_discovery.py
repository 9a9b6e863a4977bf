"""``discovery`` of the dmarc filter ([filters.NAME] with plugin = "dmarc"): psl (default) or treewalk."""
from __future__ import annotations

import tomllib

import pytest
from twisted.internet.task import Clock

from exmta.config.load import ConfigError, parse_config
from exmta.plugins import FilterEnv, load_filters

BASE = """
[server]
hostname = "mx.example.test"
[receive.in]
listen = ["tcp:2525:interface=127.0.0.1"]
filters = ["dmarc"]
[filters.dmarc]
plugin = "dmarc"
dns_servers = ["127.0.0.1:5353"]
"""


def build(tmp_path, extra: str = "") -> dict:
    clock = Clock()
    env = FilterEnv(reactor=clock, clock=clock, threadpool=None, hostname="mx.example.test", data_dir=str(tmp_path))
    return load_filters(parse_config(tomllib.loads(BASE + extra)).filters, env)


def test_default_is_the_rfc7489_psl_method(tmp_path) -> None:
    assert build(tmp_path)["dmarc"].discovery == "psl"


def test_treewalk(tmp_path) -> None:
    assert build(tmp_path, 'discovery = "treewalk"\n')["dmarc"].discovery == "treewalk"


@pytest.mark.parametrize("value", ['"TreeWalk"', '"dns"', "true", "1"])
def test_bad_values_name_the_key(tmp_path, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(tmp_path, f"discovery = {value}\n")
    [problem] = info.value.problems
    assert problem.startswith("filters.dmarc: discovery must be one of psl, treewalk")
