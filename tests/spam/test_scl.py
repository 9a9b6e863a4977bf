"""The SCL mapping (docs/spam.rst) and a connector's thresholds."""
from __future__ import annotations

import ipaddress

import pytest

from exmta.filters.base import MessageView
from exmta.spam.scl import SclPolicy, connector_trusts_org_headers, existing_scl, in_networks, scl_for_score


@pytest.mark.parametrize("score, action, scl", [
    (-3.0, "no action", 0), (0.0, "no action", 0), (0.5, "no action", 1), (3.0, "no action", 3),
    (5.9, "greylist", 4), (6.0, "add header", 5), (10.4, "add header", 5), (10.5, "rewrite subject", 6),
    (14.9, "rewrite subject", 6), (15.0, "reject", 7), (23.9, "reject", 7), (24.0, "reject", 8),
    (33.0, "reject", 9), (500.0, "reject", 9),
    (1.0, "reject", 7),        # rspamd's own reject (a forced action) is at least 7 whatever the score
    (2.0, "add header", 5),    # and its spam actions at least 5
])
def test_mapping_with_rspamd_default_thresholds(score, action, scl):
    assert scl_for_score(score, 6.0, 15.0, action) == scl


def test_mapping_without_sane_thresholds_still_spans_0_to_9():
    assert scl_for_score(5.0, 0.0, 0.0) == 4       # reject 15 and spam 6 assumed
    assert scl_for_score(20.0, 30.0, 10.0) == 8    # spam above reject: 40 % of reject (4): 7 + 10 // 6
    assert [scl_for_score(s, 6, 15) for s in range(0, 40, 3)] == sorted(scl_for_score(s, 6, 15)
                                                                        for s in range(0, 40, 3))


def test_policy_outcomes():
    policy = SclPolicy(reject_at=7, quarantine_at=5)
    assert [policy.outcome(s) for s in (-1, 0, 4, 5, 6, 7, 9)] == [
        "deliver", "deliver", "deliver", "quarantine", "quarantine", "reject", "reject"]
    assert SclPolicy(None, None).outcome(9) == "deliver"
    assert SclPolicy(None, 9).outcome(9) == "quarantine"


def test_trust_read_back_from_the_header_firewall():
    view = MessageView(b"X-MS-Exchange-Organization-SCL: -1\r\nSubject: x\r\n\r\nbody\r\n")
    assert connector_trusts_org_headers(view) and existing_scl(view) == -1
    view.edits.remove_headers_with_prefix("X-MS-Exchange-Organization-")  # what the server does for strangers
    assert not connector_trusts_org_headers(view)
    assert existing_scl(MessageView(b"X-MS-Exchange-Organization-SCL: 12\r\n\r\n")) is None


def test_networks():
    nets = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32"))
    assert in_networks("192.0.2.9", nets) and in_networks("::ffff:192.0.2.9", nets) and in_networks("2001:db8::1", nets)
    assert not in_networks("198.51.100.1", nets) and not in_networks("junk", nets)
