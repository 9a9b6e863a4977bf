"""Black box: ``twistd -n exmta`` with the built-in DMARC filter (Knot serves the zones) writes the
filter's verdict to the tracking log as AGENTINFO, names it on the REJECT, tracks a policy refusal at RCPT,
and ``exmta track --event AGENTINFO`` (a subprocess, as an operator runs it) finds them."""
from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from support import authzones, exmta_proc, knot, procs
from support.authzones import message

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def knot_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[knot.KnotServer]:
    with knot.KnotServer(tmp_path_factory.mktemp("agentdns"), authzones.zones(authzones.make_keys())) as server:
        yield server


@pytest.fixture
def server(knot_server: knot.KnotServer,
           exmta_factory: Callable[..., exmta_proc.ExmtaProcess]) -> exmta_proc.ExmtaProcess:
    dns = f'dns_servers = ["127.0.0.1:{knot_server.port}"]'
    filters = "".join(f'[filters.{n}]\nplugin = "{n}"\n{dns if n != "authres" else ""}\n'
                      for n in ("spf", "dkim", "arc", "dmarc", "authres"))
    # no relay networks: 127.0.0.1 is an anonymous client, so a remote recipient is "relay denied"
    toml = exmta_proc.exmta_toml(relay_networks=(), extra=filters,
                                 receive_extra='filters = ["spf", "dkim", "arc", "dmarc", "authres"]')
    return exmta_factory(toml=toml)


def track(ex: exmta_proc.ExmtaProcess, *argv: str) -> list[dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=str(exmta_proc.REPO_ROOT))
    r = subprocess.run([sys.executable, "-m", "exmta", "track", *argv, "--format", "json", "-c", str(ex.config_path)],
                       capture_output=True, text=True, timeout=60, env=env, cwd=ex.workdir)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def tracked(ex: exmta_proc.ExmtaProcess) -> list[dict[str, Any]]:
    path = ex.data_dir / "log" / "tracking.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def test_dmarc_reject_and_relay_denied_are_in_the_tracking_log(server: exmta_proc.ExmtaProcess) -> None:
    with smtplib.SMTP(procs.LOOPBACK, server.port, timeout=30) as c:
        c.ehlo("client.example.test")
        assert c.mail("alice@example.test")[0] == 250
        code, text = c.rcpt("carol@remote.test")
        assert code in (550, 554) and b"elay" in text, text  # relay denied by the receive policy
        relay_code = code
        assert c.rcpt("bob@example.test")[0] == 250
        # example.test publishes p=reject and 127.0.0.1 is not in its SPF: the dmarc filter refuses the message
        code, text = c.data(message())
        assert code == 550 and text.startswith(b"5.7.1 DMARC policy of example.test rejects this message")
    procs.wait_until(lambda: sum(e["event_id"] == "REJECT" for e in tracked(server)) == 2, 10, "two REJECT events")

    [agent] = track(server, "--event", "AGENTINFO")
    assert (agent["filter"], agent["phase"], agent["verdict"]) == ("dmarc", "data", "reject")
    assert agent["source"] == "AGENT" and agent["connector"] == "default"
    assert agent["reply"].startswith("550 5.7.1 DMARC policy of example.test rejects this message")
    assert agent["message_id"] == "<1@example.test>" and agent["recipients"] == ["bob@example.test"]
    assert agent["sender"] == "alice@example.test" and agent["remote_host"] == "127.0.0.1"

    policy, refused = track(server, "--event", "REJECT")
    assert policy["reason"] == "policy" and policy["recipients"] == ["carol@remote.test"]
    assert "filter" not in policy and policy["reply"].split(" ")[:2] == [str(relay_code), "5.7.1"]
    assert refused["reason"] == "filter" and refused["filter"] == "dmarc"
    assert refused["queue_id"] == agent["queue_id"] != ""
    # the message's history (by queue id) tells the whole story: the agent's verdict, then the refusal
    assert [e["event_id"] for e in track(server, "--queue-id", agent["queue_id"])] == ["AGENTINFO", "REJECT"]


    # quar.test publishes p=quarantine: accepted and held; the agents that acted on it are in its history
    with smtplib.SMTP(procs.LOOPBACK, server.port, timeout=30) as c:
        c.sendmail("a@quar.test", ["bob@example.test"], message(from_="a@quar.test"))
    procs.wait_until(lambda: any(e["event_id"] == "RECEIVE" for e in tracked(server)), 10, "RECEIVE")
    [receive] = track(server, "--event", "RECEIVE")
    history = track(server, "--queue-id", receive["queue_id"])
    assert history[0]["event_id"] == "RECEIVE"
    agents = {e["filter"]: e for e in history if e["event_id"] == "AGENTINFO"}
    assert agents["dmarc"]["verdict"] == "quarantine"
    assert agents["dmarc"]["reason"].startswith("DMARC policy of quar.test is quarantine")
    # authres: removes forged Authentication-Results (none here) and inserts ours: two journal entries
    assert agents["authres"]["verdict"] == "continue" and agents["authres"]["header_edits"] == 2

