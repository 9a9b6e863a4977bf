"""DMARCbis DNS tree walk (``discovery = "treewalk"``) against a real Knot DNS server on loopback.

The zones below add a parent ``test`` zone (the walk goes up to the TLD), a
public-suffix-like ``registry.test`` with ``psd=y``, an organisation
``walk.test`` with ``np=``, an intermediate record, a ``psd=n`` subdomain, a
name of 10 labels, and ``a.flaky.test`` below a zone that fails to load.
The same filter is run with ``discovery = "psl"`` for the comparisons.
"""
from __future__ import annotations

from typing import Any, Iterator

import pytest

from exmta.dns import AuthDNS
from exmta.filters.authres import auth_state
from exmta.filters.dmarc import DMARCFilter, TreeWalk, parse_record, walk_targets
from exmta.model import Action
from exmta.plugins import FILTER_GROUP, _entry_points
from exmta.routing.dns import DNSResolver
from exmta.send.dkim_sign import DKIMKey, record_text, sign_message
from exmta.testing import FilterHarness, MessageView
from support import authzones, knot
from support.authzones import message, txt

pytestmark = pytest.mark.integration

DEEP = "l1.l2.l3.l4.l5.l6.l7.deep.walk.test"  # 10 labels


def tree_zones(keys: authzones.Keys) -> dict[str, str]:
    key = txt(record_text("rsa-sha256", keys.public["sel1"]))
    walk = f"""\
_dmarc TXT "v=DMARC1; p=reject; sp=quarantine; np=reject"
@ TXT "v=spf1 ip4:192.0.2.0/24 -all"
mail A 192.0.2.1
a.b.c.mail A 192.0.2.1
sel1._domainkey.mail TXT {key}
_dmarc.dept TXT "v=DMARC1; p=none"
x.dept A 192.0.2.1
_dmarc.bad TXT "v=DMARC1; p=bogus"
bad A 192.0.2.1
_dmarc.team TXT "v=DMARC1; p=reject; psd=n"
a.team A 192.0.2.1
_dmarc.l2.l3.l4.l5.l6.l7.deep TXT "v=DMARC1; p=none"
_dmarc.l4.l5.l6.l7.deep TXT "v=DMARC1; p=reject"
{DEEP}. A 192.0.2.1
"""
    registry = f"""\
_dmarc TXT "v=DMARC1; p=reject; sp=quarantine; psd=y"
shop A 192.0.2.1
sub.shop A 192.0.2.1
sel1._domainkey.shop TXT {key}
other A 192.0.2.1
sel1._domainkey.other TXT {key}
"""
    return {
        **authzones.zones(keys),
        "test": "",                       # the walk's last step: _dmarc.test (no record)
        "walk.test": walk,
        "registry.test": registry,        # a public-suffix-like level (psd=y) that PSL does not know
        "tflag.test": '_dmarc TXT "v=DMARC1; p=reject; t=y"\n',
        "pct0.test": '_dmarc TXT "v=DMARC1; p=reject; pct=0"\n',
        "flaky.test": "this line is not a record\n",   # fails to load: SERVFAIL for _dmarc.flaky.test
        "a.flaky.test": '@ A 192.0.2.1\nb A 192.0.2.1\n',
        "n.flaky.test": '_dmarc TXT "v=DMARC1; p=reject; psd=n"\n@ A 192.0.2.1\n',
        "r.flaky.test": f'_dmarc TXT "v=DMARC1; p=reject"\n@ A 192.0.2.1\nsel1._domainkey TXT {key}\n',
    }


@pytest.fixture(scope="module")
def keys() -> authzones.Keys:
    return authzones.make_keys()


@pytest.fixture(scope="module")
def knot_server(tmp_path_factory: pytest.TempPathFactory, keys: authzones.Keys) -> Iterator[knot.KnotServer]:
    with knot.KnotServer(tmp_path_factory.mktemp("treewalk"), tree_zones(keys)) as server:
        yield server


@pytest.fixture
def dns_cfg(knot_server: knot.KnotServer) -> dict[str, Any]:
    return {"dns_servers": [f"{knot_server.host}:{knot_server.port}"], "dns_timeout": 3.0}


