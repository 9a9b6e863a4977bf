"""Every TOML block in README.rst and docs/*.rst is valid as written (issue 12, "done means").

A block that starts with a table header or ``key = value`` is TOML. A complete
configuration (with ``[server]``) must pass ``check_file`` with no warning;
a fragment is merged into a small complete configuration and must pass the
schema there, with every send connector it defines routed and every filter it
names defined. The files the examples name (``tls/mail.pem``, ``users.jsonl``,
the DKIM keys) are created first, as the walk-throughs create them.
etc/exmta.toml is checked in test_check_warnings.py.
"""
from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from support.rst import numbered_literal_blocks

from exmta.config.check import config_warnings
from exmta.config.load import ConfigError, load_config, parse_config

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = [REPO_ROOT / "README.rst", *sorted((REPO_ROOT / "docs").glob("*.rst"))]
TOML_START = re.compile(r"^\[|^[A-Za-z_][\w.-]* = ")

BASE = """
[server]
hostname = "mail.contoso.example"
data_dir = "data"
[accepted_domains]
"contoso.example" = "authoritative"
[receive.default]
listen = ["tcp:2525:interface=127.0.0.1"]
[send.internet]
mx = true
[[route]]
domains = ["*"]
connector = "internet"
"""


def literal_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, dedented text) of every ``::`` literal block."""
    return numbered_literal_blocks(path.read_text())


def toml_blocks() -> list[Any]:
    found = []
    for path in DOCS:
        for line, text in literal_blocks(path):
            if TOML_START.match(text.splitlines()[0]):
                found.append(pytest.param(path, text, id=f"{path.name}:{line}"))
    return found


BLOCKS = toml_blocks()


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif isinstance(value, list) and key == "route":
            out[key] = value + out.get(key, [])
        else:
            out[key] = value
    return out


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    """A directory holding the files the examples name, as the walk-throughs make them."""
    import trustme

    from exmta.auth.users import UserRecord, UsersFile
    from exmta.send.dkim_sign import generate_key

    ca = trustme.CA()
    cert = ca.issue_cert("mail.contoso.example")
    (tmp_path / "tls").mkdir()
    ca.cert_pem.write_to_path(str(tmp_path / "tls" / "corp-ca.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "tls" / "mail.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls" / "mail.pem"))
    UsersFile(str(tmp_path / "users.jsonl")).write({"alice@contoso.example": UserRecord(
        "alice@contoso.example", "$argon2id$x", [])})
    (tmp_path / "data" / "dkim").mkdir(parents=True)
    (tmp_path / "data" / "dkim" / "s2026r.pem").write_bytes(generate_key("rsa-sha256", 2048)[0])
    (tmp_path / "data" / "dkim" / "s2026e.key").write_bytes(generate_key("ed25519-sha256", 0)[0])
    # docs/exchange-online-oauth2.rst's app certificate: RSA, as Entra's RS256 assertions need
    app = trustme.CA(key_type=trustme.KeyType.RSA).issue_cert("exo-app.contoso.example",
                                                              key_type=trustme.KeyType.RSA)
    app.cert_chain_pems[0].write_to_path(str(tmp_path / "exo-app.pem"))
    app.private_key_pem.write_to_path(str(tmp_path / "exo-app.key"))
    (tmp_path / "exo-client-secret").write_text("the app's client secret\n")
    (tmp_path / "rules.toml").write_text((REPO_ROOT / "etc" / "rules.toml").read_text())  # [transport_rules] file
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_docs_have_toml_blocks():
    names = {p.values[0].name for p in BLOCKS}
    assert {"README.rst", "filters.rst"} <= names and len(BLOCKS) >= 12


@pytest.mark.parametrize("path, text", BLOCKS)
def test_toml_block_is_valid_as_written(workdir: Path, path: Path, text: str):
    raw = tomllib.loads(text)
    if "project" in raw or "build-system" in raw:  # docs/filters.rst's pyproject.toml: built in tests/packaging
        assert raw["project"]["entry-points"]["exmta.filters"]
        assert raw["build-system"]["build-backend"]
        return
    if "server" in raw:  # a complete configuration file: the walk-through writes it and runs it
        conf = workdir / "walk.toml"
        conf.write_text(text)
        config = load_config(str(conf))
        assert config_warnings(config) == []
        return
    if not any(isinstance(v, dict) for v in raw.values()):  # keys for a connector (the text says which)
        raw = {"receive": {"default": raw}}
        if "auth" in raw["receive"]["default"]:  # AUTH is offered after STARTTLS: the TLS walk-through's table
            raw["receive"]["default"]["tls"] = {"cert": "tls/mail.pem", "key": "tls/mail.key"}
    base = tomllib.loads(BASE)
    if "submission" in raw.get("receive", {}):  # README: changes to the TLS walk-through's submission connector
        base = tomllib.loads(next(t for _, t in literal_blocks(REPO_ROOT / "README.rst")
                                  if t.startswith("[server]") and "[receive.submission]" in t))
        base["receive"]["submission"].pop("relay_networks")
        base["receive"]["submission"]["auth"] = ["PLAIN", "LOGIN"]
    conf = workdir / "fragment.toml"
    try:
        config = parse_config(merge(base, raw), source=str(conf.with_name("exmta.toml")))
    except ConfigError as e:
        pytest.fail(f"{path.name}: the block is not valid in a configuration:\n{e}")
    routed = {r.connector for r in config.routes}
    for name in raw.get("send", {}):
        assert name in routed, f"[send.{name}] has no [[route]] in the example"
    used = {f for rc in config.receive for f in rc.filters}
    assert used <= set(config.filters)


def commented_sections(text: str) -> str:
    """etc/exmta.toml's commented-out sections (``# [table]`` and the ``# key = value`` lines under it), uncommented."""
    out, inside = [], False
    for line in text.splitlines():
        if re.match(r"^# \[", line):
            inside = True
        elif inside and re.match(r"^\s+#", line):
            continue  # the annotation of the key above
        elif not (inside and re.match(r"^# ([A-Za-z_][\w.-]* = |\s+\S|\])", line)):
            inside = False
        if inside:
            out.append(line[2:])
    return "\n".join(out)


