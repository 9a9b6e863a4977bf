"""DeliveryScheduler.reconfigure / prepare_reconfigure (IReconfigurable): live routes and queue settings.

Real scheduler, MemoryStore and task.Clock; a connector that records deliveries and answers none.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from exmta.config.load import load_config
from exmta.interfaces import IReconfigurable, ISchedulerAdmin
from exmta.model import Envelope, Recipient
from exmta.queue.scheduler import DeliveryScheduler
from exmta.testing.memstore import MemoryStore

BASE = """
[server]
hostname = "mx.example.test"
data_dir = "{data}"

[accepted_domains]
"example.test" = "authoritative"

[receive.default]
listen = ["tcp:2525:interface=127.0.0.1"]

[send.relay]
type = "smtp"
smarthosts = ["[127.0.0.1]:2600"]

[[route]]
domains = ["*"]
connector = "relay"

[queue]
retry_schedule = ["1m"]
max_active = {max_active}
"""


class Recorder:
    """A send connector that records each request and never answers (the attempt stays in flight)."""

    name = "relay"

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def deliver(self, request: Any) -> defer.Deferred[Any]:
        self.requests.append(request)
        return defer.Deferred()


def config_file(tmp_path: Path, max_active: int = 1, extra: str = "") -> Any:
    path = tmp_path / "exmta.toml"
    path.write_text(BASE.format(data=tmp_path / "data", max_active=max_active) + extra)
    return load_config(str(path))


def make(tmp_path: Path, max_active: int = 1) -> tuple[Any, task.Clock, MemoryStore, Recorder, DeliveryScheduler]:
    config = config_file(tmp_path, max_active)
    clock = task.Clock()
    store = MemoryStore(clock)
    out = Recorder()
    scheduler = DeliveryScheduler.from_config(config, store, {"relay": out}, clock)
    return config, clock, store, out, scheduler


def submit(store: MemoryStore, rcpt: str) -> None:
    d = store.submit(b"Subject: t\r\n\r\nbody\r\n", Envelope("a@example.test", [Recipient(rcpt)]))
    assert d.called


def test_the_scheduler_provides_its_interfaces(tmp_path: Path) -> None:
    *_, scheduler = make(tmp_path)
    assert verifyObject(IReconfigurable, scheduler)
    assert verifyObject(ISchedulerAdmin, scheduler)


def test_a_larger_active_window_applies_live(tmp_path: Path) -> None:
    config, clock, store, out, scheduler = make(tmp_path, max_active=1)
    scheduler.startService()
    submit(store, "b@remote.example")
    submit(store, "c@remote.example")
    clock.advance(0)
    assert len(out.requests) == 1  # the window (1) is full: the second message waits

    plan = scheduler.reconfigure(config_file(tmp_path, max_active=2))
    assert plan.applied == ["queue settings applied"] and plan.needs_restart == []
    assert "queue settings applied" in plan.describe()
    clock.advance(0)  # reconfigure woke the claim loop
    assert len(out.requests) == 2
    assert scheduler.stats()["max_active"] == 2


def test_the_same_file_again_changes_nothing(tmp_path: Path) -> None:
    config, clock, store, out, scheduler = make(tmp_path, max_active=1)
    router = scheduler._router
    plan = scheduler.reconfigure(config_file(tmp_path, max_active=1))
    assert not plan.changed and plan.describe() == "scheduler: nothing to change"
    assert scheduler._router is router
    # and after a change, the applied file is what the next one is compared with
    assert scheduler.reconfigure(config_file(tmp_path, max_active=3)).changed
    assert not scheduler.reconfigure(config_file(tmp_path, max_active=3)).changed


def test_routes_to_a_connector_that_is_not_running_need_a_restart(tmp_path: Path) -> None:
    config, clock, store, out, scheduler = make(tmp_path)
    router = scheduler._router
    new = config_file(tmp_path, extra='\n[send.other]\ntype = "smtp"\nsmarthosts = ["[127.0.0.1]:2601"]\n\n'
                                       '[[route]]\ndomains = ["other.example"]\nconnector = "other"\n')
    plan = scheduler.reconfigure(new)
    assert plan.applied == []
    assert plan.needs_restart == ["routes to new send connector(s) other"]
    assert "needs a restart" in plan.describe()
    assert scheduler._router is router  # the old routes stay in use


def test_new_routes_to_running_connectors_apply(tmp_path: Path) -> None:
    config, clock, store, out, scheduler = make(tmp_path)
    new = config_file(tmp_path, extra='\n[[route]]\ndomains = ["slow.example"]\nconnector = "relay"\n')
    prepared = scheduler.prepare_reconfigure(new)
    router = scheduler._router
    assert prepared.applied == ["routes: 2 route(s) applied"]
    assert scheduler._router is router  # prepared, not applied
    prepared.apply()
    assert scheduler._router is not router


def test_unusable_queue_settings_are_refused_and_change_nothing(tmp_path: Path) -> None:
    config, clock, store, out, scheduler = make(tmp_path)
    router, queue = scheduler._router, scheduler._config
    new = config_file(tmp_path, extra='\n[[route]]\ndomains = ["slow.example"]\nconnector = "relay"\n')
    broken = dataclasses.replace(new, queue=dataclasses.replace(new.queue, retry_schedule=()))
    with pytest.raises(ValueError, match="retry_schedule"):
        scheduler.prepare_reconfigure(broken)
    assert scheduler._router is router and scheduler._config is queue  # the new routes were not swapped in


def test_pickup_interval_needs_a_restart_the_rest_applies(tmp_path: Path) -> None:
    config, clock, store, out, scheduler = make(tmp_path)
    new = dataclasses.replace(config, queue=dataclasses.replace(config.queue, pickup_interval=99.0,
                                                                  max_lifetime=3600.0))
    plan = scheduler.reconfigure(new)
    assert plan.applied == ["queue settings applied"]
    assert plan.needs_restart == ["queue.pickup_interval"]
    assert scheduler._config.max_lifetime == 3600.0
