"""[logs], [admin] and protocol_log: defaults, conversion and errors naming the key."""
from __future__ import annotations

import pytest

from exmta.config.load import ConfigError, embedded_default, parse_config

BASE = {"receive": {"default": {}}}


def test_defaults_are_secure() -> None:
    c = parse_config(BASE)
    assert c.admin.enabled and c.admin.listen == ("tcp:8025:interface=127.0.0.1",)
    assert c.admin.allowed_networks == ("127.0.0.0/8", "::1/128") and c.admin.token_file is None
    assert c.receive[0].protocol_log == "off"
    assert c.logs.rotate_size == 64 * 1024 * 1024 and c.logs.rotate_age == 86400.0
    assert c.logs.keep_age == 30 * 86400.0 and c.logs.keep_size == 1024 ** 3
    assert embedded_default("/tmp/x").admin.listen == ("tcp:8025:interface=127.0.0.1",)


def test_values_are_converted() -> None:
    c = parse_config({
        "receive": {"default": {"protocol_log": "verbose"}},
        "send": {"out": {"type": "smtp", "smarthosts": ["[127.0.0.1]:25"], "protocol_log": "verbose"}},
        "logs": {"protocol_dir": "/var/log/exmta", "rotate_size": "10MiB", "rotate_age": "1h",
                 "keep_age": "7d", "keep_size": "100MiB"},
        "admin": {"listen": ["unix:/run/exmta/admin.sock", "tcp:9025:interface=127.0.0.1"],
                  "token_file": "/etc/exmta/admin.token", "allowed_networks": ["10.0.0.0/8"]},
    })
    assert c.receive[0].protocol_log == "verbose" and c.send[0].protocol_log == "verbose"
    assert (c.logs.rotate_size, c.logs.rotate_age, c.logs.keep_age, c.logs.keep_size) == (
        10 * 1024 ** 2, 3600.0, 7 * 86400.0, 100 * 1024 ** 2)
    assert c.logs.protocol_dir == "/var/log/exmta"
    assert c.admin.listen[0] == "unix:/run/exmta/admin.sock" and c.admin.allowed_networks == ("10.0.0.0/8",)


def test_every_problem_names_its_key() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({
            "receive": {"default": {"protocol_log": "debug"}},
            "send": {"out": {"type": "smtp", "protocol_log": True}},
            "logs": {"rotate_size": 100, "rotate_age": "10s", "keep_size": "1MiB", "colour": "red"},
            "admin": {"listen": ["haproxy:tcp:80"], "allowed_networks": ["everyone"], "enabled": "yes"},
        })
    text = str(e.value)
    for key in ("receive.default.protocol_log", "send.out.protocol_log", "logs.rotate_size", "logs.rotate_age",
                "logs.colour", "admin.listen", "admin.allowed_networks", "admin.enabled"):
        assert key in text, key


def test_keep_size_below_rotate_size_is_an_error() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, "logs": {"rotate_size": "10MiB", "keep_size": "1MiB"}})
    assert "logs.keep_size" in str(e.value)


def test_admin_needs_a_listener_when_enabled() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, "admin": {"listen": []}})
    assert "admin.listen" in str(e.value)
    assert parse_config({**BASE, "admin": {"listen": [], "enabled": False}}).admin.enabled is False
