"""Connector security through the whole SMTP session: StringTransport + Clock, real config, policy,
server and dispatcher (no fakes between them)."""
from __future__ import annotations

import pytest

from exmta.config.load import parse_config
from exmta.receive.backpressure import BackPressure
from exmta.receive.recipients import RecipientList, RecipientValidator
from exmta.receive.wiring import ReceiveResources
from support.receive_harness import Harness

EP = "tcp:2525:interface=127.0.0.1"
HELLO = b"EHLO c.test\r\nMAIL FROM:<a@remote.test>\r\n"


def config(**connector):
    return parse_config({
        "server": {"hostname": "mx.test"},
        "accepted_domains": {"local.test": "authoritative", "hybrid.test": "internal_relay",
                             "partner.test": "external_relay"},
        "receive": {"in": {"listen": [EP], "hostname": "mx.test", **connector}},
    })


def rcpt_reply(h: Harness, address: str, peer: str = "198.51.100.7") -> bytes:
    t, p = h.connect(peer)
    out = h.say(t, p, HELLO + b"RCPT TO:" + address.encode() + b"\r\n")
    return out.rsplit(b"\r\n", 2)[-2]


# every classic open-relay trick, as an anonymous client on the internet connector sends it
@pytest.mark.parametrize("address", [
    "<user%elsewhere.test@local.test>",          # percent hack
    "<user%elsewhere.test@LOCAL.TEST>",
    "<elsewhere.test!user@local.test>",          # bang path
    "<\"user@elsewhere.test\"@local.test>",      # quoted local part containing @
    "<\"user%elsewhere.test\"@local.test>",
    "<\"elsewhere.test!user\"@local.test>",
    "<user@[192.0.2.1]>",                        # IP literal
    "<user@[127.0.0.1]>",
    "<user@[IPv6:::1]>",
    "<user@local.test.>",                        # trailing dot
    "<user@elsewhere.test>",                     # plain relay
    "<user@ElseWhere.Test>",                     # mixed case is the same foreign domain
    "<user@local.test.elsewhere.test>",          # an accepted domain as a prefix
    "<user@elsewhere.test.>",
    "<@local.test:user@elsewhere.test>",         # source route through us to elsewhere
    "<@local.test,@mx.test:user@elsewhere.test>",
    "<user%elsewhere.test@[127.0.0.1]>",
])
def test_open_relay_tricks_are_refused_for_anonymous_clients(address):
    assert rcpt_reply(Harness(config()), address) == b"554 5.7.1 Relay access denied"


