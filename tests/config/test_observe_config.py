"""[metrics] and [alerts]: defaults, values with units, every problem named by its key."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from exmta.config.load import ConfigError, parse_config
from exmta.config.schema import AlertsConfig, MetricsConfig

BASE = {"receive": {"default": {}}}


def test_defaults_are_safe() -> None:
    c = parse_config(dict(BASE))
    assert c.metrics == MetricsConfig() and c.metrics.listen is None  # no extra listener unless asked
    assert c.metrics.status_page is False  # the page shows addresses: never without a login by default
    assert c.alerts == AlertsConfig() and c.alerts.rules == () and c.alerts.webhook is None


def test_values_and_units() -> None:
    c = parse_config({**BASE, "metrics": {"listen": "tcp:9125:interface=127.0.0.1", "sample_interval": "5s",
                                          "min_free_disk": "1GiB", "enabled": False, "status_page": True},
                      "alerts": {"interval": "10s", "repeat": "30m", "mail_postmaster": False,
                                 "webhook": "http://127.0.0.1:9000/hook", "webhook_timeout": 3,
                                 "rule": {"q": {"kind": "queue_length", "threshold": 1000},
                                          "old": {"kind": "oldest_message", "threshold": "4h"},
                                          "disk": {"kind": "disk_space", "threshold": "2GiB"},
                                          "rate": {"kind": "deferral_rate", "threshold": 0.5, "window": "5m",
                                                   "min_events": 3, "clear_ratio": 0.5},
                                          "cert": {"kind": "cert_expiry", "threshold": 14,
                                                   "certificates": ["/etc/exmta/mx.pem"]}}}})
    assert c.metrics == MetricsConfig(False, "tcp:9125:interface=127.0.0.1", 5.0, 2**30, True)
    a = c.alerts
    assert (a.interval, a.repeat, a.mail_postmaster, a.webhook, a.webhook_timeout) == (
        10.0, 1800.0, False, "http://127.0.0.1:9000/hook", 3.0)
    rules = {r.name: r for r in a.rules}
    assert rules["q"].threshold == 1000 and rules["old"].threshold == 4 * 3600
    assert rules["disk"].threshold == 2 * 2**30
    assert (rules["rate"].window, rules["rate"].min_events, rules["rate"].clear_ratio) == (300.0, 3, 0.5)
    assert rules["cert"].certificates == ("/etc/exmta/mx.pem",)


def test_every_problem_is_named() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, "metrics": {"listen": "bogus:1", "sample_interval": 0, "colour": 1},
                      "alerts": {"webhook": "ftp://x", "repeat": "0s",
                                 "rule": {"a": {"kind": "nope", "threshold": 1},
                                          "b": {"kind": "bounce_rate", "threshold": 3},
                                          "c": {"kind": "queue_length"},
                                          "d": {"kind": "queue_length", "threshold": 1, "clear_ratio": 2,
                                                "extra": True}}}})
    text = str(e.value)
    for key in ("metrics.listen", "metrics.sample_interval", "metrics.colour", "alerts.webhook",
                "alerts.repeat", "alerts.rule.a.kind", "alerts.rule.b.threshold", "alerts.rule.c.threshold",
                "alerts.rule.d.clear_ratio", "alerts.rule.d.extra"):
        assert key in text, key


def test_example_file_parses_and_documents_every_key() -> None:
    path = Path(__file__).resolve().parents[2] / "etc" / "exmta.toml"
    text = path.read_text()
    for key in ("sample_interval", "min_free_disk", "mail_postmaster", "webhook_timeout", "clear_ratio",
                "min_events", "status_page", "[alerts.rule.", "cert_expiry", "disk_space", "auth_failures",
                "timeout_rate"):
        assert key in text, key
    tomllib.loads(text)
