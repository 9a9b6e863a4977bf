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


def test_policy_source_follows_rfc8461_section_5() -> None:
    """Cache, negative caching, refresh on a new id, expiry, failures: MTASTS with a fake fetch and clock."""
    from twisted.internet import defer, task

    from exmta.tlspolicy.mtasts import MTASTS, PolicyCache
    from support.sync import result

    clock = task.Clock()
    clock.advance(1000)
    txt: dict[str, list[str] | None] = {"_mta-sts.a.test": ["v=STSv1; id=1"]}
    served = {"a.test": "version: STSv1\nmode: enforce\nmx: mx.a.test\nmax_age: 600\n"}
    fetches: list[str] = []
    reports: list[tuple[str, str, str]] = []

    class Fetcher:
        def fetch(self, domain: str) -> defer.Deferred[str]:
            fetches.append(domain)
            if domain not in served:
                return defer.fail(PolicyError("host down", "sts-policy-fetch-error"))
            return defer.succeed(served[domain])

    sts = MTASTS(clock, None, None, PolicyCache(None), Fetcher(), lambda name: defer.succeed(txt.get(name)),
                 txt_recheck=60, report=lambda *a: reports.append(a))

    def policy_for(domain: str) -> STSPolicy | None:
        return result(defer.Deferred.fromCoroutine(sts.policy_for(domain)))

    first = policy_for("a.test")
    assert first.policy_id == "1" and fetches == ["a.test"]
    assert policy_for("a.test") is first and fetches == ["a.test"]  # cached, TXT not even asked
    assert policy_for("b.test") is None and policy_for("b.test") is None  # no TXT: none, and remembered
    # a new id: the cached policy is used now, the new one fetched in the background
    txt["_mta-sts.a.test"] = ["v=STSv1; id=2"]
    served["a.test"] = served["a.test"].replace("mx.a.test", "mx2.a.test")
    clock.advance(61)
    assert policy_for("a.test").policy_id in ("1", "2")
    clock.advance(61)
    assert policy_for("a.test").mx == ("mx2.a.test",)
    # close to expiry with the same id: fetched again in the background, the clock starts anew
    before = len(fetches)
    clock.advance(600 - 120)
    assert policy_for("a.test").mx == ("mx2.a.test",) and len(fetches) == before + 1
    assert policy_for("a.test").fetched_at == clock.seconds() - 0  # the refreshed copy
    # expired and the host down: no policy (RFC 8461 5), reported
    del served["a.test"]
    clock.advance(601)
    assert policy_for("a.test") is None
    assert reports[-1][:2] == ("a.test", "sts-policy-fetch-error")
