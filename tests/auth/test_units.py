"""Sans-IO parts of SMTP AUTH: SASL decoding, the lockout clock, send-as grants."""
from __future__ import annotations

import base64

import pytest
from hypothesis import given, strategies as st
from twisted.internet.task import Clock

from exmta.auth.lockout import LockoutSettings, LoginThrottle, source_key
from exmta.auth.sasl import Credentials, LoginMechanism, PlainMechanism, SASLError, decode_response
from exmta.auth.sendas import SendAsGrants, check_grant_pattern, from_addresses, proxy_addresses


def test_credentials_repr_hides_the_password():
    assert "hunter2" not in repr(Credentials("alice", "hunter2"))


def test_decode_response():
    assert decode_response(b"=") == b""
    assert decode_response(b" YWJj ") == b"abc"
    for bad, status in ((b"*", "5.7.0"), (b"YWJ", "5.5.2"), (b"YW Jj", "5.5.2"), (b"\xff", "5.5.2")):
        with pytest.raises(SASLError) as e:
            decode_response(bad)
        assert e.value.reply.status == status


@given(st.binary(max_size=200))
def test_plain_never_raises_anything_but_sasl_errors(data):
    try:
        result = PlainMechanism().respond(base64.b64encode(data))
    except SASLError as e:
        assert e.reply.code == 501
    else:
        assert isinstance(result, Credentials) and data.count(b"\0") == 2


@given(st.binary(max_size=100))
def test_login_never_raises_anything_but_sasl_errors(data):
    mech = LoginMechanism()
    try:
        assert mech.start(data or None) in (b"Username:", b"Password:")
    except SASLError as e:
        assert e.reply.code == 501


def test_source_key_groups_ipv6_by_64():
    assert source_key("2001:db8:1:2:3:4:5:6") == source_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert source_key("192.0.2.1") == "192.0.2.1"


def test_failures_outside_the_window_are_forgotten():
    clock = Clock()
    t = LoginThrottle(clock, LockoutSettings(user_threshold=3, ip_threshold=0, window=60, duration=100))
    t.record_failure("192.0.2.1", "u")
    t.record_failure("192.0.2.1", "u")
    clock.advance(61)
    assert t.record_failure("192.0.2.1", "u") == (False, False)
    t.record_failure("192.0.2.1", "u")
    assert t.record_failure("192.0.2.1", "U") == (False, True)
    assert t.user_locked("u") == 100
    clock.advance(100)
    assert t.user_locked("u") == 0


def test_success_clears_the_user_but_not_the_source():
    clock = Clock()
    t = LoginThrottle(clock, LockoutSettings(user_threshold=2, ip_threshold=3))
    t.record_failure("192.0.2.1", "a")
    t.record_failure("192.0.2.1", "b")
    t.record_success("a")
    assert t.record_failure("192.0.2.1", "a") == (True, False)


def test_tables_are_bounded():
    clock = Clock()
    t = LoginThrottle(clock, LockoutSettings())
    t.MAX_KEYS = 10
    for i in range(50):
        t.record_failure(f"192.0.2.{i}", f"user{i}")
    assert len(t._sources) == 10 and len(t._users) == 10


def test_grants():
    g = SendAsGrants.from_patterns(["Alice@Example.test", "*@sales.example.test"])
    assert g.allows("alice@example.test") and g.allows("ALICE@EXAMPLE.TEST") and g.allows("x@sales.example.test.")
    assert not g.allows("") and not g.allows("alice") and not g.allows("x@eu.sales.example.test")
    assert SendAsGrants.from_patterns(["*"]).allows("")
    for bad in ("", "alice", "*@", "@x.test", "a*@x.test", "a@*.x.test", "a b@x.test"):
        with pytest.raises(ValueError):
            check_grant_pattern(bad)


def test_proxy_addresses_keep_only_smtp_values():
    assert proxy_addresses(["SMTP:a@x.test", "smtp:b@x.test", "X500:/o=x", "sip:c@x.test", "smtp:nope"]) == [
        "a@x.test", "b@x.test"]


def test_from_addresses():
    assert from_addresses(["Alice <a@x.test>, b@y.test"]) == ["a@x.test", "b@y.test"]
    assert from_addresses(["undisclosed"]) is None
    assert from_addresses(["=?utf-8?q?J=C3=B6rg?= <j@x.test>"]) == ["j@x.test"]