class CountingDNS(AuthDNS):
    """AuthDNS that remembers the TXT names it asked Knot for (the answers are Knot's)."""

    def __init__(self, resolver: DNSResolver) -> None:
        super().__init__(resolver)
        self.asked: list[str] = []

    def txt(self, name: str) -> list[bytes] | None:
        self.asked.append(name)
        return super().txt(name)


def counting_dns(knot_server: knot.KnotServer) -> CountingDNS:
    return CountingDNS(DNSResolver(None, None, knot_server.nameservers, timeout=3.0))


def signer(keys: authzones.Keys, domain: str) -> DKIMKey:
    """The sel1 RSA key, published for ``domain`` in the zones above."""
    return DKIMKey(domain, "sel1", "rsa-sha256", keys.rsa.private)


def run(dns_cfg: dict[str, Any], msg: bytes, discovery: str = "treewalk", sender: str = "alice@nowhere.test",
        ip: str = "198.51.100.7", **dmarc: Any) -> tuple[Any, MessageView, Any]:
    """The dkim and dmarc filters (from their entry points) over one message, like a receive connector."""
    filters = _entry_points(FILTER_GROUP)
    chain = [FilterHarness(filters["dkim"].load(), dns_cfg, name="dkim"),
             FilterHarness(filters["dmarc"].load(), {**dns_cfg, "discovery": discovery, **dmarc}, name="dmarc")]
    session = FilterHarness.session(ip, "mx.nowhere.test")
    txn = FilterHarness.transaction(sender, "bob@dest.test")
    view = MessageView(msg)
    verdict = None
    for phase, args in (("helo", (session,)), ("mail", (session, txn.sender, txn.params)),
                        ("data", (session, txn, view))):
        for h in chain:
            verdict = h.run(phase, *args)
            if verdict.action is not Action.CONTINUE:
                return verdict, view, auth_state(session).dmarc
    return verdict, view, auth_state(session).dmarc


# ---------------------------------------------------------------- the walk itself


def test_walk_targets_jump_to_seven_labels_above_eight() -> None:
    assert walk_targets("a.mail.example.com") == ["a.mail.example.com", "mail.example.com", "example.com", "com"]
    ten = walk_targets(DEEP)
    assert ten == [DEEP, "l4.l5.l6.l7.deep.walk.test", "l5.l6.l7.deep.walk.test", "l6.l7.deep.walk.test",
                   "l7.deep.walk.test", "deep.walk.test", "walk.test", "test"]
    eight = walk_targets("a.b.c.d.e.f.g.h")
    assert eight[:2] == ["a.b.c.d.e.f.g.h", "b.c.d.e.f.g.h"] and len(eight) == 8
    assert walk_targets("test") == ["test"]


def test_record_tags_psd_np_t() -> None:
    r = parse_record("v=DMARC1; p=reject; sp=quarantine; psd=y; t=y")
    assert (r.psd, r.testing, r.np) == ("y", True, "quarantine")
    r = parse_record("v=DMARC1; p=none; psd=maybe; t=x")
    assert (r.psd, r.testing, r.np) == ("u", False, "none")  # unknown values: the defaults


def test_deep_subdomain_finds_the_org_policy_by_walking(knot_server: knot.KnotServer) -> None:
    dns = counting_dns(knot_server)
    walk = TreeWalk(dns)
    record, where, problem = walk.policy("a.b.c.mail.walk.test")
    assert (where, problem, record.p) == ("walk.test", "", "reject")
    assert dns.asked == ["_dmarc.a.b.c.mail.walk.test", "_dmarc.b.c.mail.walk.test", "_dmarc.c.mail.walk.test",
                         "_dmarc.mail.walk.test", "_dmarc.walk.test"]
    assert walk.org_domain("a.b.c.mail.walk.test") == "walk.test"
    assert dns.asked[-1] == "_dmarc.test" and len(dns.asked) == 6  # cached: only the TLD was new


