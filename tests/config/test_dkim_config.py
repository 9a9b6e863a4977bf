"""[dkim] signing keys and send.NAME.dkim_sign."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from exmta.config.load import ConfigError, parse_config
from exmta.send.dkim_sign import generate_key

BASE = """
[server]
hostname = "mx.example.test"
data_dir = "{data}"
[receive.in]
listen = ["tcp:2525:interface=127.0.0.1"]
[send.out]
type = "smtp"
smarthosts = ["127.0.0.1:2526"]
dkim_sign = true
"""


def write_keys(tmp_path: Path) -> None:
    rsa, _ = generate_key("rsa-sha256", 2048)
    ed, _ = generate_key("ed25519-sha256")
    (tmp_path / "s1.pem").write_bytes(rsa)
    (tmp_path / "ed.key").write_bytes(ed)


def test_keys_and_dkim_sign_are_read(tmp_path: Path) -> None:
    write_keys(tmp_path)
    text = BASE.format(data=tmp_path) + f"""
[dkim]
keys = [
  {{ domain = "Example.Test", selector = "s1", algorithm = "rsa-sha256", key_file = "{tmp_path}/s1.pem" }},
  {{ domain = "example.test", selector = "ed", algorithm = "ed25519-sha256", key_file = "ed.key" }},
]
"""
    config = parse_config(tomllib.loads(text))
    assert config.send[0].dkim_sign is True
    assert [(k.domain, k.selector, k.algorithm) for k in config.dkim_keys] == [
        ("example.test", "s1", "rsa-sha256"), ("example.test", "ed", "ed25519-sha256")]
    assert config.dkim_keys[1].key_file == str(tmp_path / "ed.key")  # relative to data_dir


def test_defaults_no_keys_no_signing(tmp_path: Path) -> None:
    config = parse_config(tomllib.loads(BASE.format(data=tmp_path).replace("dkim_sign = true\n", "")))
    assert config.dkim_keys == () and config.send[0].dkim_sign is False


def test_every_key_problem_is_named(tmp_path: Path) -> None:
    write_keys(tmp_path)
    text = BASE.format(data=tmp_path) + f"""
[dkim]
keys = [
  {{ domain = "example.test", selector = "s1", algorithm = "rsa-sha1", key_file = "s1.pem" }},
  {{ domain = "example.test", selector = "bad selector", key_file = "s1.pem" }},
  {{ domain = "example.test", selector = "s2", key_file = "missing.pem" }},
  {{ domain = "example.test", selector = "s3", algorithm = "ed25519-sha256", key_file = "s1.pem" }},
  {{ domain = "-bad-", selector = "s4", key_file = "s1.pem" }},
  {{ domain = "example.test", selector = "s5", key_file = "s1.pem", colour = "blue" }},
  "not a table",
]
extra = 1
"""
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text))
    problems = info.value.problems
    expected = ["dkim.keys[1].algorithm", "dkim.keys[2].selector", "dkim.keys[3].key_file: cannot read",
                "dkim.keys[4].key_file", "dkim.keys[5].domain", "dkim.keys[6].colour", "dkim.keys[7]",
                "dkim.extra: unknown setting"]
    for prefix in expected:
        assert any(p.startswith(prefix) for p in problems), (prefix, problems)
    assert len(problems) == len(expected)
    assert "send.out.dkim_sign" not in " ".join(problems)


def test_service_gives_signing_connectors_a_signer(tmp_path: Path) -> None:
    from twisted.internet.task import Clock

    from exmta.service import make_send_connectors

    write_keys(tmp_path)
    text = BASE.format(data=tmp_path) + """
[send.plain]
type = "smtp"
smarthosts = ["127.0.0.1:2527"]
[dkim]
keys = [{ domain = "example.test", selector = "s1", key_file = "s1.pem" }]
"""
    config = parse_config(tomllib.loads(text))
    connectors = make_send_connectors(config, Clock(), None)
    assert connectors["out"].signer is not None and connectors["plain"].signer is None
    assert [k.selector for k in connectors["out"].signer.keys["example.test"]] == ["s1"]
