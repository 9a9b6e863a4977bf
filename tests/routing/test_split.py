"""Routes that split one message by recipient set (HVE: internal recipients only), and the TRANSFER event."""
from __future__ import annotations

import json
import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred

from exmta.config.load import ConfigError, parse_config
from exmta.config.schema import QueueConfig, RouteConfig, SendConnectorConfig, SmartHost
from exmta.model import Envelope, Outcome, Recipient, RecipientResult, Reply, Route, TrackingEvent, TrackingEventId
from exmta.queue.scheduler import DeliveryScheduler
from exmta.routing import StaticRouter
from exmta.testing.memstore import MemoryStore
from support import procs
from support.sync import result

CONNECTORS = {
    "internet": SendConnectorConfig("internet"),  # MX
    "hve": SendConnectorConfig("hve", smarthosts=(SmartHost("smtp-hve.office365.com", 587),)),
    "local": SendConnectorConfig("local", kind="maildir", maildir_root="/tmp/x"),
}
SPLIT = RouteConfig(("*",), "internet", internal_connector="hve", internal_domains=("contoso.com", "*.contoso.com"))


def env(*rcpts: str) -> Envelope:
    return Envelope(sender="app@contoso.com", recipients=[Recipient(r) for r in rcpts])


def test_the_tenants_recipients_go_to_the_internal_connector() -> None:
    router = StaticRouter([SPLIT, RouteConfig(("local.test",), "local")], CONNECTORS)
    rcpts = ["alice@contoso.com", "bob@partner.example", "carol@eu.contoso.com", "dan@partner.example",
             "erin@other.example", "frank@local.test", "gina@contoso.com.evil.example"]
    routes = router.route(env(*rcpts), rcpts)
    assert routes == [
        Route("hve", ("alice@contoso.com", "carol@eu.contoso.com"), None, "route[1]"),
        Route("internet", ("bob@partner.example", "dan@partner.example"), "partner.example", "route[1]"),
        Route("internet", ("erin@other.example",), "other.example", "route[1]"),
        Route("local", ("frank@local.test",), None, None),
        Route("internet", ("gina@contoso.com.evil.example",), "contoso.com.evil.example", "route[1]"),
    ]


def test_a_more_specific_route_still_wins() -> None:
    router = StaticRouter([SPLIT, RouteConfig(("eu.contoso.com",), "local")], CONNECTORS)
    assert router.route(env(), ["a@eu.contoso.com"]) == [Route("local", ("a@eu.contoso.com",), None, None)]


def test_config_takes_the_accepted_domains_by_default() -> None:
    config = parse_config({
        "accepted_domains": {"contoso.com": "authoritative", "*.contoso.com": "internal_relay"},
        "receive": {"in": {}},
        "send": {"internet": {}, "hve": {"smarthosts": ["smtp-hve.office365.com:587"]}},
        "route": [{"domains": ["*"], "connector": "internet", "internal_connector": "hve"}],
    })
    assert config.routes[0].internal_domains == ("contoso.com", "*.contoso.com")


@pytest.mark.parametrize("route, problem", [
    ({"internal_connector": "nope"}, "route[1].internal_connector: no [send.nope] connector"),
    ({"internal_domains": ["contoso.com"]}, "route[1].internal_domains: is only used with internal_connector"),
    ({"internal_connector": "internet"}, "route[1].internal_connector: is the same as connector"),
    ({"internal_connector": "hve", "internal_domains": ["*"]}, "route[1].internal_domains: \"*\" would send"),
])
def test_config_problems(route: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"receive": {"in": {}}, "accepted_domains": {"contoso.com": "authoritative"},
                      "send": {"internet": {}, "hve": {}},
                      "route": [{"domains": ["*"], "connector": "internet", **route}]})
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_no_accepted_domains_to_default_to() -> None:
    with pytest.raises(ConfigError, match="internal_domains: not set and there are no"):
        parse_config({"receive": {"in": {}}, "send": {"internet": {}, "hve": {}},
                      "route": [{"domains": ["*"], "connector": "internet", "internal_connector": "hve"}]})


