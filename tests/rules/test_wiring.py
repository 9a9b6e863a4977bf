"""[transport_rules] in the configuration, the receive factory and the pickup directory, and the metric."""
from __future__ import annotations

from pathlib import Path

import pytest
from support import mime_samples as S
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from exmta.cli import main
from exmta.config.load import ConfigError, load_config
from exmta.model import TrackingEvent, TrackingEventId
from exmta.queue.pickup import PickupDirectory
from exmta.rules.wiring import ConnectorRules, transport_rules_for
from exmta.service import make_receive_factory
from exmta.testing.memstore import MemoryStore

CONFIG = """
[server]
hostname = "mx.local.test"

[accepted_domains]
"local.test" = "authoritative"

[receive.in]
listen = ["tcp:0:interface=127.0.0.1"]

[send.out]
smarthosts = ["[127.0.0.1]:2601"]

[send.partner-tls]
smarthosts = ["[127.0.0.1]:2602"]

[[route]]
domains = ["*"]
connector = "out"

[transport_rules]
file = "rules.toml"
reload_interval = "1s"
threads = 2
limits = { max_depth = 10 }
"""

RULES = """
[[rule]]
name = "Tag external"
[rule.conditions]
FromScope = "NotInOrganization"
[rule.actions]
PrependSubject = "[EXTERNAL] "

[[rule]]
name = "Partner"
[rule.conditions]
RecipientDomainIs = "partner.test"
[rule.actions]
RouteMessageOutboundConnector = "partner-tls"
"""


def write(tmp_path: Path, rules: str = RULES) -> str:
    (tmp_path / "rules.toml").write_text(rules)
    path = tmp_path / "exmta.toml"
    path.write_text(CONFIG)
    return str(path)


def test_config_reads_the_rules_file_beside_it(tmp_path):
    config = load_config(write(tmp_path))
    tr = config.transport_rules
    assert tr.file == str(tmp_path / "rules.toml") and tr.reload_interval == 1.0 and tr.limits == (("max_depth", 10),)


def test_a_bad_rules_file_is_a_configuration_problem_naming_rule_and_key(tmp_path, capsys):
    path = write(tmp_path, RULES.replace('"partner-tls"', '"nowhere"').replace("FromScope", "FromScoop"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    rules = tmp_path / "rules.toml"
    assert e.value.problems == [
        f"transport_rules.file: {rules}: rule 'Tag external'.conditions.FromScoop: unknown condition "
        "(see docs/rules.rst for the list)",
        f"transport_rules.file: {rules}: rule 'Partner'.actions.RouteMessageOutboundConnector: "
        "no send connector 'nowhere'",
    ]
    assert main(["check-config", path]) == 2
    assert "FromScoop" in capsys.readouterr().err


def test_receive_factory_runs_the_rules(tmp_path):
    config = load_config(write(tmp_path))
    clock = Clock()
    store = MemoryStore(clock)
    factory = make_receive_factory(config, config.receive[0], store, {}, None, clock)
    assert isinstance(factory.transport_rules, ConnectorRules)
    addr = IPv4Address("TCP", "198.51.100.1", 5000)
    proto = factory.buildProtocol(addr)
    t = StringTransport(peerAddress=addr)
    proto.makeConnection(t)
    proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<x@outside.test>\r\nRCPT TO:<bob@local.test>\r\nDATA\r\n")
    t.clear()
    proto.dataReceived(S.PLAIN + b".\r\n")
    qid = t.value().split()[-1].decode()
    assert b"Subject: [EXTERNAL] hello\r\n" in store.content(qid)


def test_pickup_runs_the_rules(tmp_path):
    config = load_config(write(tmp_path))
    clock = Clock()
    store = MemoryStore(clock)
    pickup_dir = tmp_path / "pickup"
    pickup_dir.mkdir()
    (pickup_dir / "a.eml").write_bytes(b"X-Sender: app@local.test\r\nX-Receiver: x@partner.test\r\n" + S.PLAIN)
    pickup = PickupDirectory(str(pickup_dir), store, clock, 1.0)
    pickup.transport_rules = transport_rules_for(config, store, None, clock)
    done: list = []
    pickup.scan().addCallback(done.append)
    assert done == [1]
    (qid,) = store.queue_ids()
    assert store.envelope(qid).route_connector == "partner-tls"
    assert b"Subject: hello\r\n" in store.content(qid)  # pickup is inside the organisation: no tag


def test_rule_hits_are_counted_per_rule():
    from exmta.observe.metrics import Metrics
    metrics = Metrics(Clock())
    for rule in ("a", "a", "b"):
        metrics.track(TrackingEvent(TrackingEventId.AGENTINFO, "Q", 0.0, source="AGENT",
                                    details={"agent": "TransportRule", "rule": rule, "mode": "enforce"}))
    text = metrics.render().decode()
    assert 'exmta_transport_rule_hits_total{mode="enforce",rule="a"} 2.0' in text
    assert 'exmta_transport_rule_hits_total{mode="enforce",rule="b"} 1.0' in text


def test_scl_comes_from_a_filter_or_a_trusted_header():
    from exmta.filters.base import MessageView
    from exmta.rules.wiring import scl_of
    view = MessageView(b"X-MS-Exchange-Organization-SCL: 7\r\nSubject: s\r\n\r\nbody\r\n")
    assert scl_of(view, trusted_headers=True) == 7
    assert scl_of(view, trusted_headers=False) is None  # the header firewall removes it from such sessions
    view.edits.replace_header("X-MS-Exchange-Organization-SCL", "9")  # a spam filter's verdict
    assert scl_of(view, trusted_headers=False) == 9
    view.edits.replace_header("X-MS-Exchange-Organization-SCL", "junk")
    assert scl_of(view, trusted_headers=True) is None
