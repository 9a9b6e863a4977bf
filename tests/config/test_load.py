"""The TOML loader reports every problem at once, naming file and key."""
import pytest

from exmta.config.load import ConfigError, embedded_default, load_config, parse_config, parse_duration, parse_size

MINIMAL = """
[receive.in]
listen = ["tcp:2600:interface=127.0.0.1"]

[send.out]
smarthosts = ["[127.0.0.1]:2601"]

[[route]]
domains = ["*"]
connector = "out"
"""


def write(tmp_path, text):
    path = tmp_path / "exmta.toml"
    path.write_text(text)
    return str(path)


def test_minimal_file_loads(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.receive[0].listen == ("tcp:2600:interface=127.0.0.1",)
    assert config.send[0].smarthosts[0].host == "127.0.0.1"
    assert config.send[0].smarthosts[0].port == 2601
    assert config.routes[0].connector == "out"


def test_every_problem_reported_at_once(tmp_path):
    path = write(tmp_path, """
[server]
hostnme = "typo.example"
[receive.in]
listen = ["tcp:25", "bogus:1"]
max_recipients = "many"
command_timeout = "5 fortnights"
[send.out]
type = "carrier-pigeon"
[[route]]
domains = ["*"]
connector = "missing"
""")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(path)
    problems = info.value.problems
    assert any(p.startswith("server.hostnme: unknown setting") for p in problems)
    assert any(p.startswith("receive.in.listen:") and "bogus" in p for p in problems)
    assert any(p.startswith("receive.in.max_recipients: expected a whole number") for p in problems)
    assert any(p.startswith("receive.in.command_timeout:") for p in problems)
    assert any(p.startswith("send.out.type: must be one of") for p in problems)
    assert any(p.startswith("route[1].connector: no [send.missing]") for p in problems)
    assert len(problems) == 6


def test_not_toml(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "this is = = not toml"))
    assert "is not valid TOML" in info.value.problems[0]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "nope.toml"))
    assert info.value.problems == ["the file does not exist"]


def test_wrong_types_everywhere():
    with pytest.raises(ConfigError) as info:
        parse_config({"receive": "x", "queue": {"retry_schedule": []}, "route": {}})
    problems = info.value.problems
    assert "receive: must be a table, not str" in problems
    assert "queue.retry_schedule: needs at least one interval" in problems
    assert "route: must be an array of tables ([[route]])" in problems


def test_filter_reference_checked():
    with pytest.raises(ConfigError) as info:
        parse_config({"receive": {"in": {"filters": ["tagger"]}}, "filters": {"other": {"tag": "x"}}})
    assert "receive.in.filters: no [filters.tagger] section" in info.value.problems
    assert any(p.startswith("filters.other.plugin: is required") for p in info.value.problems)


def test_duplicate_listener():
    with pytest.raises(ConfigError) as info:
        parse_config({"receive": {"a": {"listen": ["tcp:2700"]}, "b": {"listen": ["tcp:2700"]}}})
    assert any(p.startswith("receive.b.listen: 'tcp:2700' is also used by receive.a with the same remote_ranges")
               for p in info.value.problems)


@pytest.mark.parametrize("text,seconds", [(30, 30.0), ("30s", 30.0), ("5m", 300.0), ("4h", 14400.0),
                                          ("5d", 432000.0), ("250ms", 0.25)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text,octets", [(1024, 1024), ("35MiB", 35 * 1024 * 1024), ("10MB", 10_000_000),
                                         ("1kib", 1024)])
def test_sizes(text, octets):
    assert parse_size(text) == octets


@pytest.mark.parametrize("bad", [-1, "ten", True, "5 parsecs"])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_embedded_default_is_self_contained(tmp_path):
    config = embedded_default(str(tmp_path))
    assert config.receive[0].listen == ("tcp:2525:interface=127.0.0.1",)
    assert {d.name for d in config.accepted_domains} == {"example.test", "localhost"}
    assert config.accepted_domain("EXAMPLE.test.").name == "example.test"
    assert config.accepted_domain("other.test") is None
    local = config.send_connector("local")
    assert local.kind == "maildir" and local.maildir_root == str(tmp_path / "mail")


@pytest.mark.parametrize("workers, spool_io, main_io", [
    (0, None, "threads"), (2, None, "inline"), (0, "inline", "inline"), (2, "threads", "threads"),
])
def test_spool_io_of_the_main_process(tmp_path, workers, spool_io, main_io):
    server = f"[server]\nreceive_workers = {workers}\n"
    if spool_io:
        server += f'spool_io = "{spool_io}"\n'
    config = load_config(write(tmp_path, server + MINIMAL))
    assert config.main_spool_io == main_io


def test_spool_io_must_be_a_known_mode(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, '[server]\nspool_io = "async"\n' + MINIMAL))
    assert [p for p in info.value.problems if p.startswith("server.spool_io: must be one of")]


def test_spool_sync_and_worker_nice(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert (config.spool_sync_for(worker=True), config.spool_sync_for(worker=False)) == ("syncfs", "fsync")
    assert config.receive_worker_nice == 10
    config = load_config(write(tmp_path, '[server]\nspool_sync = "fsync"\nreceive_worker_nice = 0\n' + MINIMAL))
    assert config.spool_sync_for(worker=True) == "fsync" and config.receive_worker_nice == 0
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, '[server]\nspool_sync = "sync"\nreceive_worker_nice = 40\n' + MINIMAL))
    problems = info.value.problems
    assert [p for p in problems if p.startswith("server.spool_sync: must be one of")]
    assert [p for p in problems if p.startswith("server.receive_worker_nice: must be at most 19")]


def test_receive_workers_auto_is_one_per_cpu_and_the_default(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    config = load_config(write(tmp_path, '[server]\nreceive_workers = "auto"\n' + MINIMAL))
    assert config.receive_workers == 3 and config.main_spool_io == "inline"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert load_config(write(tmp_path, '[server]\nreceive_workers = "auto"\n' + MINIMAL)).receive_workers == 0
    # "auto" is the default, of a file without the key and of the embedded default; 0 stays possible
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert load_config(write(tmp_path, MINIMAL)).receive_workers == 4
    assert embedded_default(str(tmp_path)).receive_workers == 4
    assert load_config(write(tmp_path, "[server]\nreceive_workers = 0\n" + MINIMAL)).receive_workers == 0
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, '[server]\nreceive_workers = "many"\n' + MINIMAL))
    assert info.value.problems == ["server.receive_workers: expected a whole number or \"auto\" (one per CPU), "
                                   "not 'many'"]