class Connector:
    """Answers each delivery by hand; records the requests."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, Deferred]] = []

    def deliver(self, request: object) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((request, d))
        return d

    def answer(self, outcome: Outcome, reply: Reply) -> None:
        request, d = next(c for c in self.calls if not c[1].called)
        rcpts = request.recipients  # type: ignore[attr-defined]
        d.callback([RecipientResult(r.address, outcome, reply) for r in rcpts])


def test_scheduler_delivers_each_set_separately_and_tracks_the_fork_once() -> None:
    clock = task.Clock()
    clock.advance(1_700_000_000)
    store = MemoryStore(clock)
    events: list[TrackingEvent] = []
    tracker = type("T", (), {"track": lambda self, e: events.append(e)})()
    hve, internet = Connector(), Connector()
    router = StaticRouter([SPLIT], CONNECTORS)
    scheduler = DeliveryScheduler(store, router, {"hve": hve, "internet": internet},
                                  QueueConfig(retry_schedule=(60.0,), delay_warning=0.0), clock, tracker,
                                  hostname="mx.contoso.com", send_configs=CONNECTORS)
    scheduler.startService()
    env = Envelope(sender="app@contoso.com", queue_id="", message_id="<m@contoso.com>",
                   recipients=[Recipient("alice@contoso.com"), Recipient("bob@partner.example"),
                               Recipient("carol@contoso.com")])
    qid = result(store.submit(b"From: app@contoso.com\r\nSubject: s\r\n\r\nbody\r\n", env))
    clock.advance(0)
    ((to_hve, _),) = hve.calls
    ((to_internet, _),) = internet.calls
    assert [r.address for r in to_hve.recipients] == ["alice@contoso.com", "carol@contoso.com"]
    assert [r.address for r in to_internet.recipients] == ["bob@partner.example"]
    (fork,) = [e for e in events if e.event_id is TrackingEventId.TRANSFER]
    assert fork.queue_id == qid and fork.source == "ROUTING"
    assert fork.details["recipient_sets"] == {"hve": ["alice@contoso.com", "carol@contoso.com"],
                                              "internet": ["bob@partner.example"]}
    assert fork.details["split"] == ["route[1]"]
    hve.answer(Outcome.DELIVERED, Reply.make(250, "2.0.0", "OK"))
    internet.answer(Outcome.DEFERRED, Reply.make(451, "4.4.1", "later"))
    clock.advance(60)  # the retry goes to the internet only, and is not a new fork
    assert len(internet.calls) == 2 and len(hve.calls) == 1
    assert [e.event_id for e in events].count(TrackingEventId.TRANSFER) == 1
    internet.answer(Outcome.DELIVERED, Reply.make(250, "2.0.0", "OK"))
    assert [e.event_id.value for e in events if e.event_id is not TrackingEventId.TRANSFER] == \
        ["SEND", "SEND", "DEFER", "SEND"]  # one per recipient and outcome
    assert result(scheduler.stopService()) is None


TOML = """
[server]
hostname = "relay.contoso.example"
data_dir = "{data_dir}"

[accepted_domains]
"contoso.example" = "internal_relay"

[receive.apps]
listen = ["tcp:{port}:interface=127.0.0.1"]
relay_networks = ["127.0.0.0/8"]

[send.hve]
smarthosts = ["{hve}"]
tls = "none"

[send.internet]
smarthosts = ["{internet}"]
tls = "none"

[[route]]
domains = ["*"]
connector = "internet"
internal_connector = "hve"

