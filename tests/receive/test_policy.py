"""exmta.receive.policy: default deny, accepted domains, relay networks, routing tricks."""
from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from exmta.config.schema import AcceptedDomain, Config
from exmta.interfaces import IReceivePolicy
from exmta.model import Action, Address, MailParams, RcptParams, Session, Transaction, Verdict
from exmta.receive.policy import DefaultReceivePolicy, routing_trick

CONFIG = Config(accepted_domains=(
    AcceptedDomain("local.test"),
    AcceptedDomain("*.sub.test", "internal_relay"),
    AcceptedDomain("partner.test", "external_relay"),
))
POLICY = DefaultReceivePolicy(CONFIG.accepted_domain, ["10.0.0.0/8", "192.0.2.5", "2001:db8:1::/48"])


def decide(ip: str, rcpt: str, auth: str | None = None) -> Verdict:
    session = Session(peer_ip=ip, session_id="s1", auth_identity=auth)
    return POLICY.authorize_rcpt(session, Transaction(Address("a", "x.test")), Address.parse_simple(rcpt),
                                 RcptParams())


def test_provides_the_interface():
    assert verifyObject(IReceivePolicy, POLICY)
    session = Session(peer_ip="198.51.100.1")
    assert POLICY.check_connect(session) is Verdict.CONTINUE
    assert POLICY.check_mail(session, Address("a", "x.test"), MailParams()) is Verdict.CONTINUE


@pytest.mark.parametrize("rcpt", ["u@local.test", "u@LOCAL.Test", "u@a.sub.test", "u@partner.test"])
def test_accepted_domains_are_accepted_from_anyone(rcpt):
    assert decide("198.51.100.1", rcpt) is Verdict.ACCEPT


@pytest.mark.parametrize("rcpt", ["u@elsewhere.test", "u@sub.test", "u@local.test.evil.test"])
def test_other_domains_are_relay_denied_for_anonymous_clients(rcpt):
    verdict = decide("198.51.100.1", rcpt)
    assert verdict.action is Action.REJECT
    assert str(verdict.reply) == "554 5.7.1 Relay access denied"


@pytest.mark.parametrize("ip", ["10.1.2.3", "192.0.2.5", "2001:db8:1:ffff::1", "::ffff:10.9.9.9"])
def test_relay_networks_may_send_anywhere(ip):
    assert decide(ip, "u@elsewhere.test") is Verdict.ACCEPT


@pytest.mark.parametrize("ip", ["11.0.0.1", "192.0.2.6", "2001:db8:2::1", "not-an-ip", ""])
def test_outside_relay_networks(ip):
    assert decide(ip, "u@elsewhere.test").action is Action.REJECT


def test_authenticated_clients_may_relay_unless_disabled():
    assert decide("198.51.100.1", "u@elsewhere.test", auth="alice") is Verdict.ACCEPT
    strict = DefaultReceivePolicy(CONFIG.accepted_domain, [], relay_authenticated=False)
    session = Session(peer_ip="198.51.100.1", auth_identity="alice")
    verdict = strict.authorize_rcpt(session, None, Address("u", "elsewhere.test"), RcptParams())
    assert verdict.action is Action.REJECT


@pytest.mark.parametrize("rcpt, trick", [
    (Address("user%elsewhere.test", "local.test"), "percent hack"),
    (Address("elsewhere.test!user", "local.test"), "bang path"),
    (Address('"user@elsewhere.test"', "local.test"), "quoted local part containing @"),
    (Address('"user%elsewhere.test"', "local.test"), "quoted local part containing routing characters"),
    (Address("user", "[192.0.2.1]"), "address literal"),
    (Address("user", "[IPv6:2001:db8::1]"), "address literal"),
    (Address("user", "local.test."), "trailing dot in domain"),
])
def test_routing_tricks_are_refused_for_anonymous_clients(rcpt, trick):
    assert routing_trick(rcpt) == trick
    session = Session(peer_ip="198.51.100.1", session_id="s1")
    verdict = POLICY.authorize_rcpt(session, None, rcpt, RcptParams())
    assert str(verdict.reply) == "554 5.7.1 Relay access denied"
    # a trusted client may use them
    trusted = Session(peer_ip="10.0.0.1", session_id="s2")
    assert POLICY.authorize_rcpt(trusted, None, rcpt, RcptParams()) is Verdict.ACCEPT


def test_plain_addresses_are_not_tricks():
    assert routing_trick(Address("first.last+tag", "local.test")) is None
    assert routing_trick(Address('"first last"', "local.test")) is None


def test_bad_relay_network_fails_at_construction():
    with pytest.raises(ValueError):
        DefaultReceivePolicy(CONFIG.accepted_domain, ["10.0.0.0/33"])
