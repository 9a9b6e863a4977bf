"""SIGHUP reload is all or nothing, and reaches the receive workers only once this process applied it.

Real scheduler, receive factory and MemoryStore on task.Clock; the worker pool
is a recorder of what the reloader asks of it (the real pool is exercised in
tests/integration/test_worker_reload.py).
"""
from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock

from exmta.assembly import make_receive_factory
from exmta.config.load import load_config
from exmta.observe.alerts import AlertManager, AlertRule, Sources
from exmta.observe.reload import ConfigReloader
from exmta.queue.scheduler import DeliveryScheduler
from exmta.receive.workers import WorkerPool
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

[[route]]
domains = ["example.test"]
connector = "local"

[queue]
retry_schedule = ["1m"]
"""


class Pool:
    """Records the reloader's requests to the receive worker pool."""

    def __init__(self) -> None:
        self.asked = 0

    def reload(self) -> int:
        self.asked += 1
        return 2


class Obs:
    def __init__(self, alerts: AlertManager) -> None:
        self.alerts = alerts

    def reload(self, config):
        self.alerts.set_rules([AlertRule(r.name, r.kind, r.threshold) for r in config.alerts.rules])
        return [f"alerts: {len(config.alerts.rules)} rule(s)"]


def _setup(tmp_path: Path):
    path = tmp_path / "exmta.toml"
    path.write_text(BASE.format(data=tmp_path / "data"))
    config = load_config(str(path))
    clock = Clock()
    store = MemoryStore(clock)
    scheduler = DeliveryScheduler.from_config(config, store, {}, clock)
    factory = make_receive_factory(config, config.receive[0], store, {}, None, clock)
    alerts = AlertManager(clock, [], Sources())
    pool = Pool()
    env = object()  # filters are loaded through it: a plugin that is not installed fails before it is used
    reloader = ConfigReloader(config, clock, scheduler=scheduler, factories={"default": factory},
                              filter_env=env, observability=Obs(alerts), workers=pool)
    return path, config, scheduler, factory, alerts, pool, reloader


def test_a_broken_plugin_changes_nothing_routes_queue_policy_alerts_nor_workers(tmp_path: Path) -> None:
    path, config, scheduler, factory, alerts, pool, reloader = _setup(tmp_path)
    router, queue, policy, chain, rc = scheduler._router, scheduler._config, factory.policy, factory.filters, \
        factory.config
    path.write_text(path.read_text()
                    .replace('domains = ["example.test"]', 'domains = ["example.test", "example.org"]')
                    .replace('retry_schedule = ["1m"]', 'retry_schedule = ["5m"]')
                    .replace('relay_networks = ["127.0.0.0/8"]',
                             'relay_networks = []\nmax_recipients = 7\nfilters = ["typo"]')
                    + '\n[filters.typo]\nplugin = "no-such-plugin"\n'
                    + '\n[alerts.rule.q]\nkind = "queue_length"\nthreshold = 10\n')
    ok, problems = reloader.reload()
    assert not ok and reloader.refused == 1 and reloader.reloads == 0
    assert any("filters.typo.plugin" in p and "no-such-plugin" in p for p in problems), problems
    assert scheduler._router is router and scheduler._config is queue
    assert factory.policy is policy and factory.filters is chain and factory.config is rc
    assert alerts.rules == [] and reloader.config is config
    assert pool.asked == 0  # the workers are not asked to apply a file this process refused


def test_a_good_reload_asks_the_workers_after_applying_here(tmp_path: Path) -> None:
    path, config, scheduler, factory, alerts, pool, reloader = _setup(tmp_path)
    path.write_text(path.read_text().replace('relay_networks = ["127.0.0.0/8"]',
                                             'relay_networks = []\nmax_recipients = 7'))
    ok, messages = reloader.reload()
    assert ok, messages
    assert factory.config.max_recipients == 7 and pool.asked == 1
    assert "asked the 2 receive worker process(es) to apply the same file; each logs what it applied" in messages


class _Transport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _Reactor:
    """spawnProcess only: hands out transports that record their signals."""

    def __init__(self) -> None:
        self.spawned: list[_Transport] = []
        self.clock = Clock()

    def spawnProcess(self, proto, executable, args, env=None, childFDs=None):
        t = _Transport(1000 + len(self.spawned))
        self.spawned.append(t)
        return t

    def callLater(self, delay, f, *a):
        return self.clock.callLater(delay, f, *a)


def test_worker_pool_readiness_and_reload_follow_the_ready_lines() -> None:
    from twisted.python.failure import Failure

    reactor = _Reactor()
    pool = WorkerPool(reactor, 2, [], ["--data", "/nonexistent"], lambda qid: None)
    pool.startService()
    assert pool.readiness() == (False, "0 of 2 receive worker process(es) running and ready")
    protos = {i: entry[1] for i, entry in pool.procs.items()}
    protos[0].outReceived(b"!ready\n")
    assert pool.reload() == 2  # worker 0 is signalled now, worker 1 once it says it is ready
    assert reactor.spawned[0].signals == ["HUP"] and reactor.spawned[1].signals == []
    protos[1].outReceived(b"!ready\nQ1\n")
    assert reactor.spawned[1].signals == ["HUP"]
    assert pool.readiness() == (True, "2 of 2 receive worker process(es) running and ready")
    protos[1].processEnded(Failure(Exception("killed")))
    assert pool.readiness() == (False, "1 of 2 receive worker process(es) running and ready")
    reactor.clock.advance(pool.restart_delay)  # started again, not ready until it says so
    assert len(reactor.spawned) == 3 and pool.readiness()[0] is False
    pool.procs[1][1].outReceived(b"!ready\n")
    assert pool.readiness()[0] is True
