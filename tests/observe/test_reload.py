"""SIGHUP reload on real objects (scheduler, receive factory, alert manager) with task.Clock and StringTransport."""
from __future__ import annotations

from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from exmta.config.load import load_config
from exmta.observe.alerts import AlertManager, AlertRule, Sources
from exmta.observe.reload import ConfigReloader
from exmta.queue.scheduler import DeliveryScheduler
from exmta.service import make_receive_factory
from exmta.testing.memstore import MemoryStore

BASE = """
[server]
hostname = "mx.example.test"
data_dir = "{data}"

[accepted_domains]
"example.test" = "authoritative"

[receive.default]
listen = ["tcp:2525:interface=127.0.0.1"]
relay_networks = ["127.0.0.0/8"]

[send.local]
type = "maildir"

[send.relay]
type = "smtp"
smarthosts = ["[127.0.0.1]:2600"]

[[route]]
domains = ["example.test"]
connector = "local"

[[route]]
domains = ["*"]
connector = "relay"

[queue]
retry_schedule = ["1m"]
"""


class Obs:
    """The observability's reload hook: what the reloader calls for [alerts]/[metrics]."""

    def __init__(self, alerts: AlertManager) -> None:
        self.alerts = alerts

    def reload(self, config):
        self.alerts.set_rules([AlertRule(r.name, r.kind, r.threshold) for r in config.alerts.rules])
        return [f"alerts: {len(config.alerts.rules)} rule(s)"]


def setup(tmp_path: Path):
    path = tmp_path / "exmta.toml"
    path.write_text(BASE.format(data=tmp_path / "data"))
    config = load_config(str(path))
    clock = Clock()
    store = MemoryStore(clock)
    scheduler = DeliveryScheduler.from_config(config, store, {}, clock)
    factory = make_receive_factory(config, config.receive[0], store, {}, None, clock)
    alerts = AlertManager(clock, [], Sources())
    reloader = ConfigReloader(config, clock, scheduler=scheduler, factories={"default": factory},
                              observability=Obs(alerts))
    return path, config, scheduler, factory, reloader, alerts


def rcpt_reply(factory, rcpt: str) -> bytes:
    addr = IPv4Address("TCP", "127.0.0.1", 40000)
    proto = factory.buildProtocol(addr)
    t = StringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 2525))
    proto.makeConnection(t)
    for line in (b"EHLO c.test\r\n", b"MAIL FROM:<a@example.test>\r\n", f"RCPT TO:<{rcpt}>\r\n".encode()):
        t.clear()
        proto.dataReceived(line)
    reply = t.value()
    proto.connectionLost(None)
    return reply


def test_a_bad_file_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    path, config, scheduler, factory, reloader, _ = setup(tmp_path)
    router, policy = scheduler._router, factory.policy
    path.write_text(path.read_text().replace('retry_schedule = ["1m"]', 'retry_schedule = []\nbogus = 1'))
    ok, problems = reloader.reload()
    assert not ok and reloader.refused == 1
    assert any("queue.retry_schedule" in p for p in problems) and any("queue.bogus" in p for p in problems)
    assert reloader.config is config and scheduler._router is router and factory.policy is policy
    path.unlink()
    ok, problems = reloader.reload()
    assert not ok and problems == ["the file does not exist"]