@pytest.mark.parametrize("address, final", [
    ("<user@LOCAL.test>", "user@LOCAL.test"),                   # mixed case of an accepted domain is fine
    ("<@elsewhere.test,@x.test:user@local.test>", "user@local.test"),  # route ignored (RFC 5321 C)
])
def test_harmless_forms_reach_the_accepted_domain(address, final):
    h = Harness(config())
    t, p = h.connect("198.51.100.7")
    out = h.say(t, p, HELLO + b"RCPT TO:" + address.encode() + b"\r\nDATA\r\n")
    assert out.endswith(b"250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
    h.say(t, p, b"Subject: x\r\n\r\nx\r\n.\r\n")
    env = h.store.envelope(h.store.queue_ids()[0])
    assert [r.address for r in env.recipients] == [final]


def test_relay_range_and_authenticated_users_may_relay():
    h = Harness(config(relay_networks=["192.0.2.0/24"]))
    assert rcpt_reply(h, "<u@elsewhere.test>", "192.0.2.9") == b"250 2.1.5 Ok"
    assert rcpt_reply(h, "<u%x.test@elsewhere.test>", "192.0.2.9") == b"250 2.1.5 Ok"
    t, p = h.connect("198.51.100.7")
    p.wrappedProtocol.session.auth_identity = "alice"  # what the SMTP AUTH layer sets
    out = h.say(t, p, HELLO + b"RCPT TO:<u@elsewhere.test>\r\n")
    assert out.endswith(b"250 2.1.5 Ok\r\n")


def test_unknown_authoritative_recipient_gets_550_5_1_1_and_postmaster_always_works(tmp_path):
    listing = tmp_path / "rcpts"
    listing.write_text("alice@local.test\n")
    h0 = Harness(config())
    validator = RecipientValidator(RecipientList(str(listing), h0.clock))
    h = Harness(h0.config, clock=h0.clock, resources=ReceiveResources(recipients=validator))
    assert rcpt_reply(h, "<alice@local.test>") == b"250 2.1.5 Ok"
    assert rcpt_reply(h, "<bob@local.test>") == b"550 5.1.1 Recipient address rejected: user unknown"
    assert rcpt_reply(h, "<postmaster@local.test>") == b"250 2.1.5 Ok"
    assert rcpt_reply(h, "<postmaster>") == b"250 2.1.5 Ok"
    assert rcpt_reply(h, "<anyone@hybrid.test>") == b"250 2.1.5 Ok"
    assert rcpt_reply(h, "<anyone@partner.test>") == b"250 2.1.5 Ok"


def test_submission_connector_without_anonymous_group():
    h = Harness(config(permission_groups=["authenticated"]))
    t, p = h.connect("198.51.100.7")
    assert h.say(t, p, HELLO).endswith(b"530 5.7.0 Authentication required\r\n")


def header_kept(h: Harness, peer: str, partner: str | None = None) -> bool:
    from exmta.model import TLSInfo

    t, p = h.connect(peer)
    if partner:
        p.wrappedProtocol.session.tls = TLSInfo("TLSv1.3", "x", "CN=" + partner, partner=partner)
    h.say(t, p, HELLO + b"RCPT TO:<u@local.test>\r\nDATA\r\n")
    out = h.say(t, p, b"X-MS-Exchange-Organization-AuthAs: Internal\r\nSubject: s\r\n\r\nb\r\n.\r\n")
    assert out.startswith(b"250 2.0.0 Ok: queued as "), out
    queue_id = out.split()[-1].decode()
    return b"X-MS-Exchange-Organization-AuthAs" in h.store.content(queue_id)


def test_header_firewall_follows_the_permission_groups():
    cfg = parse_config({
        "accepted_domains": {"local.test": "authoritative"},
        "receive": {
            "internet": {"listen": [EP], "permission_groups": ["anonymous", "partners"],
                         "relay_networks": ["192.0.2.0/24"]},
            "servers": {"listen": [EP], "remote_ranges": ["10.0.0.0/8"], "externally_secured": True,
                        "permission_groups": ["exchange_servers"]},
        },
    })
    h = Harness(cfg)
    assert header_kept(h, "10.1.1.1") is True                       # trusted internal server
    assert header_kept(h, "198.51.100.7") is False                  # anonymous
    assert header_kept(h, "192.0.2.9") is False                     # may relay, still not trusted
    assert header_kept(h, "198.51.100.8", partner="mail.protection.outlook.test") is True


def test_rate_limits_answer_with_an_explanation():
    h = Harness(config(messages_per_minute_per_ip=1, recipients_per_minute_per_ip=2))
    t, p = h.connect("198.51.100.7")
    out = h.say(t, p, HELLO + b"RCPT TO:<a@local.test>\r\nRCPT TO:<b@local.test>\r\nRCPT TO:<c@local.test>\r\n")
    assert out.endswith(b"250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n452 4.5.3 Error: too many recipients from 198.51.100.7, "
                        b"limit 2 recipients per minute; try again later\r\n")
    out = h.say(t, p, b"RSET\r\nMAIL FROM:<a@remote.test>\r\n")
    assert out.endswith(b"450 4.7.1 Error: too much mail from 198.51.100.7, limit 1 messages per minute; "
                        b"try again later\r\n")
    h.clock.advance(125)
    assert h.say(t, p, b"MAIL FROM:<a@remote.test>\r\n") == b"250 2.1.0 Ok\r\n"


def test_back_pressure_refuses_new_mail_but_finishes_what_was_started():
    free = {"octets": 10**9}
    bp = BackPressure("/queue", min_free_disk=10**8, free_space=lambda path: free["octets"])
    bp.check()
    h0 = Harness(config())
    h = Harness(h0.config, clock=h0.clock, resources=ReceiveResources(back_pressure=bp))
    t1, p1 = h.connect("198.51.100.7")
    out = h.say(t1, p1, HELLO + b"RCPT TO:<u@local.test>\r\nDATA\r\n")
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    free["octets"] = 10**7
    bp.check()
    assert bp.status()["pressure"] == 1
    t2, p2 = h.connect("198.51.100.8")
    assert h.say(t2, p2, HELLO).endswith(
        b"452 4.3.1 Insufficient system resources (free disk space 9.5 MiB below 95.4 MiB), try again later\r\n")
    # the transaction that was under way is not touched
    assert h.say(t1, p1, b"Subject: s\r\n\r\nb\r\n.\r\n").startswith(b"250 2.0.0 Ok: queued as ")
    assert len(h.store.queue_ids()) == 1
    free["octets"] = 10**9
    bp.check()
    assert h.say(t2, p2, b"MAIL FROM:<a@remote.test>\r\n") == b"250 2.1.0 Ok\r\n"
    assert bp.status()["refused_mail_commands"] == 1


def test_header_firewall_asks_the_policy_in_use_after_a_reload():
    from dataclasses import replace

    from exmta.receive.wiring import make_policy

    cfg = config(remote_ranges=["10.0.0.0/8"])
    h = Harness(cfg)
    assert header_kept(h, "10.1.1.1") is False
    # SIGHUP reload (exmta.observe.reload) swaps factory.policy: the new permission groups decide
    rc = replace(cfg.receive[0], externally_secured=True, permission_groups=("exchange_servers",))
    h.factories[0].policy = make_policy(cfg, rc, h.clock)
    assert header_kept(h, "10.1.1.2") is True
