"""Config keys of connector security: remote_ranges, permission_groups, limits, back pressure, recipient list."""
from __future__ import annotations

import pytest

from exmta.config.load import ConfigError, embedded_default, parse_config
from exmta.config.schema import BackPressureConfig, ReceiveConnectorConfig


def problems(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value.problems


def test_secure_defaults():
    rc = ReceiveConnectorConfig(name="x")
    assert rc.remote_ranges == ("0.0.0.0/0", "::/0")
    assert rc.permission_groups == ("anonymous", "authenticated")
    assert not rc.externally_secured
    assert (rc.max_connections, rc.max_connections_per_ip) == (5000, 20)
    assert BackPressureConfig().min_free_disk == 100 * 1024 * 1024
    cfg = parse_config({"receive": {"in": {}}})
    assert cfg.recipient_list is None and cfg.back_pressure == BackPressureConfig()
    assert embedded_default().receive[0].permission_groups == ("anonymous", "authenticated")


def test_all_keys_read(tmp_path):
    listing = tmp_path / "rcpts"
    listing.write_text("a@x.test\n")
    cfg = parse_config({
        "server": {"recipient_list": str(listing)},
        "back_pressure": {"min_free_disk": "1GiB", "max_memory": "2GiB", "max_queued_messages": 10000,
                          "check_interval": "10s"},
        "receive": {"in": {
            "remote_ranges": ["10.0.0.0/8", "2001:db8::/32"], "permission_groups": ["exchange_servers"],
            "externally_secured": True, "max_connections": 10, "max_connections_per_ip": 2,
            "messages_per_minute_per_ip": 3, "recipients_per_minute_per_ip": 4,
            "messages_per_minute_per_user": 5, "recipients_per_minute_per_user": 6,
        }},
    })
    rc = cfg.receive[0]
    assert rc.remote_ranges == ("10.0.0.0/8", "2001:db8::/32")
    assert rc.permission_groups == ("exchange_servers",) and rc.externally_secured
    assert (rc.max_connections, rc.max_connections_per_ip, rc.messages_per_minute_per_ip,
            rc.recipients_per_minute_per_ip, rc.messages_per_minute_per_user,
            rc.recipients_per_minute_per_user) == (10, 2, 3, 4, 5, 6)
    assert cfg.back_pressure == BackPressureConfig(2**30, 2 * 2**30, 10000, 10.0)
    assert cfg.recipient_list == str(listing)


def test_every_problem_named_by_its_key(tmp_path):
    ps = problems({
        "server": {"recipient_list": str(tmp_path / "missing")},
        "back_pressure": {"min_free_disk": "lots", "check_interval": 0, "max_queued": 1},
        "receive": {
            "a": {"remote_ranges": ["10.0.0.0/33"], "permission_groups": ["everyone"], "max_connections": -1},
            "b": {"permission_groups": ["exchange_servers"]},
            "c": {"externally_secured": True, "permission_groups": ["exchange_servers"]},
            "d": {"remote_ranges": []},
        },
    })
    text = "\n".join(ps)
    assert "server.recipient_list: " in text and "the file does not exist" in text
    assert any(p.startswith("back_pressure.min_free_disk: expected a size") for p in ps)
    assert "back_pressure.check_interval: must be more than 0" in ps
    assert any(p.startswith("back_pressure.max_queued: unknown setting") for p in ps)
    assert any(p.startswith("receive.a.remote_ranges: item 1 ('10.0.0.0/33')") for p in ps)
    assert any(p.startswith("receive.a.permission_groups: item 1 ('everyone'): must be one of") for p in ps)
    assert any(p.startswith("receive.a.max_connections: must be at least 0") for p in ps)
    assert any(p.startswith("receive.b.permission_groups: exchange_servers needs externally_secured = true")
               for p in ps)
    assert any(p.startswith("receive.c.externally_secured: cannot be true while remote_ranges admits every")
               for p in ps)
    assert any(p.startswith("receive.d.remote_ranges: needs at least one range") for p in ps)


def test_connectors_may_share_an_endpoint_when_their_ranges_differ():
    cfg = parse_config({"receive": {
        "internet": {"listen": ["tcp:2700"]},
        "apps": {"listen": ["tcp:2700"], "remote_ranges": ["127.0.0.2/32"]},
        "lan": {"listen": ["tcp:2700"], "remote_ranges": ["10.0.0.0/8", "2001:db8::/32"]},
    }})
    assert [rc.name for rc in cfg.receive] == ["internet", "apps", "lan"]
    ps = problems({"receive": {
        "lan": {"listen": ["tcp:2700"], "remote_ranges": ["10.0.0.0/8"]},
        "lan2": {"listen": ["tcp:2700"], "remote_ranges": ["10.0.0.1/8", "192.0.2.0/24"]},
    }})
    assert ps == ["receive.lan2.listen: 'tcp:2700' is also used by receive.lan with the same remote_ranges "
                  "(10.0.0.0/8); give each connector on one endpoint different ranges"]


def test_the_readme_example_loads_and_dispatches():
    """The three connectors of README.rst's "Receive connectors" section share port 25 as described."""
    import textwrap
    import tomllib
    from pathlib import Path

    from exmta.receive.ranges import select_connector
    from exmta.receive.wiring import make_dispatchers

    readme = (Path(__file__).resolve().parents[2] / "README.rst").read_text()
    section = readme.split("Receive connectors: ranges, permission groups, limits", 1)[1]
    lines = []
    for line in section.split("::\n\n", 1)[1].splitlines():
        if line and not line.startswith(" "):
            break  # the end of the literal block
        lines.append(line)
    block = "\n".join(lines)
    cfg = parse_config(tomllib.loads(textwrap.dedent(block)))
    assert [rc.name for rc in cfg.receive] == ["internet", "apps", "hybrid"]
    ((endpoint, dispatcher),) = make_dispatchers(cfg.receive, [object()] * 3)
    assert endpoint == "tcp:25"
    pick = lambda ip: select_connector(dispatcher.entries, ip).name  # noqa: E731
    assert (pick("203.0.113.9"), pick("10.1.2.3"), pick("10.0.5.11"), pick("10.0.5.12")) == \
        ("internet", "apps", "hybrid", "internet")