def test_routes_queue_policy_and_alerts_are_swapped_listeners_need_a_restart(tmp_path: Path) -> None:
    path, config, scheduler, factory, reloader, alerts = setup(tmp_path)
    assert rcpt_reply(factory, "x@example.org").startswith(b"250")  # relayed for loopback
    text = (path.read_text()
            .replace('"example.test" = "authoritative"',
                     '"example.test" = "authoritative"\n"example.org" = "authoritative"')
            .replace('relay_networks = ["127.0.0.0/8"]', "relay_networks = []")
            .replace('domains = ["example.test"]', 'domains = ["example.test", "example.org"]')
            .replace('retry_schedule = ["1m"]', 'retry_schedule = ["5m", "10m"]')
            .replace('relay_networks = []', 'relay_networks = []\nmax_recipients = 7')
            .replace('listen = ["tcp:2525:interface=127.0.0.1"]', 'listen = ["tcp:2526:interface=127.0.0.1"]')
            .replace('smarthosts = ["[127.0.0.1]:2600"]', 'smarthosts = ["[127.0.0.1]:2601"]')
            + '\n[alerts.rule.q]\nkind = "queue_length"\nthreshold = 10\n'
            + '\n[metrics]\nallowed_networks = ["127.0.0.0/8"]\n')
    path.write_text(text)
    ok, messages = reloader.reload()
    assert ok, messages
    joined = "\n".join(messages)
    assert "routes: 2 route(s) applied" in joined and "queue settings applied" in joined
    assert "receive.default: policy" in joined and "alerts: 1 rule(s)" in joined
    assert "needs a restart" in joined and "receive.default.listen" in joined and "send connectors" in joined
    assert "metrics.allowed_networks" in joined  # the listener's check is set when it starts
    # the scheduler routes example.org locally now, with the new retry schedule
    routes = scheduler._router.route(None, ["bob@example.org", "eve@example.net"])
    assert {r.connector: r.recipients for r in routes} == {"local": ("bob@example.org",),
                                                           "relay": ("eve@example.net",)}
    assert scheduler._config.retry_schedule == (300.0, 600.0)
    # new sessions: example.org is local, relaying from loopback is over
    assert rcpt_reply(factory, "bob@example.org").startswith(b"250")
    assert rcpt_reply(factory, "x@example.net")[:3] in (b"550", b"554")
    # the listener keeps its old endpoint until a restart
    assert factory.config.listen == ("tcp:2525:interface=127.0.0.1",)
    assert factory.config.max_recipients == 7  # but the new limits apply
    assert [r.name for r in alerts.rules] == ["q"]
    assert reloader.reloads == 1


def test_turning_auth_on_by_reload_is_named_as_needing_a_restart(tmp_path: Path) -> None:
    """README's submission walk-through: relay_networks replaced by AUTH. Relaying stops at once; AUTH cannot
    start without a restart, and the log line names every such setting (issue 12, item 11)."""
    from exmta.auth.users import UserRecord, UsersFile

    path, config, scheduler, factory, reloader, alerts = setup(tmp_path)
    UsersFile(str(tmp_path / "users.jsonl")).write({"a": UserRecord("a", "$argon2id$x", [])})
    path.write_text(path.read_text().replace(
        'relay_networks = ["127.0.0.0/8"]',
        'auth = ["PLAIN", "LOGIN"]\nauth_backend = "users.jsonl"\nauth_tarpit = "1s"\n'
        'remote_ranges = ["127.0.0.0/8"]\nmax_connections_per_ip = 5\naccept_any_sender = true'))
    ok, messages = reloader.reload()
    assert ok, messages
    (line,) = [m for m in messages if m.startswith("needs a restart")]
    for key in ("auth", "auth_backend", "auth_tarpit", "accept_any_sender"):
        assert f"receive.default.{key}," in line + ",", key
    assert "remote_ranges" not in line and "max_connections_per_ip" not in line  # these do apply
    assert factory.config.auth == () and factory.config.accept_any_sender is False  # the running values
    assert factory.config.remote_ranges == ("127.0.0.0/8",) and factory.config.max_connections_per_ip == 5
    assert rcpt_reply(factory, "x@example.org")[:3] in (b"550", b"554")  # relaying is over at once


def test_reload_with_receive_workers_says_they_keep_the_old_configuration(tmp_path: Path) -> None:
    path, config, scheduler, factory, reloader, alerts = setup(tmp_path)
    import dataclasses

    reloader.config = dataclasses.replace(reloader.config, receive_workers=2)
    path.write_text(path.read_text().replace('retry_schedule = ["1m"]', 'retry_schedule = ["2m"]')
                    .replace('data_dir = "', 'receive_workers = 2\ndata_dir = "'))
    ok, messages = reloader.reload()
    assert ok, messages
    assert any("the 2 receive worker process(es) keep the configuration they started with" in m for m in messages)


def test_sighup_with_the_embedded_default_logs_one_true_line() -> None:
    """Not "not available" followed by "SIGHUP reloads <embedded default>" (issue 12, item 5)."""
    import signal

    from twisted.logger import globalLogPublisher

    from exmta.config.load import embedded_default
    from exmta.observe.reload import ReloadService

    lines: list[str] = []
    observer = lambda e: lines.append(e.get("log_format", "")) if "SIGHUP" in e.get("log_format", "") else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    service = ReloadService(ConfigReloader(embedded_default(), Clock()), Clock())
    previous = signal.getsignal(signal.SIGHUP)
    try:
        service.startService()
        service.stopService()
    finally:
        globalLogPublisher.removeObserver(observer)
        signal.signal(signal.SIGHUP, previous)
    assert lines == ["SIGHUP: the embedded default configuration has no file, so SIGHUP reloads nothing"]
