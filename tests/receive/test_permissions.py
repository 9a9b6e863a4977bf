"""Permission groups -> rights, recipient validation and rate limits of DefaultReceivePolicy (fake sessions)."""
from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from exmta.config.schema import AcceptedDomain, Config
from exmta.model import Action, Address, MailParams, RcptParams, Session, TLSInfo, Verdict
from exmta.receive.backpressure import BackPressure
from exmta.receive.policy import ORG_HEADERS, RELAY, SUBMIT, DefaultReceivePolicy, is_partner
from exmta.receive.recipients import RecipientList, RecipientValidator

CONFIG = Config(accepted_domains=(
    AcceptedDomain("local.test"),
    AcceptedDomain("internal.test", "internal_relay"),
    AcceptedDomain("external.test", "external_relay"),
))


def policy(groups=("anonymous", "authenticated"), **kw) -> DefaultReceivePolicy:
    kw.setdefault("clock", Clock())
    return DefaultReceivePolicy(CONFIG.accepted_domain, kw.pop("relay_networks", ()), permission_groups=groups, **kw)


def sess(ip="198.51.100.1", auth=None, partner=None) -> Session:
    tls = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", "CN=partner.test", partner=partner) if partner else None
    return Session(peer_ip=ip, session_id="s", auth_identity=auth, tls=tls)


def result(v) -> Verdict:
    """The verdict of a sync or Deferred answer (everything here fires at once)."""
    if isinstance(v, Deferred):
        out = []
        v.addBoth(out.append)
        assert out, "the Deferred did not fire"
        return out[0]
    return v


def rcpt(p, s, address) -> Verdict:
    return result(p.authorize_rcpt(s, None, Address.parse_simple(address), RcptParams()))


def mail(p, s) -> Verdict:
    return p.check_mail(s, Address("a", "x.test"), MailParams())


def test_rights_of_each_group():
    p = policy(("anonymous", "authenticated", "partners", "exchange_servers"), externally_secured=True)
    assert p.rights(sess()) == {SUBMIT, RELAY, ORG_HEADERS}  # externally secured: every client is a server
    p = policy(("anonymous", "authenticated", "partners"))
    assert p.rights(sess()) == {SUBMIT}
    assert p.rights(sess(auth="alice")) == {SUBMIT, RELAY}
    assert p.rights(sess(partner="partner.test")) == {SUBMIT, ORG_HEADERS}
    assert policy(("authenticated",)).rights(sess()) == frozenset()
    assert policy(("anonymous",)).rights(sess(auth="alice")) == {SUBMIT}  # group not granted on this connector
    # a relay range grants relay, not the header firewall bypass
    assert policy(relay_networks=["10.0.0.0/8"]).rights(sess("10.0.0.1")) == {SUBMIT, RELAY}
    assert policy(("exchange_servers",)).rights(sess()) == frozenset()  # not externally secured


def test_partner_needs_a_matched_certificate():
    assert is_partner(sess(partner="partner.test"))
    unmatched = Session(peer_ip="192.0.2.1", tls=TLSInfo("TLSv1.3", "x", "CN=someone"))
    assert not is_partner(unmatched)
    assert not is_partner(sess())


def test_header_firewall_trust_comes_from_the_groups():
    p = policy(("anonymous", "authenticated", "partners"), relay_networks=["10.0.0.0/8"])
    assert not p.trusted(sess("10.0.0.1"))
    assert not p.trusted(sess(auth="alice"))
    assert p.trusted(sess(partner="partner.test"))
    servers = policy(("exchange_servers",), externally_secured=True)
    assert servers.trusted(sess("10.9.9.9"))
    # without permission groups (the old constructor) a relay client stays trusted
    legacy = DefaultReceivePolicy(CONFIG.accepted_domain, ["10.0.0.0/8"])
    assert legacy.trusted(sess("10.0.0.1")) and not legacy.trusted(sess())


def test_a_submission_connector_refuses_anonymous_mail():
    p = policy(("authenticated",))
    v = mail(p, sess())
    assert v.action is Action.REJECT and str(v.reply) == "530 5.7.0 Authentication required"
    assert mail(p, sess(auth="alice")) is Verdict.CONTINUE
    assert rcpt(p, sess(auth="alice"), "u@elsewhere.test") is Verdict.ACCEPT


def test_unknown_permission_group():
    with pytest.raises(ValueError):
        policy(("anonymous", "everyone"))


@pytest.mark.parametrize("address", ["u@internal.test", "u@external.test", "anyone@INTERNAL.test"])
def test_internal_and_external_relay_domains_are_not_validated(tmp_path, address):
    listing = tmp_path / "rcpts"
    listing.write_text("known@local.test\n")
    clock = Clock()
    p = policy(clock=clock, recipients=RecipientValidator(RecipientList(str(listing), clock)))
    assert rcpt(p, sess(), address) is Verdict.ACCEPT