def test_deep_subdomain_filter_sp_and_relaxed_alignment_by_walk(dns_cfg: dict[str, Any],
                                                                 keys: authzones.Keys) -> None:
    verdict, view, dmarc = run(dns_cfg, message(from_="a@a.b.c.mail.walk.test"))
    assert verdict.action is Action.CONTINUE and dmarc.result == "fail"
    assert (dmarc.policy, dmarc.disposition, dmarc.org_domain, dmarc.policy_domain) == (
        "quarantine", "quarantine", "walk.test", "walk.test")
    assert view.quarantine_reason.startswith("DMARC policy of a.b.c.mail.walk.test is quarantine")
    signed = sign_message(message(from_="a@a.b.c.mail.walk.test"), [signer(keys, "mail.walk.test")])
    verdict, _, dmarc = run(dns_cfg, signed)
    assert verdict.action is Action.CONTINUE and dmarc.result == "pass" and dmarc.dkim_aligned


def test_intermediate_record_is_nearer_than_the_org_one(dns_cfg: dict[str, Any]) -> None:
    """Where DMARCbis differs: _dmarc.dept.walk.test applies to x.dept.walk.test (RFC 7489 skips it)."""
    verdict, _, dmarc = run(dns_cfg, message(from_="a@x.dept.walk.test"))
    assert verdict.action is Action.CONTINUE
    assert (dmarc.result, dmarc.policy, dmarc.policy_domain, dmarc.org_domain) == (
        "fail", "none", "dept.walk.test", "walk.test")
    _, _, psl = run(dns_cfg, message(from_="a@x.dept.walk.test"), "psl")
    assert (psl.policy, psl.policy_domain, psl.disposition) == ("quarantine", "walk.test", "quarantine")


def test_unusable_record_is_discarded_and_the_walk_goes_on(dns_cfg: dict[str, Any]) -> None:
    """DMARCbis 4.10 steps 2 and 7: a malformed record at the From: domain does not end the walk."""
    verdict, _, dmarc = run(dns_cfg, message(from_="a@bad.walk.test"))
    assert verdict.action is Action.CONTINUE
    assert (dmarc.result, dmarc.policy, dmarc.policy_domain) == ("fail", "quarantine", "walk.test")
    verdict, _, psl = run(dns_cfg, message(from_="a@bad.walk.test"), "psl")  # RFC 7489 6.6.3: permerror
    assert psl.result == "permerror" and "bogus" in psl.reason and verdict.action is Action.CONTINUE


def test_psd_y_at_a_public_suffix_like_level(knot_server: knot.KnotServer, dns_cfg: dict[str, Any],
                                             keys: authzones.Keys) -> None:
    walk = TreeWalk(counting_dns(knot_server))
    assert walk.org_domain("sub.shop.registry.test") == "shop.registry.test"  # one label below the psd=y record
    assert walk.org_domain("shop.registry.test") == "shop.registry.test"
    assert walk.org_domain("registry.test") == "registry.test"  # psd=y at the start does not count
    # same org domain under the PSD: aligned
    signed = sign_message(message(from_="a@sub.shop.registry.test"), [signer(keys, "shop.registry.test")])
    verdict, _, dmarc = run(dns_cfg, signed)
    assert verdict.action is Action.CONTINUE and dmarc.result == "pass" and dmarc.dkim_aligned
    # another organisation under the same PSD: not aligned; the PSD record's sp applies
    signed = sign_message(message(from_="a@shop.registry.test"), [signer(keys, "other.registry.test")])
    verdict, view, dmarc = run(dns_cfg, signed)
    assert dmarc.result == "fail" and not dmarc.dkim_aligned
    assert (dmarc.policy, dmarc.disposition, dmarc.policy_domain, dmarc.org_domain) == (
        "quarantine", "quarantine", "registry.test", "shop.registry.test")
    assert "DKIM pass only for other.registry.test (not aligned)" in dmarc.reason
    # the public suffix list knows no registry.test: org registry.test, so PSL calls the same message aligned
    _, _, psl = run(dns_cfg, signed, "psl")
    assert psl.result == "pass" and psl.org_domain == "registry.test"