def test_etc_example_commented_sections_are_valid(tmp_path: Path):
    """Every commented-out section of etc/exmta.toml, uncommented at once with its files in place, is valid."""
    import trustme

    from exmta.auth.users import UserRecord, UsersFile
    from exmta.send.dkim_sign import generate_key

    etc, var = tmp_path / "etc" / "exmta", tmp_path / "var" / "lib" / "exmta"
    (etc / "tls").mkdir(parents=True)
    (var / "dkim").mkdir(parents=True)
    root = trustme.CA()
    ca = root.create_child_ca()
    for name, host in (("mx", "mx1.contoso.example"), ("fabrikam", "mx.fabrikam.example")):
        cert = ca.issue_cert(host)
        cert.private_key_pem.write_to_path(str(etc / "tls" / f"{name}.key"))
        cert.cert_chain_pems[0].write_to_path(str(etc / "tls" / f"{name}.pem"))
    ca.cert_pem.write_to_path(str(etc / "tls" / "chain.pem"))
    for name in ("partner-ca.pem", "corp-ca.pem"):
        root.cert_pem.write_to_path(str(etc / "tls" / name))
    UsersFile(str(etc / "users.jsonl")).write({"a": UserRecord("a", "$argon2id$x", [])})
    (etc / "exo-client-secret").write_text("the app's client secret\n")
    (var / "dkim" / "s2026r.pem").write_bytes(generate_key("rsa-sha256", 2048)[0])
    (var / "dkim" / "s2026e.key").write_bytes(generate_key("ed25519-sha256", 0)[0])

    text = (REPO_ROOT / "etc" / "exmta.toml").read_text()
    sections = commented_sections(text)
    for table in ("[receive.default.tls]", "[[receive.default.tls.sni]]", "[auth.local]", "[auth.corp]",
                  "[send.dovecot]", "[alerts.rule.disk]", "[filters.tagger]", "[dkim]", "[filters.dmarc]",
                  "[filters.authres]"):
        assert table in sections, table
    both = (text + "\n" + sections).replace("/etc/exmta/", f"{etc}/").replace("/var/lib/exmta", str(var))
    try:
        config = parse_config(tomllib.loads(both))
    except ConfigError as e:
        pytest.fail(str(e))
    assert config.receive[0].tls is not None and len(config.dkim_keys) == 2 and "dmarc" in config.filters
