"""check-config's warnings: valid but unsafe or useless configurations (issue 12, items 4, 6, 13)."""
from __future__ import annotations

from pathlib import Path

from exmta.cli import main as exmta_cli
from exmta.config.check import config_warnings
from exmta.config.load import embedded_default, parse_config

REPO_ROOT = Path(__file__).resolve().parents[2]
ROUTED = {"accepted_domains": {"contoso.example": "authoritative"},
          "send": {"out": {"smarthosts": ["[192.0.2.1]:25"]}},
          "route": [{"domains": ["*"], "connector": "out"}]}


def warnings_of(receive: dict, **top) -> list[str]:
    raw = dict(ROUTED, receive=receive, **top)
    return config_warnings(parse_config(raw))


def test_internet_facing_connector_relaying_for_private_ranges_warns():
    (w,) = warnings_of({"edge": {"listen": ["tcp:25"], "relay_networks": ["10.0.0.0/8", "192.0.2.0/24"]}})
    assert w.startswith("receive.edge.relay_networks: 10.0.0.0/8 may relay through a connector open to the "
                        "whole internet (remote_ranges 0.0.0.0/0, ::/0)")
    assert "open relay" in w and "separate connector" in w


def test_relay_on_a_restricted_or_loopback_connector_is_fine():
    assert warnings_of({"lan": {"listen": ["tcp:25"], "remote_ranges": ["10.0.0.0/8"],
                                "relay_networks": ["10.0.0.0/8"]},
                        "local": {"listen": ["tcp:2525:interface=127.0.0.1"], "relay_networks": ["127.0.0.0/8"]},
                        "edge": {"listen": ["tcp:25"], "relay_networks": ["192.0.2.0/24"]}}) == []
    assert config_warnings(embedded_default()) == []


def test_no_accepted_domains_and_no_routes_warn():
    ws = config_warnings(parse_config({"receive": {"in": {}}}))
    assert any(w.startswith("accepted_domains: none configured") and "554 5.7.1" in w for w in ws)
    assert any(w.startswith("route: none configured") and "550 5.4.4" in w for w in ws)


def test_metrics_without_prometheus_client_warns(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "prometheus_client" else real(n, *a))
    (w,) = warnings_of({"in": {}})
    assert w.startswith("metrics.enabled: is true but prometheus-client is not installed")
    assert warnings_of({"in": {}}, metrics={"enabled": False}) == []


def test_the_example_file_is_safe_to_copy(capsys):
    """etc/exmta.toml passes with no warning: the edge relays for nobody, the LAN relay only for the LAN."""
    path = str(REPO_ROOT / "etc" / "exmta.toml")
    assert exmta_cli(["check-config", path]) == 0
    out = capsys.readouterr()
    assert "0 warning(s)" in out.out and "warning:" not in out.err
    config = parse_config(__import__("tomllib").loads(Path(path).read_text()))
    edge, lan = (next(rc for rc in config.receive if rc.name == n) for n in ("default", "lan-relay"))
    assert edge.relay_networks == () and edge.max_text_line == 0
    assert lan.remote_ranges == lan.relay_networks == ("10.0.0.0/8",)


def test_listen_takes_a_string_or_a_list_everywhere():
    """[admin] listen was a list and [metrics] listen a string; each now takes both (issue 12, item 14)."""
    one, two = "tcp:9125:interface=127.0.0.1", "tcp:9126:interface=127.0.0.1"
    for form in (one, [one]):
        c = parse_config({"receive": {"in": {"listen": form}}, "admin": {"listen": form}, "metrics": {"listen": form}})
        assert c.receive[0].listen == c.admin.listen == (one,) and c.metrics.listen == one
    c = parse_config({"receive": {"in": {}}, "metrics": {"listen": [one, two]}})
    assert c.metrics.listen == (one, two)
    from exmta.config.load import ConfigError
    import pytest

    with pytest.raises(ConfigError) as info:
        parse_config({"receive": {"in": {}}, "metrics": {"listen": []}})
    assert info.value.problems == ["metrics.listen: needs at least one endpoint, e.g. \"tcp:9125:interface=127.0.0.1\" "
                                   "(or leave it out)"]


def test_several_metrics_endpoints_get_one_listener_each(tmp_path):
    from twisted.internet.task import Clock

    from exmta.observe.runtime import build_observability
    from exmta.testing.memstore import MemoryStore

    eps = ["tcp:9125:interface=127.0.0.1", "unix:" + str(tmp_path / "m.sock")]
    c = parse_config({"receive": {"in": {}}, "metrics": {"listen": eps}})
    clock = Clock()
    obs = build_observability(c, clock, MemoryStore(clock), {"queue": str(tmp_path), "data": str(tmp_path)})
    assert len(list(obs.http)) == 2
