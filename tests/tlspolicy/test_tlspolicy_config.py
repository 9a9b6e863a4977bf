"""The [tls_policy] section: defaults, the example file, errors that name the key."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from exmta.config.load import ConfigError, load_config, parse_config
from exmta.tlspolicy.config import TLSPolicyConfig

ETC = Path(__file__).resolve().parents[2] / "etc" / "exmta.toml"
RECEIVE = {"receive": {"in": {"listen": ["tcp:2525"]}}}


def test_example_file_documents_every_key_and_uncommented_loads(tmp_path: Path) -> None:
    text = ETC.read_text()
    section = text[text.index("[tls_policy]"):text.index("[[route]]")]
    for f in dataclasses.fields(TLSPolicyConfig):
        assert re.search(rf"^#? ?{f.name}\b|^\[tls_policy\.{f.name}\]", section, re.M), f.name
    assert load_config(str(ETC)).tls_policy.mta_sts is True
    roots = tmp_path / "roots.pem"
    roots.write_text("")
    uncommented = re.sub(r"^# (dane_resolvers|cache_dir|tls_rpt_\w+|https_port|\"broken)", r"\1", text, flags=re.M)
    uncommented = uncommented.replace('# ca_file = "/etc/exmta/tls/roots.pem"', f'ca_file = "{roots}"')
    path = tmp_path / "exmta.toml"
    path.write_text(uncommented.replace("dane = false", "dane = true"))
    cfg = load_config(str(path)).tls_policy
    assert cfg.dane and cfg.dane_resolvers == ("127.0.0.1:53",)
    assert cfg.overrides == {"broken-policy.example": "testing"}
    assert cfg.cache_dir == "/var/lib/exmta/tls-policy" and cfg.max_policy_size == 65536 and cfg.txt_recheck == 300


def test_defaults_and_cache_under_data_dir() -> None:
    cfg = parse_config(dict(RECEIVE, server={"data_dir": "/srv/x"})).tls_policy
    assert cfg.mta_sts and not cfg.dane and cfg.cache_dir == "/srv/x/tls-policy" and cfg.https_port == 443


def test_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(dict(RECEIVE, tls_policy={"dane": True, "overrides": {"a.example": "sometimes"},
                                               "typo": 1, "dane_resolvers": []}))
    text = str(e.value)
    assert "tls_policy.overrides.a.example: must be one of none, testing, enforce" in text
    assert "tls_policy.typo: unknown setting" in text
    assert "tls_policy.dane_resolvers: dane = true needs" in text


def test_docs_toml_block_loads() -> None:
    import tomllib

    doc = (Path(__file__).resolve().parents[2] / "docs" / "tls-policy.rst").read_text()
    lines = []
    for line in doc.split("as the tests load it::\n\n", 1)[1].split("\n"):
        if line and not line.startswith("    "):
            break  # the end of the indented block
        lines.append(line[4:])
    block = "\n".join(lines)
    cfg = parse_config(dict(RECEIVE, **tomllib.loads(block))).tls_policy
    assert cfg.dane and cfg.fetch_timeout == 20.0
    assert cfg.overrides == {"legacy.example": "testing", "*.lab.example": "none"}


def test_wiring_gives_mx_connectors_an_engine_and_the_report_service(tmp_path: Path) -> None:
    from twisted.application.service import MultiService
    from twisted.internet import reactor

    from exmta.service import make_send_connectors
    from exmta.testing.memstore import MemoryStore
    from exmta.tlspolicy.engine import TLSPolicyEngine
    from exmta.tlspolicy.report import TLSResultLog, add_tls_report_service

    raw = dict(RECEIVE, server={"data_dir": str(tmp_path)}, tls_policy={"tls_rpt": True},
               send={"internet": {"type": "smtp", "dns_servers": ["127.0.0.1:5353"]},
                     "hub": {"type": "smtp", "smarthosts": ["192.0.2.1"]}})
    config = parse_config(raw)
    connectors = make_send_connectors(config, reactor, None)
    engine = connectors["internet"].tls_policy
    assert isinstance(engine, TLSPolicyEngine) and isinstance(engine.reporter, TLSResultLog)
    assert engine.reporter.path == str(tmp_path / "tls-policy" / "tlsrpt" / "results.jsonl")
    assert connectors["hub"].tls_policy is None  # smart hosts: the connector's own TLS settings
    parent = MultiService()
    service = add_tls_report_service(parent, config, MemoryStore(reactor), reactor, None, connectors)
    assert service is not None and service.parent is parent and service.name == "tls-reports"
    off = parse_config(dict(raw, tls_policy={"mta_sts": False}))
    assert make_send_connectors(off, reactor, None)["internet"].tls_policy is None
