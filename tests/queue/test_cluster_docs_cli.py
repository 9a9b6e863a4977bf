"""The cluster's commands and documents as written: `exmta db`, `exmta cluster`, README's "Running several
nodes", docs/cluster.rst and etc/cluster/ (every TOML block loads; the commands run against a real
PostgreSQL)."""
from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import psycopg
import pytest

from support.rst import literal_blocks

from exmta.cli import main
from exmta.config.load import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]



BASE = """
[server]
hostname = "mx1.example.com"

[accepted_domains]
"example.com" = "authoritative"

[receive.inbound]
listen = ["tcp:2525:interface=127.0.0.1"]

[send.exchange]
type = "smtp"
smarthosts = ["[exchange.example.com]:25"]

[[route]]
domains = ["example.com"]
connector = "exchange"
"""


@pytest.mark.parametrize("doc", ["README.rst", "docs/cluster.rst"])
def test_every_toml_block_of_the_cluster_docs_loads(doc: str) -> None:
    text = (REPO / doc).read_text()
    if doc == "README.rst":
        text = text[text.index("Running several nodes\n"):text.index("Reloading and stopping\n")]
    blocks = [b for b in literal_blocks(text) if "[postgres]" in b or "[queue]" in b]
    assert blocks, f"{doc} has no cluster TOML block"
    for block in blocks:
        tomllib.loads(block)
        config = parse_config(tomllib.loads(BASE + block))
        assert config.queue.store == "postgres" and config.postgres.node == "mx1"
        assert config.postgres.dsn.startswith("host=db.example.com")


def test_the_example_node_passes_check_config() -> None:
    assert main(["check-config", str(REPO / "etc" / "cluster" / "node.toml")]) == 0


def test_postgres_without_a_dsn_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BASE + '\n[queue]\nstore = "postgres"\n\n[postgres]\nlease = "1s"\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    text = str(e.value)
    assert "postgres.dsn: is required" in text and "postgres.lease: must be at least 5 seconds" in text
    assert main(["check-config", str(bad)]) == 2


def test_db_and_cluster_commands_against_postgresql(tmp_path: Path, pg_cluster, capsys) -> None:
    dsn = pg_cluster.create_database()
    conf = tmp_path / "node.toml"
    conf.write_text(BASE + f'\n[queue]\nstore = "postgres"\n\n[postgres]\ndsn = "{dsn}"\nnode = "mx1"\n')
    assert main(["db", "status", "-c", str(conf)]) == 1
    assert "no exmta schema" in capsys.readouterr().out
    assert main(["db", "init", "-c", str(conf)]) == 0
    assert "schema migrated to version 5 (applied: 1, 2, 3, 4, 5)" in capsys.readouterr().out
    assert main(["db", "migrate", "-c", str(conf)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["db", "status", "-c", str(conf)]) == 0
    assert "current" in capsys.readouterr().out
    # a node registers by its heartbeat; drain and undrain flip its flag
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO exmta_node (name, started_at, heartbeat, pid) VALUES ('mx2', now(), now(), 1)")
    assert main(["cluster", "drain", "mx2", "-c", str(conf)]) == 0
    assert main(["cluster", "drain", "nosuch", "-c", str(conf)]) == 1
    capsys.readouterr()
    assert main(["cluster", "status", "-c", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "mx2" in out and "draining" in out and "queue: incoming 0" in out
    assert main(["cluster", "undrain", "mx2", "-c", str(conf)]) == 0
    capsys.readouterr()
    assert main(["cluster", "status", "--json", "-c", str(conf)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["nodes"][0]["name"] == "mx2" and data["nodes"][0]["draining"] is False
    spool = tmp_path / "spool.toml"
    spool.write_text(BASE)
    assert main(["cluster", "status", "-c", str(spool)]) == 2


def test_haproxy_example_is_valid_for_haproxy(tmp_path: Path) -> None:
    """haproxy -c on etc/cluster/haproxy.cfg as written (the kill test runs it with loopback addresses)."""
    r = subprocess.run(["haproxy", "-c", "-f", str(REPO / "etc" / "cluster" / "haproxy.cfg")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