def test_psd_n_makes_its_own_org_domain(knot_server: knot.KnotServer, dns_cfg: dict[str, Any],
                                        keys: authzones.Keys) -> None:
    dns = counting_dns(knot_server)
    assert TreeWalk(dns).org_domain("a.team.walk.test") == "team.walk.test"
    assert dns.asked == ["_dmarc.a.team.walk.test", "_dmarc.team.walk.test"]  # psd=n stops the walk
    signed = sign_message(message(from_="a@a.team.walk.test"), [signer(keys, "mail.walk.test")])
    verdict, _, dmarc = run(dns_cfg, signed)
    assert verdict.action is Action.REJECT and (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")
    assert (dmarc.result, dmarc.policy, dmarc.org_domain) == ("fail", "reject", "team.walk.test")
    _, _, psl = run(dns_cfg, signed, "psl")
    assert psl.result == "pass" and psl.org_domain == "walk.test"


def test_np_applies_to_a_non_existent_subdomain(dns_cfg: dict[str, Any]) -> None:
    verdict, _, dmarc = run(dns_cfg, message(from_="a@ghost.walk.test"))
    assert verdict.action is Action.REJECT and (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")
    assert (dmarc.result, dmarc.policy, dmarc.disposition) == ("fail", "reject", "reject")
    assert "ghost.walk.test does not exist (np=reject)" in dmarc.reason
    verdict, _, dmarc = run(dns_cfg, message(from_="a@mail.walk.test"))  # exists (A record): sp
    assert verdict.action is Action.CONTINUE and (dmarc.policy, dmarc.disposition) == ("quarantine", "quarantine")
    _, _, psl = run(dns_cfg, message(from_="a@ghost.walk.test"), "psl")  # RFC 7489 has no np
    assert psl.policy == "quarantine"


def test_more_than_eight_labels_jumps_to_the_last_seven(knot_server: knot.KnotServer,
                                                        dns_cfg: dict[str, Any]) -> None:
    dns = counting_dns(knot_server)
    record, where, _ = TreeWalk(dns).policy(DEEP)
    assert (where, record.p) == ("l4.l5.l6.l7.deep.walk.test", "reject")
    assert "_dmarc.l2.l3.l4.l5.l6.l7.deep.walk.test" not in dns.asked  # the 8-label record is never seen
    assert dns.asked == [f"_dmarc.{DEEP}", "_dmarc.l4.l5.l6.l7.deep.walk.test"]
    verdict, _, dmarc = run(dns_cfg, message(from_=f"a@{DEEP}"))
    assert verdict.action is Action.REJECT and dmarc.org_domain == "walk.test"
    assert (dmarc.policy, dmarc.policy_domain) == ("reject", "l4.l5.l6.l7.deep.walk.test")


def test_dns_failure_during_the_walk_is_451(dns_cfg: dict[str, Any]) -> None:
    # no record below flaky.test: the policy walk itself reaches the SERVFAIL
    verdict, _, dmarc = run(dns_cfg, message(from_="a@b.a.flaky.test"))
    assert verdict.action is Action.TEMPFAIL and (verdict.reply.code, verdict.reply.status) == (451, "4.7.1")
    assert dmarc.result == "temperror" and "DMARC record lookup failed" in dmarc.reason
    # the policy record is found first, but the organisational domain walk fails above it
    verdict, _, dmarc = run(dns_cfg, message(from_="a@r.flaky.test"))
    assert verdict.action is Action.TEMPFAIL and dmarc.result == "temperror"
    # psd=n stops the walk before the broken zone: no temperror, the policy applies
    verdict, _, dmarc = run(dns_cfg, message(from_="a@n.flaky.test"))
    assert verdict.action is Action.REJECT and dmarc.org_domain == "n.flaky.test"
    # on_temperror = "tag" records temperror and accepts
    verdict, _, dmarc = run(dns_cfg, message(from_="a@b.a.flaky.test"), on_temperror="tag")
    assert verdict.action is Action.CONTINUE and dmarc.result == "temperror"


def test_dns_failure_in_an_identity_walk_is_temperror_unless_another_aligns(
        dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    # a DKIM pass for r.flaky.test: its organisational domain walk meets the SERVFAIL of flaky.test
    signed = sign_message(message(from_="a@mail.walk.test"), [signer(keys, "r.flaky.test")])
    verdict, _, dmarc = run(dns_cfg, signed)
    assert verdict.action is Action.TEMPFAIL and verdict.reply.code == 451
    assert dmarc.result == "temperror" and "organisational domain of r.flaky.test" in dmarc.reason
    # with an aligned SPF pass as well, the message passes whatever that walk did
    verdict, _, dmarc = run(dns_cfg, signed, sender="alice@walk.test", ip="192.0.2.10")
    assert verdict.action is Action.CONTINUE and dmarc.result == "pass" and dmarc.spf_aligned


def test_t_flag_replaces_pct(dns_cfg: dict[str, Any]) -> None:
    verdict, _, dmarc = run(dns_cfg, message(from_="a@tflag.test"))
    assert verdict.action is Action.CONTINUE and (dmarc.policy, dmarc.disposition) == ("reject", "quarantine")
    _, _, dmarc = run(dns_cfg, message(from_="a@pct0.test"))  # an RFC 7489 pct=0 record counts as t=y
    assert (dmarc.policy, dmarc.disposition) == ("reject", "quarantine")
    verdict, _, psl = run(dns_cfg, message(from_="a@tflag.test"), "psl")  # RFC 7489 ignores t=
    assert verdict.action is Action.REJECT and psl.disposition == "reject"


ORDINARY = [
    # (From:, sender, ip, DKIM signing domain or None)
    ("alice@example.test", "alice@example.test", "192.0.2.10", "example.test"),
    ("alice@example.test", "alice@example.test", "198.51.100.7", None),
    ("alice@sub.example.test", "alice@example.test", "198.51.100.7", None),
    ("alice@sub.example.test", "alice@sub.example.test", "192.0.2.10", None),
    ("alice@strict.example.test", "alice@example.test", "192.0.2.10", "example.test"),
    ("alice@strict.example.test", "alice@strict.example.test", "192.0.2.10", None),
    ("alice@quar.test", "alice@quar.test", "198.51.100.7", None),
    ("alice@tagonly.test", "alice@tagonly.test", "198.51.100.7", None),
    ("alice@example.test", "alice@other.test", "198.51.100.7", "other.test"),
    ("alice@nodmarc.spf.test", "alice@plain.spf.test", "192.0.2.10", None),
    ("alice@a.b.c.mail.walk.test", "alice@walk.test", "192.0.2.10", None),
    ("alice@twodmarc.test", "alice@twodmarc.test", "198.51.100.7", None),
    ("alice@x.broken.test", "alice@example.test", "192.0.2.10", None),
]


@pytest.mark.parametrize("from_,sender,ip,signing", ORDINARY)
def test_agrees_with_the_psl_method_on_ordinary_domains(dns_cfg: dict[str, Any], keys: authzones.Keys,
                                                        from_: str, sender: str, ip: str,
                                                        signing: str | None) -> None:
    msg = message(from_=from_)
    if signing == "example.test":
        msg = sign_message(msg, [keys.rsa])
    elif signing == "other.test":
        msg = sign_message(msg, [keys.other])
    out, org = {}, {}
    for discovery in ("psl", "treewalk"):
        verdict, _, d = run(dns_cfg, msg, discovery, sender=sender, ip=ip)
        out[discovery] = (verdict.action, verdict.reply.code if verdict.reply else None, d.result, d.policy,
                          d.disposition, d.policy_domain, d.spf_aligned, d.dkim_aligned, d.reason)
        org[discovery] = d.org_domain
    assert out["psl"] == out["treewalk"]
    if out["psl"][2] in ("none", "temperror"):
        # no record anywhere (or no answer): the walk's organisational domain is the From: domain itself
        # (DMARCbis 4.10.2), the list's is one label below the public suffix; neither is used for a decision
        assert org["treewalk"] == from_.partition("@")[2]
    else:
        assert org["psl"] == org["treewalk"]


def test_config_key(dns_cfg: dict[str, Any]) -> None:
    h = FilterHarness(DMARCFilter, {**dns_cfg, "discovery": "treewalk"})
    assert h.filter.discovery == "treewalk"
    assert FilterHarness(DMARCFilter, dns_cfg).filter.discovery == "psl"  # the default: RFC 7489
    with pytest.raises(ValueError, match="discovery must be one of psl, treewalk, not 'dns'"):
        DMARCFilter.from_config("d", {**dns_cfg, "discovery": "dns"}, h.env)