[queue]
retry_schedule = ["1s"]
"""


@pytest.mark.integration
def test_one_message_leaves_as_two_and_the_tracking_log_shows_the_split(
        smtp_sink_factory: Callable[..., object], exmta_factory: Callable[..., object],
        capsys: pytest.CaptureFixture[str]) -> None:
    hve, internet = smtp_sink_factory(), smtp_sink_factory()
    ex = exmta_factory(toml=TOML, subst={"hve": hve.next_hop, "internet": internet.next_hop})
    with smtplib.SMTP(ex.host, ex.port, timeout=30) as s:
        s.sendmail("scanner@contoso.example", ["alice@contoso.example", "bob@partner.example",
                                                "carol@contoso.example"],
                   b"From: scanner@contoso.example\r\nSubject: scan\r\n\r\nscan.pdf\r\n")
    (internal,) = hve.wait_for_rcpts(["alice@contoso.example", "carol@contoso.example"])
    (external,) = internet.wait_for_rcpts(["bob@partner.example"])
    assert internal.rcpt_tos == ["alice@contoso.example", "carol@contoso.example"]
    assert external.rcpt_tos == ["bob@partner.example"]
    log = ex.data_dir / "log" / "tracking.jsonl"

    def events() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    procs.wait_until(lambda: sum(e["event_id"] == "SEND" for e in events()) == 3, 10, "a SEND per recipient")
    ids = [(e["event_id"], e.get("connector")) for e in events()]
    assert ids[0] == ("RECEIVE", "apps") and ids[1] == ("TRANSFER", None)
    assert sorted(ids[2:]) == [("SEND", "hve"), ("SEND", "hve"), ("SEND", "internet")]
    fork = events()[1]
    assert fork["split"] == ["route[1]"]
    assert fork["recipients"] == ["alice@contoso.example", "carol@contoso.example", "bob@partner.example"]
    assert fork["recipient_sets"] == {"hve": ["alice@contoso.example", "carol@contoso.example"],
                                      "internet": ["bob@partner.example"]}
    # exmta track shows the sets
    from exmta.cli import main

    assert main(["track", "--log", str(log), "--event", "TRANSFER"]) == 0
    table = capsys.readouterr().out
    assert "TRANSFER" in table and \
        "sets=hve: alice@contoso.example,carol@contoso.example; internet: bob@partner.example" in table


def test_the_annotated_example_file_documents_the_split() -> None:
    """etc/exmta.toml's commented split keys, uncommented (with an HVE connector), are a valid configuration."""
    import tomllib

    text = (Path(__file__).resolve().parents[2] / "etc" / "exmta.toml").read_text()
    lines = [line[2:] if line.startswith(("# internal_connector", "# internal_domains")) else line
             for line in text.splitlines()]
    raw = tomllib.loads("\n".join(lines) + '\n[send.hve]\nsmarthosts = ["smtp-hve.office365.com:587"]\n')
    config = parse_config(raw)
    (split,) = [r for r in config.routes if r.internal_connector]
    assert (split.connector, split.internal_connector, split.internal_domains) == \
        ("internet", "hve", ("contoso.example",))
    assert "send_organization_headers = true" in text and "send_organization_headers = false" in text


def test_reload_applies_a_split_to_existing_connectors_and_defers_a_new_one(tmp_path: Path) -> None:
    """SIGHUP: a split between running connectors applies at once; one to a new connector waits for a restart."""
    from exmta.config.load import load_config
    from exmta.observe.reload import ConfigReloader

    base = TOML.replace("{data_dir}", str(tmp_path / "data")).replace("{port}", "2525") \
        .replace("{hve}", "[127.0.0.1]:2601").replace("{internet}", "[127.0.0.1]:2602")
    path = tmp_path / "exmta.toml"
    path.write_text(base.replace('internal_connector = "hve"\n', ""))
    config = load_config(str(path))
    clock = task.Clock()
    scheduler = DeliveryScheduler.from_config(config, MemoryStore(clock), {}, clock)
    reloader = ConfigReloader(config, clock, scheduler=scheduler)
    path.write_text(base)
    ok, messages = reloader.reload()
    assert ok and "routes: 1 route(s) applied" in "\n".join(messages)
    assert [r.connector for r in scheduler._router.route(None, ["a@contoso.example", "b@x.example"])] == \
        ["hve", "internet"]
    path.write_text(base.replace('internal_connector = "hve"', 'internal_connector = "hve2"')
                    + '\n[send.hve2]\nsmarthosts = ["[127.0.0.1]:2603"]\n')
    ok, messages = reloader.reload()
    assert ok and "routes to new send connector(s) hve2" in "\n".join(messages)
    assert [r.connector for r in scheduler._router.route(None, ["a@contoso.example"])] == ["hve"]
