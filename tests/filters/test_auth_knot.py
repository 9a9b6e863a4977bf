"""SPF, DKIM, DMARC, ARC and Authentication-Results filters against a real Knot DNS server on loopback.

Every filter is built through its entry point (the public plugin API) and
run with exmta.testing.FilterHarness; DNS goes to Knot only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from exmta.dns import AuthDNS
from exmta.filters.authres import auth_state
from exmta.filters.spf import check_spf
from exmta.model import Action
from exmta.plugins import FILTER_GROUP, _entry_points
from exmta.routing.dns import DNSResolver
from exmta.send.dkim_sign import DKIMKey, sign_message
from exmta.testing import FilterHarness, MessageView
from support import authzones, knot
from support.authzones import message

pytestmark = pytest.mark.integration


@pytest.fixture
def dns_cfg(knot_server: knot.KnotServer) -> dict[str, Any]:
    return {"dns_servers": [f"{knot_server.host}:{knot_server.port}"], "dns_timeout": 3.0}


@pytest.fixture
def silent() -> Iterator[authzones.SilentUDP]:
    yield from authzones.silent_udp()


def plugin(name: str) -> Any:
    """The factory registered under ``name`` in the exmta.filters entry-point group."""
    return _entry_points(FILTER_GROUP)[name].load()


def auth_dns(knot_server: knot.KnotServer) -> AuthDNS:
    return AuthDNS(DNSResolver(None, None, knot_server.nameservers, timeout=3.0))


class Chain:
    """The auth filters of one receive connector, in order, sharing one session (like the server)."""

    def __init__(self, dns_cfg: dict[str, Any], names: tuple[str, ...] = ("spf", "dkim", "arc", "dmarc", "authres"),
                 **per_filter: dict[str, Any]) -> None:
        self.h = {n: FilterHarness(plugin(n), {**(dns_cfg if n != "authres" else {}), **per_filter.get(n, {})},
                                   name=n) for n in names}

    def run(self, msg: bytes, sender: str = "alice@example.test", ip: str = "192.0.2.10",
            helo: str = "mx.example.test", auth: str | None = None) -> tuple[Any, MessageView, Any]:
        session = FilterHarness.session(ip, helo, auth_identity=auth)
        txn = FilterHarness.transaction(sender, "bob@dest.test")
        view = MessageView(msg)
        for phase, args in (("helo", (session,)), ("mail", (session, txn.sender, txn.params)),
                            ("data", (session, txn, view))):
            for h in self.h.values():
                verdict = h.run(phase, *args)
                if verdict.action is not Action.CONTINUE:
                    return verdict, view, auth_state(session)
        return verdict, view, auth_state(session)


def ar_header(view: MessageView) -> str:
    ops = [op for op in view.edits.ops if op[0] == "insert" and op[1] == "Authentication-Results"]
    assert len(ops) == 1
    return ops[0][2]


# ---------------------------------------------------------------- SPF


SPF_MATRIX = [
    # (sender, ip, expected result)
    ("alice@plain.spf.test", "192.0.2.10", "pass"),
    ("alice@plain.spf.test", "198.51.100.7", "fail"),
    ("alice@inc.spf.test", "192.0.2.10", "pass"),
    ("alice@inc.spf.test", "198.51.100.7", "softfail"),
    ("alice@redir.spf.test", "192.0.2.10", "pass"),
    ("alice@redir.spf.test", "198.51.100.7", "fail"),
    ("alice@macro.spf.test", "192.0.2.10", "pass"),
    ("bob@macro.spf.test", "192.0.2.10", "fail"),
    ("alice-ext@macro.spf.test", "192.0.2.10", "pass"),  # l1r+-: reversed on "-", rightmost part
    ("ext-alice@macro.spf.test", "192.0.2.10", "fail"),
    ("alice@mxm.spf.test", "192.0.2.20", "pass"),
    ("alice@mxm.spf.test", "192.0.2.21", "fail"),
    ("alice@amech.spf.test", "192.0.2.30", "pass"),
    ("alice@ip6m.spf.test", "2001:db8::5", "pass"),
    ("alice@ip6m.spf.test", "2001:db9::5", "fail"),
    ("alice@soft.spf.test", "192.0.2.10", "softfail"),
    ("alice@neutral.spf.test", "192.0.2.10", "neutral"),
    ("alice@exp.spf.test", "192.0.2.10", "fail"),
    ("alice@toomany.spf.test", "192.0.2.10", "permerror"),
    ("alice@void.spf.test", "192.0.2.10", "permerror"),
    ("alice@tempinc.spf.test", "192.0.2.10", "temperror"),
    ("alice@syntax.spf.test", "192.0.2.10", "permerror"),
    ("alice@badmech.spf.test", "192.0.2.10", "permerror"),
    ("alice@two.spf.test", "192.0.2.10", "permerror"),
    ("alice@nospf.spf.test", "192.0.2.10", "none"),
    ("alice@nxdomain.spf.test", "192.0.2.10", "none"),
]


@pytest.mark.parametrize("sender,ip,expected", SPF_MATRIX)
def test_spf_matrix(knot_server: knot.KnotServer, sender: str, ip: str, expected: str) -> None:
    dns = auth_dns(knot_server)
    result = check_spf(dns, ip, sender, "client.example.test", "mx.example.test")
    assert result.result == expected, result


def test_spf_explanation_macro_expanded(knot_server: knot.KnotServer) -> None:
    result = check_spf(auth_dns(knot_server), "192.0.2.10", "alice@exp.spf.test", "h.test", "mx.example.test")
    assert result.result == "fail"
    assert result.explanation == "192.0.2.10 is not one of exp.spf.test's servers"


def test_spf_null_sender_uses_helo(knot_server: knot.KnotServer) -> None:
    result = check_spf(auth_dns(knot_server), "192.0.2.10", "", "helo.spf.test", "mx.example.test")
    assert (result.result, result.domain, result.subject) == ("pass", "helo.spf.test", "postmaster@helo.spf.test")
    result = check_spf(auth_dns(knot_server), "203.0.113.1", "", "helo.spf.test", "mx.example.test", "helo")
    assert result.result == "fail" and result.identity == "helo"


def test_spf_filter_tempfails_on_servfail_by_default(dns_cfg: dict[str, Any]) -> None:
    h = FilterHarness(plugin("spf"), dns_cfg)
    session = h.session("192.0.2.10")
    verdict = h.run("mail", session, h.transaction("alice@tempinc.spf.test").sender, None)
    assert verdict.action is Action.TEMPFAIL
    assert (verdict.reply.code, verdict.reply.status) == (451, "4.7.24")
    assert auth_state(session).mailfrom.result == "temperror"


def test_spf_filter_timeout_is_temperror_not_pass(silent: authzones.SilentUDP) -> None:
    h = FilterHarness(plugin("spf"), {"dns_servers": [f"127.0.0.1:{silent.port}"], "dns_timeout": 0.5})
    session = h.session("192.0.2.10")
    verdict = h.run("mail", session, h.transaction("alice@example.test").sender, None)
    assert verdict.action is Action.TEMPFAIL and verdict.reply.code == 451
    assert auth_state(session).mailfrom.result == "temperror"
    assert "timeout" in auth_state(session).mailfrom.explanation.lower()


def test_spf_filter_tag_mode_and_reject_fail(dns_cfg: dict[str, Any]) -> None:
    h = FilterHarness(plugin("spf"), {**dns_cfg, "on_temperror": "tag"})
    s = h.session("192.0.2.10")
    assert h.run("mail", s, h.transaction("alice@tempinc.spf.test").sender, None).action is Action.CONTINUE
    h = FilterHarness(plugin("spf"), {**dns_cfg, "reject_fail": True})
    v = h.run("mail", h.session("198.51.100.7"), h.transaction("alice@plain.spf.test").sender, None)
    assert v.action is Action.REJECT and (v.reply.code, v.reply.status) == (550, "5.7.23")
    # default: fail is recorded, DMARC decides
    h = FilterHarness(plugin("spf"), dns_cfg)
    assert h.run("mail", h.session("198.51.100.7"), h.transaction("alice@plain.spf.test").sender,
                 None).action is Action.CONTINUE


def test_spf_filter_skips_authenticated_sessions(silent: authzones.SilentUDP) -> None:
    h = FilterHarness(plugin("spf"), {"dns_servers": [f"127.0.0.1:{silent.port}"], "dns_timeout": 0.5})
    s = h.session("192.0.2.10", auth_identity="alice")
    assert h.run("mail", s, h.transaction("alice@example.test").sender, None).action is Action.CONTINUE


def test_spf_oversize_txt_is_permerror(knot_server: knot.KnotServer) -> None:
    dns = auth_dns(knot_server)
    dns.max_txt = 100
    result = check_spf(dns, "192.0.2.10", "alice@toomany.spf.test", "h.test")
    assert result.result == "permerror" and "octets" in result.explanation


@pytest.mark.parametrize("config,problem", [
    ({"on_temperror": "accept"}, "on_temperror"),
    ({"dns_servers": ["ns.example.test"]}, "dns_servers"),
    ({"dns_timeout": 0}, "dns_timeout"),
    ({"reject_fail": "yes"}, "reject_fail"),
    ({"rejectfail": True}, "rejectfail"),
])
def test_spf_bad_config_names_the_key(config: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        FilterHarness(plugin("spf"), config)


# ---------------------------------------------------------------- DKIM


def dkim_results(dns_cfg: dict[str, Any], msg: bytes) -> list[Any]:
    h = FilterHarness(plugin("dkim"), {**dns_cfg, "on_temperror": "tag"})
    s = h.session()
    txn = h.transaction("alice@example.test", "bob@dest.test")
    assert h.run("data", s, txn, MessageView(msg)).action is Action.CONTINUE
    return auth_state(s).dkim


def test_dkim_rsa_and_ed25519_both_pass(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    signed = sign_message(message(), [keys.rsa, keys.ed])
    results = dkim_results(dns_cfg, signed)
    assert [(r.result, r.selector, r.algorithm) for r in results] == [
        ("pass", "sel1", "rsa-sha256"), ("pass", "ed", "ed25519-sha256")]
    assert all(r.domain == "example.test" and len(r.b_prefix) == 8 for r in results)


def test_dkim_each_signature_has_its_own_result(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    good = sign_message(message(), [keys.rsa])
    # a second, broken signature on top: same key, but claims a wrong body hash
    broken = good.replace(b"bh=", b"bh=AAAA", 1)
    both = sign_message(message(), [keys.ed]).split(b"\r\n", 1)[0]  # unused guard
    assert both
    mixed = broken.split(b"From:", 1)[0] + good  # broken first, then the good one
    results = dkim_results(dns_cfg, mixed)
    assert [r.result for r in results] == ["fail", "pass"]
    assert results[0].reason == "body hash mismatch"


def test_dkim_body_changed_fails(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    signed = sign_message(message(), [keys.rsa]).replace(b"Hello.", b"Hullo.")
    [r] = dkim_results(dns_cfg, signed)
    assert r.result == "fail" and r.reason == "body hash mismatch"


def test_dkim_header_changed_fails(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    signed = sign_message(message(), [keys.ed]).replace(b"Subject: test", b"Subject: tset")
    [r] = dkim_results(dns_cfg, signed)
    assert r.result == "fail" and r.reason == "signature did not verify"


def _sign_with(key: DKIMKey, msg: bytes, **kw: Any) -> bytes:
    import dkim

    return dkim.sign(msg, key.selector.encode(), key.domain.encode(), key.private,
                     signature_algorithm=key.algorithm.encode(), **kw) + msg


def test_dkim_simple_and_relaxed_canonicalisation(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    msg = message(body=b"Line with trailing space  \r\n\r\n\r\n")
    simple = _sign_with(keys.rsa, msg, canonicalize=(b"simple", b"simple"))
    relaxed = _sign_with(keys.rsa, msg, canonicalize=(b"relaxed", b"relaxed"))
    assert dkim_results(dns_cfg, simple)[0].result == "pass"
    assert dkim_results(dns_cfg, relaxed)[0].result == "pass"
    # relaxed tolerates whitespace changes in the body, simple does not
    assert dkim_results(dns_cfg, relaxed.replace(b"trailing space  ", b"trailing  space"))[0].result == "pass"
    assert dkim_results(dns_cfg, simple.replace(b"trailing space  ", b"trailing  space"))[0].result == "fail"


def test_dkim_l_tag_allows_appended_text(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    signed = _sign_with(keys.rsa, message(), length=True)
    assert b" l=" in signed.split(b"\r\n\r\n")[0] or b";l=" in signed or b"l=" in signed.split(b"From:")[0]
    appended = signed + b"-- \r\nlist footer\r\n"
    assert dkim_results(dns_cfg, appended)[0].result == "pass"


def test_dkim_long_folded_headers_and_8bit_body(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    folded = "Subject: " + " ".join(["word"] * 200)
    folded_bytes = folded.encode().replace(b" word", b"\r\n word", 150)
    msg = (b"From: =?utf-8?q?J=C3=B6rg?= <joerg@example.test>\r\nTo: bob@dest.test\r\n" + folded_bytes
           + b"\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
           + b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n")
    for key in (keys.rsa, keys.ed):
        assert dkim_results(dns_cfg, sign_message(msg, [key]))[0].result == "pass"


def test_dkim_smtputf8_addresses(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    msg = message(from_="Jörg <jörg@example.test>", body="Grüße\r\n".encode())
    assert dkim_results(dns_cfg, sign_message(msg, [keys.rsa, keys.ed]))[0].result == "pass"


@pytest.mark.parametrize("selector,reason", [
    ("notb64", "base64"),
    ("revoked", "key"),
    ("missing", "key"),
    ("big", "octets"),
])
def test_dkim_bad_keys_are_permerror(dns_cfg: dict[str, Any], keys: authzones.Keys, selector: str,
                                     reason: str) -> None:
    key = DKIMKey("example.test", selector, "rsa-sha256", keys.rsa.private)
    [r] = dkim_results(dns_cfg, sign_message(message(), [key]))
    assert r.result == "permerror" and reason in r.reason, r


def test_dkim_short_rsa_key_is_permerror(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    h = FilterHarness(plugin("dkim"), {**dns_cfg, "min_key_bits": 2048})
    s = h.session()
    h.run("data", s, h.transaction(), MessageView(sign_message(message(), [keys.short])))
    [r] = auth_state(s).dkim
    assert r.result == "permerror" and "too short: 1024" in r.reason


def test_dkim_malformed_signature_is_permerror(dns_cfg: dict[str, Any]) -> None:
    msg = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; garbage\r\n" + message()
    [r] = dkim_results(dns_cfg, msg)
    assert r.result == "permerror" and "malformed" in r.reason


def test_dkim_key_servfail_is_temperror_and_451(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    key = DKIMKey("broken.test", "s1", "rsa-sha256", keys.rsa.private)  # the zone gives SERVFAIL
    h = FilterHarness(plugin("dkim"), dns_cfg)
    s = h.session()
    v = h.run("data", s, h.transaction(), MessageView(sign_message(message(), [key])))
    assert v.action is Action.TEMPFAIL and (v.reply.code, v.reply.status) == (451, "4.7.5")
    assert auth_state(s).dkim[0].result == "temperror"


def test_dkim_unsigned_message_is_none(dns_cfg: dict[str, Any]) -> None:
    assert dkim_results(dns_cfg, message()) == []


# ---------------------------------------------------------------- DMARC and Authentication-Results


def test_dmarc_pass_by_spf_and_dkim_and_ar_header(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    verdict, view, state = Chain(dns_cfg).run(sign_message(message(), [keys.rsa]))
    assert verdict.action is Action.CONTINUE
    assert state.dmarc.result == "pass" and state.dmarc.spf_aligned and state.dmarc.dkim_aligned
    ar = ar_header(view)
    assert ar.startswith("mx.example.test;\r\n\t")
    assert "spf=pass" in ar and "smtp.mailfrom=alice@example.test" in ar
    assert "dkim=pass header.d=example.test header.i=@example.test header.s=sel1 header.a=rsa-sha256 header.b=" in ar
    assert "dmarc=pass (p=reject dis=none) header.from=example.test" in ar
    assert "arc=none" in ar
    assert view.quarantine_reason is None


def test_dmarc_reject_gives_550_with_reason(dns_cfg: dict[str, Any]) -> None:
    verdict, _, state = Chain(dns_cfg).run(message(), ip="198.51.100.7")
    assert verdict.action is Action.REJECT
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")
    assert "DMARC policy of example.test" in verdict.reply.text and "SPF fail" in verdict.reply.text
    assert state.dmarc.result == "fail" and state.dmarc.disposition == "reject"


def test_dmarc_unaligned_dkim_pass_still_fails(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    verdict, _, state = Chain(dns_cfg).run(sign_message(message(), [keys.other]), ip="198.51.100.7")
    assert verdict.action is Action.REJECT
    assert "DKIM pass only for other.test (not aligned)" in state.dmarc.reason


def test_dmarc_relaxed_alignment_subdomain_and_sp(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    # From: sub.example.test, signed by example.test: relaxed alignment passes
    msg = sign_message(message(from_="a@sub.example.test"), [keys.rsa])
    verdict, _, state = Chain(dns_cfg).run(msg, sender="a@other.test", ip="198.51.100.7")
    assert verdict.action is Action.CONTINUE and state.dmarc.result == "pass" and state.dmarc.dkim_aligned
    # failing mail from the subdomain takes sp=quarantine from the organisational domain's record
    verdict, view, state = Chain(dns_cfg).run(message(from_="a@sub.example.test"), sender="a@sub.example.test",
                                              ip="198.51.100.7")
    assert verdict.action is Action.CONTINUE
    assert state.dmarc.policy == "quarantine" and state.dmarc.org_domain == "example.test"
    assert view.quarantine_reason.startswith("DMARC policy of sub.example.test is quarantine")


def test_dmarc_strict_alignment(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    msg = sign_message(message(from_="a@strict.example.test"), [keys.rsa])  # d=example.test
    verdict, _, state = Chain(dns_cfg).run(msg, sender="a@example.test")
    assert verdict.action is Action.REJECT and not state.dmarc.dkim_aligned and not state.dmarc.spf_aligned
    verdict, _, state = Chain(dns_cfg).run(message(from_="a@strict.example.test"), sender="a@strict.example.test")
    assert verdict.action is Action.CONTINUE and state.dmarc.spf_aligned


def test_dmarc_quarantine_holds_the_message(dns_cfg: dict[str, Any]) -> None:
    verdict, view, state = Chain(dns_cfg).run(message(from_="a@quar.test"), sender="a@quar.test",
                                              ip="198.51.100.7")
    assert verdict.action is Action.CONTINUE
    assert state.dmarc.disposition == "quarantine" and "quar.test" in view.quarantine_reason
    assert "dmarc=fail (p=quarantine dis=quarantine) header.from=quar.test" in ar_header(view)


def test_dmarc_quarantine_tag_mode(dns_cfg: dict[str, Any]) -> None:
    chain = Chain(dns_cfg, dmarc={"quarantine": "tag"})
    verdict, view, state = chain.run(message(from_="a@quar.test"), sender="a@quar.test", ip="198.51.100.7")
    assert verdict.action is Action.CONTINUE and view.quarantine_reason is None
    assert state.dmarc.disposition == "none"


def test_dmarc_pct_zero_downgrades_reject_to_quarantine(dns_cfg: dict[str, Any]) -> None:
    verdict, view, state = Chain(dns_cfg).run(message(from_="a@pct.test"), sender="a@pct.test", ip="198.51.100.7")
    assert verdict.action is Action.CONTINUE
    assert (state.dmarc.policy, state.dmarc.disposition) == ("reject", "quarantine")
    assert view.quarantine_reason is not None


def test_dmarc_p_none_only_tags(dns_cfg: dict[str, Any]) -> None:
    verdict, view, state = Chain(dns_cfg).run(message(from_="a@tagonly.test"), sender="a@tagonly.test",
                                              ip="198.51.100.7")
    assert verdict.action is Action.CONTINUE and view.quarantine_reason is None
    assert "dmarc=fail (p=none dis=none)" in ar_header(view)


def test_dmarc_per_domain_override(dns_cfg: dict[str, Any]) -> None:
    chain = Chain(dns_cfg, dmarc={"overrides": {"example.test": "none", "tagonly.test": "reject"}})
    verdict, _, state = chain.run(message(), ip="198.51.100.7")
    assert verdict.action is Action.CONTINUE and state.dmarc.disposition == "none"
    verdict, _, _ = chain.run(message(from_="a@tagonly.test"), sender="a@tagonly.test", ip="198.51.100.7")
    assert verdict.action is Action.REJECT


def test_dmarc_enforce_false_only_tags(dns_cfg: dict[str, Any]) -> None:
    verdict, view, state = Chain(dns_cfg, dmarc={"enforce": False}).run(message(), ip="198.51.100.7")
    assert verdict.action is Action.CONTINUE and state.dmarc.result == "fail"
    assert "dmarc=fail (p=reject dis=none)" in ar_header(view)


@pytest.mark.parametrize("msg,reason", [
    (b"To: bob@dest.test\r\nSubject: x\r\n\r\nbody\r\n", "no From"),
    (b"From: a@example.test\r\nFrom: b@other.test\r\n\r\nbody\r\n", "2 From"),
    (b"From: a@example.test, b@other.test\r\n\r\nbody\r\n", "2 domains"),
    (b"From: undisclosed\r\n\r\nbody\r\n", "no address"),
])
def test_dmarc_from_problems_fail_with_550(dns_cfg: dict[str, Any], msg: bytes, reason: str) -> None:
    verdict, _, state = Chain(dns_cfg).run(msg)
    assert verdict.action is Action.REJECT and verdict.reply.status == "5.7.1"
    assert reason in verdict.reply.text and "6.6.1" in verdict.reply.text
    assert state.dmarc.result == "permerror"
    verdict, view, _ = Chain(dns_cfg, dmarc={"malformed_from": "tag"}).run(msg)
    assert verdict.action is Action.CONTINUE and "dmarc=permerror" in ar_header(view)


@pytest.mark.parametrize("domain,result,text", [
    ("baddmarc.test", "permerror", "bogus"),
    ("twodmarc.test", "permerror", "2 DMARC records"),
    ("bigdmarc.test", "permerror", "octets"),
    ("nodmarc.spf.test", "none", "no DMARC record"),
])
def test_dmarc_record_problems(dns_cfg: dict[str, Any], domain: str, result: str, text: str) -> None:
    verdict, view, state = Chain(dns_cfg).run(message(from_=f"a@{domain}"), sender=f"a@{domain}",
                                              ip="198.51.100.7")
    assert verdict.action is Action.CONTINUE
    assert state.dmarc.result == result and text in state.dmarc.reason
    assert f"dmarc={result}" in ar_header(view)


def test_dmarc_dns_failure_is_451_not_accept(dns_cfg: dict[str, Any]) -> None:
    # broken.test fails to load in Knot: every lookup under it is SERVFAIL
    verdict, _, state = Chain(dns_cfg, ("dkim", "dmarc")).run(message(from_="a@x.broken.test"),
                                                              sender="a@x.broken.test")
    assert verdict.action is Action.TEMPFAIL and (verdict.reply.code, verdict.reply.status) == (451, "4.7.1")
    assert state.dmarc.result == "temperror"


def test_dmarc_timeout_is_451(silent: authzones.SilentUDP) -> None:
    cfg = {"dns_servers": [f"127.0.0.1:{silent.port}"], "dns_timeout": 0.5}
    verdict, _, _ = Chain(cfg, ("dmarc",)).run(message())
    assert verdict.action is Action.TEMPFAIL and verdict.reply.code == 451


def test_dmarc_alone_computes_spf_and_dkim(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    verdict, _, state = Chain(dns_cfg, ("dmarc",)).run(sign_message(message(), [keys.ed]), ip="198.51.100.7")
    assert verdict.action is Action.CONTINUE
    assert state.mailfrom.result == "fail" and state.dkim[0].result == "pass" and state.dmarc.dkim_aligned


def test_dmarc_report_log(dns_cfg: dict[str, Any], tmp_path: Path) -> None:
    h = FilterHarness(plugin("dmarc"), {**dns_cfg, "report_log": True})
    h.env.data_dir = str(tmp_path)
    h.filter = plugin("dmarc").from_config("d", {**dns_cfg, "report_log": True}, h.env)
    h.chain.filters = (h.filter,)
    s = h.session("198.51.100.7")
    v = h.run("data", s, h.transaction("alice@example.test", "b@dest.test"), MessageView(message()))
    assert v.action is Action.REJECT
    [line] = (tmp_path / "dmarc" / "results.jsonl").read_text().splitlines()
    row = json.loads(line)
    assert row["header_from"] == "example.test" and row["disposition"] == "reject"
    assert row["source_ip"] == "198.51.100.7" and row["policy"]["rua"] == "mailto:dmarc-rua@example.test"


def test_forged_authentication_results_removed(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    forged = (b"Authentication-Results: mx.example.test; dmarc=pass header.from=example.test\r\n"
              b"Authentication-Results: (comment) MX.Example.Test;\r\n spf=pass\r\n"
              b"Authentication-Results: other.example; dkim=pass\r\n")
    msg = sign_message(message(extra=forged), [keys.rsa])
    verdict, view, _ = Chain(dns_cfg).run(msg)
    assert verdict.action is Action.CONTINUE
    edited = view.edited_headers()
    assert edited.count(b"Authentication-Results:") == 2
    assert edited.startswith(b"Authentication-Results: mx.example.test;\r\n\tspf=pass")
    assert b"Authentication-Results: other.example; dkim=pass\r\n" in edited
    # the signature still verifies after our edits (untouched fields keep their bytes)
    rebuilt = edited + b"\r\n" + msg.split(b"\r\n\r\n", 1)[1]
    assert dkim_results(dns_cfg, rebuilt)[0].result == "pass"


def test_authenticated_sessions_get_no_dmarc(silent: authzones.SilentUDP) -> None:
    cfg = {"dns_servers": [f"127.0.0.1:{silent.port}"], "dns_timeout": 0.5}
    verdict, view, state = Chain(cfg).run(message(), auth="alice")
    assert verdict.action is Action.CONTINUE and state.dmarc is None
    assert ar_header(view) == "mx.example.test; none"


def test_arc_chain_verified(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    import dkim

    msg = sign_message(message(), [keys.rsa])
    msg = b"Authentication-Results: relay.example.test; dkim=pass header.d=example.test\r\n" + msg
    arc = dkim.arc_sign(msg, b"sel1", b"example.test", keys.rsa.private, b"relay.example.test")
    sealed = b"".join(arc) + msg
    verdict, view, state = Chain(dns_cfg).run(sealed)
    assert state.arc.result == "pass" and state.arc.instances == 1
    assert "arc=pass" in ar_header(view)
    tampered = sealed.replace(b"Hello.", b"Hallo.")
    _, _, state = Chain(dns_cfg, ("arc",)).run(tampered)
    assert state.arc.result == "fail"


def test_spf_smtputf8_sender(knot_server: knot.KnotServer) -> None:
    dns = auth_dns(knot_server)
    assert check_spf(dns, "192.0.2.10", "jörg@plain.spf.test", "h.test").result == "pass"
    result = check_spf(dns, "198.51.100.7", "jörg@plain.spf.test", "h.test")
    assert result.result == "fail" and result.subject == "jörg@plain.spf.test"


def test_smtputf8_from_domain_idn_and_ar_value(dns_cfg: dict[str, Any], keys: authzones.Keys) -> None:
    from exmta.filters.authres import format_auth_results

    verdict, view, state = Chain(dns_cfg).run(sign_message(message(from_="Jörg <jörg@example.test>"), [keys.rsa]),
                                              sender="jörg@example.test")
    assert verdict.action is Action.CONTINUE and state.dmarc.result == "pass"
    assert "smtp.mailfrom=jörg@example.test" in ar_header(view)  # RFC 8616: UTF-8 in the value
    assert format_auth_results("mx", state).count("\r\n\t") == 5
