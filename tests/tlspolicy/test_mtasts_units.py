"""MTA-STS parsing and matching (RFC 8461 3.1, 3.2, 4.1), no network."""
from __future__ import annotations

import pytest

from exmta.tlspolicy.mtasts import PolicyError, STSPolicy, mx_matches, parse_policy, parse_txt


def test_txt_record() -> None:
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt(["v=spf1 -all", "something"]) is None
    with pytest.raises(PolicyError):
        parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"])
    with pytest.raises(PolicyError):
        parse_txt(["v=STSv1; id=not valid!"])


def test_policy_parse_and_limits() -> None:
    p = parse_policy("version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
                     "max_age: 604800\r\nextension: ignored\r\n", "example.com", "id1", 100.0)
    assert (p.mode, p.mx, p.max_age, p.expires_at) == ("enforce", ("mail.example.com", "*.example.net"),
                                                       604800, 604900.0)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 99999999\n", "d", "i", 0).max_age == 31557600
    for bad in ("mode: enforce\nmx: a\nmax_age: 1\n", "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmax_age: 1\n", "version: STSv1\nmode: enforce\nmx: a\n",
                "version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n", "<html>hello</html>"):
        with pytest.raises(PolicyError):
            parse_policy(bad, "d", "i", 0)


def test_mx_patterns() -> None:
    assert mx_matches("mail.example.com", "MAIL.example.com.")
    assert mx_matches("*.example.com", "mx1.example.com")
    assert not mx_matches("*.example.com", "a.b.example.com")
    assert not mx_matches("*.example.com", "example.com")
    assert not mx_matches("mail.example.com", "mail.example.com.evil.test")


def test_policy_round_trips_as_json() -> None:
    p = STSPolicy("d.test", "testing", ("mx.d.test",), 60, "x1", 5.0, "text")
    assert STSPolicy.from_json(p.to_json()) == p and p.valid_at(64.9) and not p.valid_at(65.0)
