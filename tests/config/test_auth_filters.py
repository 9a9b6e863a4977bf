"""Configuration of the built-in mail authentication filters ([filters.NAME] tables)."""
from __future__ import annotations

import tomllib

import pytest
from twisted.internet.task import Clock

from exmta.config.load import ConfigError, parse_config
from exmta.plugins import FilterEnv, load_filters

GOOD = """
[server]
hostname = "mx.example.test"
[receive.in]
listen = ["tcp:2525:interface=127.0.0.1"]
filters = ["spf", "dkim", "arc", "dmarc", "authres"]

[filters.spf]
plugin = "spf"
dns_servers = ["127.0.0.1:5353"]
on_temperror = "tempfail"
reject_fail = false

[filters.dkim]
plugin = "dkim"
dns_servers = ["127.0.0.1:5353"]
min_key_bits = 1024

[filters.arc]
plugin = "arc"
dns_servers = ["127.0.0.1:5353"]

[filters.dmarc]
plugin = "dmarc"
dns_servers = ["127.0.0.1:5353"]
quarantine = "hold"
report_log = true
reports = true
report_from = "dmarc-reports@example.test"
overrides = { "partner.example" = "none" }

[filters.authres]
plugin = "authres"
authserv_id = "mx.example.test"
"""


def env(tmp_path) -> FilterEnv:
    clock = Clock()
    return FilterEnv(reactor=clock, clock=clock, threadpool=None, hostname="mx.example.test",
                     data_dir=str(tmp_path))


def test_auth_filters_load_from_their_entry_points(tmp_path) -> None:
    config = parse_config(tomllib.loads(GOOD))
    built = load_filters(config.filters, env(tmp_path))
    assert sorted(built) == ["arc", "authres", "dkim", "dmarc", "spf"]
    assert built["dmarc"].overrides == {"partner.example": "none"}
    assert built["dmarc"].report_path == str(tmp_path / "dmarc" / "results.jsonl")
    assert built["authres"].authserv_id == "mx.example.test"
    assert built["spf"].dns.resolver.timeout == 5.0


def test_every_problem_is_reported_with_its_key(tmp_path) -> None:
    raw = tomllib.loads(GOOD)
    raw["filters"]["spf"]["on_temperror"] = "accept"
    raw["filters"]["dkim"]["min_key_bits"] = 100
    raw["filters"]["dmarc"]["overrides"] = {"x.example": "discard"}
    raw["filters"]["arc"]["dns_servers"] = ["dns.example"]
    raw["filters"]["authres"]["authserv_id"] = "has space"
    raw["filters"]["dmarc"]["quarantine"] = "drop"
    config = parse_config(raw)
    with pytest.raises(ConfigError) as info:
        load_filters(config.filters, env(tmp_path))
    problems = info.value.problems
    assert any(p.startswith("filters.spf: on_temperror") for p in problems)
    assert any(p.startswith("filters.dkim: min_key_bits") for p in problems)
    assert any(p.startswith("filters.dmarc: quarantine") for p in problems)
    assert any(p.startswith("filters.arc: dns_servers") for p in problems)
    assert any(p.startswith("filters.authres: authserv_id") for p in problems)
    assert len(problems) == 5


def test_unknown_keys_are_refused(tmp_path) -> None:
    raw = tomllib.loads(GOOD)
    raw["filters"]["dmarc"]["polcy"] = "reject"
    with pytest.raises(ConfigError) as info:
        load_filters(parse_config(raw).filters, env(tmp_path))
    assert info.value.problems == [
        "filters.dmarc: unknown key(s) polcy (known: discovery, dns_servers, dns_timeout, enforce, malformed_from, "
        "on_temperror, overrides, quarantine, report_from, report_log, report_org, reports, skip_authenticated)"]


def test_defaults_are_secure(tmp_path) -> None:
    raw = tomllib.loads(GOOD)
    raw["filters"] = {n: {"plugin": n} for n in ("spf", "dkim", "arc", "dmarc", "authres")}
    built = load_filters(parse_config(raw).filters, env(tmp_path))
    assert built["spf"].on_temperror == "tempfail" and built["dkim"].on_temperror == "tempfail"
    assert built["dmarc"].on_temperror == "tempfail" and built["dmarc"].enforce
    assert built["dmarc"].malformed_from == "reject" and built["dmarc"].quarantine == "hold"
    assert built["dkim"].min_key_bits == 1024
