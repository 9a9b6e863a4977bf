"""The milter filter in the configuration: check-config and twistd refuse the same bad settings,
a good configuration builds the service, and a reload (SIGHUP) reaches the running filters."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.internet.task import Clock

from exmta.cli import main as exmta_cli
from exmta.config.check import check_file
from exmta.config.load import load_config
from exmta.observe.reload import ConfigReloader
from exmta.plugins import FilterEnv, load_filters
from exmta.service import make_receive_factory
from exmta.testing.memstore import MemoryStore

REPO_ROOT = Path(__file__).resolve().parents[2]
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; "
          "sys.argv[0] = 'twistd'; run()"]

CONFIG = """
[server]
hostname = "mx.example.test"
data_dir = "{data}"

[accepted_domains]
"example.test" = "authoritative"

[receive.inbound]
listen = ["tcp:0:interface=127.0.0.1"]
filters = ["milter"]

[filters.milter]
plugin = "milter"
timeout = "10m"

[[filters.milter.milters]]
name = "opendkim"
socket = "inet:127.0.0.1:8891"
default_action = "accept"

[[filters.milter.milters]]
name = "clamav"
socket = "unix:/run/clamav/clamav-milter.ctl"
command_timeout = "30s"
content_timeout = "5m"
macros = {{ eom = ["i", "{{auth_authen}}"] }}

[send.local]
type = "maildir"

[[route]]
domains = ["example.test"]
connector = "local"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exmta.toml"
    path.write_text(text)
    return path


def test_a_good_configuration_checks_and_builds(tmp_path, capsys):
    path = write(tmp_path, CONFIG.format(data=tmp_path / "data"))
    assert exmta_cli(["check-config", str(path)]) == 0, capsys.readouterr()
    config, _ = check_file(str(path), data_dir=str(tmp_path / "data"))
    clock = Clock()
    env = FilterEnv(reactor=clock, clock=clock, threadpool=None, hostname=config.hostname, data_dir=config.data_dir)
    [flt] = load_filters(config.filters, env).values()
    assert [(m.name, m.default_action) for m in flt.milters] == [("opendkim", "accept"), ("clamav", "tempfail")]
    assert flt.milters[1].macros["eom"] == ("i", "{auth_authen}") and flt.milters[1].content_timeout == 300.0


def test_check_config_and_twistd_refuse_the_same_bad_milter(tmp_path, capsys):
    text = CONFIG.format(data=tmp_path / "data").replace('default_action = "accept"', 'default_action = "bounce"')
    path = write(tmp_path, text)
    expected = "filters.milter: milters[0].default_action must be one of tempfail, accept, reject, quarantine"
    assert exmta_cli(["check-config", str(path)]) == 2
    assert expected in capsys.readouterr().err
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(TWISTD + ["-n", "--pidfile=", "exmta", "-c", str(path), "--data", str(tmp_path / "d")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and expected in proc.stdout + proc.stderr


def test_reload_reaches_the_filter(tmp_path):
    path = write(tmp_path, CONFIG.format(data=tmp_path / "data"))
    config = load_config(str(path))
    clock = Clock()
    env = FilterEnv(reactor=clock, clock=clock, threadpool=None, hostname=config.hostname, data_dir=config.data_dir)
    filters = load_filters(config.filters, env)
    store = MemoryStore(clock)
    factories = {rc.name: make_receive_factory(config, rc, store, filters, None, clock) for rc in config.receive}

    def actions() -> list[str]:
        [flt] = factories["inbound"].filters.filters
        return [m.default_action for m in flt.milters]

    assert actions() == ["accept", "tempfail"]
    path.write_text(path.read_text().replace('default_action = "accept"', 'default_action = "reject"'))
    reloader = ConfigReloader(config, clock, factories=factories, filters=filters, filter_env=env)
    ok, messages = reloader.reload()
    assert ok, messages
    assert actions() == ["reject", "tempfail"]
    path.write_text(path.read_text().replace('socket = "inet:127.0.0.1:8891"', 'socket = "inet:nowhere"'))
    ok, messages = reloader.reload()
    assert not ok and any("filters.milter: socket 'inet:nowhere'" in m for m in messages)
    assert actions() == ["reject", "tempfail"]  # the running filter stays