def test_authoritative_recipients_are_validated(tmp_path):
    listing = tmp_path / "rcpts"
    listing.write_text("# users\nKnown@local.test\nteam-*@local.test  # wildcard\n")
    clock = Clock()
    p = policy(clock=clock, recipients=RecipientValidator(RecipientList(str(listing), clock)))
    assert rcpt(p, sess(), "known@LOCAL.test") is Verdict.ACCEPT
    assert rcpt(p, sess(), "team-sales@local.test") is Verdict.ACCEPT
    assert rcpt(p, sess(), "postmaster@local.test") is Verdict.ACCEPT
    v = rcpt(p, sess(), "nobody@local.test")
    assert str(v.reply) == "550 5.1.1 Recipient address rejected: user unknown"
    # authenticated users are validated too (better a 550 now than a bounce later)
    assert rcpt(p, sess(auth="alice"), "nobody@local.test").reply.code == 550


def test_directory_lookup_hook_comes_first(tmp_path):
    seen = []

    def lookup(address):
        seen.append(str(address))
        return succeed({"ldap@local.test": True, "gone@local.test": False}.get(str(address).lower()))

    listing = tmp_path / "rcpts"
    listing.write_text("listed@local.test\ngone@local.test\n")
    clock = Clock()
    p = policy(clock=clock, recipients=RecipientValidator(RecipientList(str(listing), clock), [lookup]))
    assert rcpt(p, sess(), "ldap@local.test") is Verdict.ACCEPT
    assert rcpt(p, sess(), "gone@local.test").reply.code == 550   # the directory said no
    assert rcpt(p, sess(), "listed@local.test") is Verdict.ACCEPT  # the directory did not know
    assert seen == ["ldap@local.test", "gone@local.test", "listed@local.test"]


def test_a_failing_lookup_or_missing_list_is_a_temporary_failure(tmp_path):
    def broken(address):
        raise RuntimeError("ldap down")

    p = policy(recipients=RecipientValidator(lookups=[broken]))
    v = rcpt(p, sess(), "u@local.test")
    assert v.action is Action.TEMPFAIL and v.reply.code == 451
    clock = Clock()
    missing = policy(clock=clock, recipients=RecipientValidator(RecipientList(str(tmp_path / "none"), clock)))
    assert rcpt(missing, sess(), "u@local.test").reply.status == "4.3.0"


def test_message_rate_per_ip_and_per_user():
    clock = Clock()
    p = policy(clock=clock, messages_per_minute_per_ip=2, messages_per_minute_per_user=3)
    assert mail(p, sess()) is Verdict.CONTINUE
    assert mail(p, sess()) is Verdict.CONTINUE
    v = mail(p, sess())
    assert v.action is Action.TEMPFAIL
    assert str(v.reply) == ("450 4.7.1 Error: too much mail from 198.51.100.1, limit 2 messages per minute; "
                            "try again later")
    assert mail(p, sess("198.51.100.2")) is Verdict.CONTINUE  # another source
    # one user from many addresses
    for i in range(3):
        assert mail(p, sess(f"192.0.2.{i}", auth="bob")) is Verdict.CONTINUE
    assert "too much mail from bob" in str(mail(p, sess("192.0.2.9", auth="bob")).reply)
    clock.advance(120)
    assert mail(p, sess()) is Verdict.CONTINUE
    assert mail(p, sess("192.0.2.9", auth="bob")) is Verdict.CONTINUE


def test_recipient_rate_per_ip_and_per_user():
    clock = Clock()
    p = policy(clock=clock, recipients_per_minute_per_ip=3, recipients_per_minute_per_user=4)
    for i in range(3):
        assert rcpt(p, sess(), f"u{i}@local.test") is Verdict.ACCEPT
    v = rcpt(p, sess(), "u9@local.test")
    assert v.action is Action.TEMPFAIL
    assert str(v.reply) == ("452 4.5.3 Error: too many recipients from 198.51.100.1, limit 3 recipients per "
                            "minute; try again later")
    # refused recipients do not count: relay attempts are not rate-limited away
    p2 = policy(clock=clock, recipients_per_minute_per_ip=1)
    assert rcpt(p2, sess(), "u@elsewhere.test").reply.code == 554
    assert rcpt(p2, sess(), "u@local.test") is Verdict.ACCEPT
    for i in range(4):
        assert rcpt(p, sess(f"192.0.2.{i}", auth="carol"), "x@elsewhere.test") is Verdict.ACCEPT
    assert "from carol" in str(rcpt(p, sess("192.0.2.50", auth="carol"), "x@elsewhere.test").reply)
    clock.advance(61)
    # the sliding window still remembers part of the last minute
    assert rcpt(p, sess(), "u@local.test").action is Action.TEMPFAIL
    clock.advance(60)
    assert rcpt(p, sess(), "u@local.test") is Verdict.ACCEPT


def test_back_pressure_refuses_new_mail_with_452_4_3_1():
    free = {"bytes": 10 * 1024 * 1024}
    bp = BackPressure("/nonexistent", min_free_disk=50 * 1024 * 1024, free_space=lambda path: free["bytes"])
    bp.check()
    p = policy(back_pressure=bp)
    v = mail(p, sess())
    assert v.action is Action.TEMPFAIL
    assert str(v.reply) == ("452 4.3.1 Insufficient system resources (free disk space 10.0 MiB below 50.0 MiB), "
                            "try again later")
    free["bytes"] = 60 * 1024 * 1024
    bp.check()
    assert mail(p, sess()) is Verdict.CONTINUE
