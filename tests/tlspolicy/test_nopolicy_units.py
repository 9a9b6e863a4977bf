"""TLS-RPT without a policy ("no-policy-found"): the cached TLSRPT lookup and the session classification."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet import defer, task

from exmta.routing.dns import DNSTemporaryError
from exmta.model import Reply
from exmta.tlspolicy.nopolicy import NoPolicySession, ReportingDomains, result_type

RUA = ["v=TLSRPTv1; rua=mailto:tlsrpt@a.test"]


class Lookups:
    """A TXT lookup whose answers the test hands out, one Deferred per query."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, defer.Deferred[list[str] | None]]] = []

    def __call__(self, name: str) -> defer.Deferred[list[str] | None]:
        d: defer.Deferred[list[str] | None] = defer.Deferred()
        self.pending.append((name, d))
        return d

    def answer(self, value: Any) -> None:
        name, d = self.pending.pop(0)
        if isinstance(value, Exception):
            d.errback(value)
        else:
            d.callback(value)


def test_one_lookup_for_concurrent_sessions_then_cached_until_the_ttl() -> None:
    clock = task.Clock()
    lookups = Lookups()
    domains = ReportingDomains(clock, lookups, ttl=3600, error_ttl=300)
    seen: list[bool] = []
    domains.prefetch("A.test.")
    domains.when_known("a.test", seen.append)
    domains.when_known("a.test", seen.append)
    assert [n for n, _ in lookups.pending] == ["_smtp._tls.a.test"] and seen == []  # nobody waits on it
    lookups.answer(RUA)
    assert seen == [True, True]
    domains.when_known("a.test", seen.append)  # cached: at once, no query
    assert seen == [True, True, True] and not lookups.pending
    clock.advance(3600)
    domains.when_known("a.test", seen.append)
    assert len(lookups.pending) == 1  # expired: asked again
    lookups.answer(None)  # the record was withdrawn
    assert seen[-1] is False and domains.cached("a.test") is False


def test_dns_failure_means_not_publishing_for_a_short_while() -> None:
    clock = task.Clock()
    lookups = Lookups()
    domains = ReportingDomains(clock, lookups, ttl=3600, error_ttl=300)
    seen: list[bool] = []
    domains.when_known("b.test", seen.append)
    lookups.answer(DNSTemporaryError(Reply.make(451, "4.4.3", "DNS timeout")))
    assert seen == [False] and domains.cached("b.test") is False
    clock.advance(300)
    assert domains.cached("b.test") is None  # looked up again next time


def test_a_lookup_that_raises_at_once_or_a_failing_callback_changes_nothing() -> None:
    clock = task.Clock()

    def broken(name: str) -> defer.Deferred[list[str] | None]:
        raise RuntimeError("no resolver")

    domains = ReportingDomains(clock, broken)
    seen: list[bool] = []
    domains.when_known("c.test", seen.append)
    assert seen == [False]
    lookups = Lookups()
    domains = ReportingDomains(clock, lookups)
    domains.when_known("d.test", lambda p: 1 / 0)
    domains.when_known("d.test", seen.append)
    lookups.answer(RUA)
    assert seen == [False, True]


def test_only_a_single_tlsrpt_record_with_a_usable_rua_counts_and_the_cache_is_bounded() -> None:
    clock = task.Clock()
    lookups = Lookups()
    domains = ReportingDomains(clock, lookups, max_entries=2)
    for name, answer in (("one.test", ["v=spf1 -all"]), ("two.test", RUA + RUA), ("three.test", RUA)):
        domains.prefetch(name)
        lookups.answer(answer)
    assert domains.cached("one.test") is None  # evicted, the oldest
    assert domains.cached("two.test") is False and domains.cached("three.test") is True


@pytest.mark.parametrize("text, kind", [
    ("TLS is mandatory but the remote server does not offer STARTTLS", "starttls-not-supported"),
    ("TLS is mandatory but STARTTLS was refused: 454 4.7.0 not now", "starttls-not-supported"),
    ("TLS negotiation or EHLO after STARTTLS failed: 451 4.4.2 TLS handshake failed: certificate verify failed: "
     "certificate has expired (mx)", "certificate-expired"),
    ("TLS negotiation or EHLO after STARTTLS failed: 451 4.4.2 TLS certificate name verification failed: "
     "VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID(hostname=b'mx.a.test'))])",
     "certificate-host-mismatch"),
    ("TLS negotiation or EHLO after STARTTLS failed: 451 4.4.2 TLS handshake failed: certificate verify failed: "
     "unable to get local issuer certificate", "certificate-not-trusted"),
    ("TLS negotiation or EHLO after STARTTLS failed: 451 4.4.2 TLS error after the handshake: "
     "tlsv13 alert certificate required", "validation-failure"),
    ("Remote server sent data after STARTTLS 220 (possible injection)", "validation-failure"),
])
def test_result_types(text: str, kind: str) -> None:
    assert result_type(text) == kind


class Engine:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str | None, str, str]] = []
        self.ips: list[tuple[str, str]] = []

    def record_domain(self, domain: str, kind: str, failure: str | None, text: str, host: str = "",
                      ips: tuple[str, str] = ("", "")) -> None:
        self.rows.append((domain, kind, failure, text, host))
        self.ips.append(ips)


def session(publishes: bool) -> tuple[NoPolicySession, Engine]:
    lookups = Lookups()
    domains = ReportingDomains(task.Clock(), lookups)
    domains.prefetch("e.test")
    lookups.answer(RUA if publishes else None)
    engine = Engine()
    return NoPolicySession("e.test", "mx.e.test", engine, domains), engine


def proto(tls: str | None, caps: tuple[str, ...] = ()) -> Any:
    return SimpleNamespace(tls=tls, capabilities={c: "" for c in caps}, addresses=("192.0.2.1", "198.51.100.7"))


def test_sessions_are_classified_as_rfc_8460_says() -> None:
    s, engine = session(True)
    s.after_session(proto("TLSv1.3 TLS_AES_256_GCM_SHA384", ("STARTTLS",)), True, None, "", "opportunistic")
    s.after_session(proto(None, ("PIPELINING",)), True, None, "", "opportunistic")
    s.after_session(proto(None, ("STARTTLS",)), True, None, "", "opportunistic")  # 454 to STARTTLS
    s.after_session(proto(None, ("STARTTLS",)), False, "STARTTLS",
                    "TLS negotiation or EHLO after STARTTLS failed: TLS handshake failed: certificate verify "
                    "failed: self-signed certificate", "mandatory")
    s.after_session(proto("TLSv1.3 X", ("STARTTLS",)), False, "AUTH", "535 5.7.8 no", "opportunistic")  # TLS was up
    s.after_session(proto(None), False, "greeting", "554 5.7.1 go away", "opportunistic")  # no TLS step: nothing
    s.after_session(proto(None, ("STARTTLS",)), True, None, "", "none")  # we did not try TLS: nothing
    assert [(r[1], r[2], r[4]) for r in engine.rows] == [
        ("no-policy-found", None, "mx.e.test"),
        ("no-policy-found", "starttls-not-supported", "mx.e.test"),
        ("no-policy-found", "starttls-not-supported", "mx.e.test"),
        ("no-policy-found", "certificate-not-trusted", "mx.e.test"),
        ("no-policy-found", None, "mx.e.test"),
    ]
    assert engine.rows[1][3] == "mx.e.test did not offer STARTTLS"
    assert set(engine.ips) == {("192.0.2.1", "198.51.100.7")}
    assert engine.rows[2][3] == "mx.e.test refused STARTTLS"


def test_nothing_recorded_for_a_domain_without_tlsrpt() -> None:
    s, engine = session(False)
    s.after_session(proto(None), True, None, "", "opportunistic")
    s.after_session(proto("TLSv1.3 X"), True, None, "", "opportunistic")
    assert engine.rows == []


def test_tls_rpt_alone_gives_mx_connectors_an_engine_that_reports_without_policies(tmp_path: Any) -> None:
    from twisted.internet import reactor

    from exmta.config.load import parse_config
    from exmta.service import make_send_connectors

    raw = {"receive": {"in": {"listen": ["tcp:2525"]}}, "server": {"data_dir": str(tmp_path)},
           "tls_policy": {"tls_rpt": True, "mta_sts": False},
           "send": {"internet": {"type": "smtp", "dns_servers": ["127.0.0.1:5353"]}}}
    engine = make_send_connectors(parse_config(raw), reactor, None)["internet"].tls_policy
    assert engine is not None and engine.sts is None and engine.dane is None
    assert isinstance(engine.reporting_domains, ReportingDomains)
    quiet = make_send_connectors(parse_config(dict(raw, tls_policy={"mta_sts": False})), reactor, None)
    assert quiet["internet"].tls_policy is None  # neither policies nor reports: no engine at all


def test_override_none_reports_nothing_and_a_host_with_a_policy_gets_no_no_policy_session() -> None:
    from exmta.tlspolicy.engine import DomainPolicy

    engine = SimpleNamespace(reporting_domains=ReportingDomains(task.Clock(), Lookups()))
    assert DomainPolicy("f.test", engine, override="none").no_policy("mx.f.test") is None  # type: ignore[arg-type]
    s = DomainPolicy("f.test", engine).no_policy("mx.f.test")  # type: ignore[arg-type]
    assert isinstance(s, NoPolicySession) and s.domain == "f.test" and s.host == "mx.f.test"
    engine.reporting_domains = None
    assert DomainPolicy("f.test", engine).no_policy("mx.f.test") is None  # type: ignore[arg-type]


def test_a_policy_host_that_refuses_the_session_before_tls_is_no_tls_result() -> None:
    from exmta.tlspolicy.engine import HostPolicy

    rows: list[tuple[str | None, str]] = []
    engine = SimpleNamespace(record=lambda host, failure, text, ips: rows.append((failure, text)))
    host = HostPolicy("mta-sts", "mx.g.test", "g.test", True, engine)  # type: ignore[arg-type]
    refused = host.after_session(proto(None), False, Reply.make(554, "5.7.1", "go away"), "greeting")
    assert rows == [] and refused is not None and refused.text.startswith("MTA-STS policy of g.test: ")
    host.after_session(proto(None, ("PIPELINING",)), False,
                       Reply.make(451, "4.7.5", "TLS is mandatory but the remote server does not offer STARTTLS"),
                       "STARTTLS")
    assert rows == [("starttls-not-supported", "mx.g.test did not offer STARTTLS")]


def test_the_report_service_warns_when_its_reports_would_go_out_unsigned(tmp_path: Any) -> None:
    from twisted.application.service import MultiService
    from twisted.internet import reactor
    from twisted.logger import capturedLogs

    from exmta.config.load import parse_config
    from exmta.service import make_send_connectors
    from exmta.testing.memstore import MemoryStore
    from exmta.tlspolicy.report import add_tls_report_service

    raw = {"receive": {"in": {"listen": ["tcp:2525"]}}, "server": {"data_dir": str(tmp_path), "hostname": "mx.a.test"},
           "tls_policy": {"tls_rpt": True},
           "send": {"internet": {"type": "smtp", "dns_servers": ["127.0.0.1:5353"]}}}
    config = parse_config(raw)
    with capturedLogs() as events:
        add_tls_report_service(MultiService(), config, MemoryStore(reactor), reactor, None,
                               make_send_connectors(config, reactor, None))
    [warning] = [e for e in events if "DKIM" in e.get("log_format", "")]
    assert warning["domain"] == "mx.a.test"
    from exmta.send.dkim_sign import generate_key

    key = tmp_path / "dkim.pem"
    key.write_bytes(generate_key()[0])
    raw["dkim"] = {"keys": [{"domain": "mx.a.test", "selector": "s1", "key_file": str(key)}]}
    raw["send"]["internet"]["dkim_sign"] = True  # type: ignore[index]
    config = parse_config(raw)
    with capturedLogs() as events:
        add_tls_report_service(MultiService(), config, MemoryStore(reactor), reactor, None,
                               make_send_connectors(config, reactor, None))
    assert not [e for e in events if "DKIM" in e.get("log_format", "")]


def test_a_broken_reporter_changes_nothing_for_the_mail() -> None:
    lookups = Lookups()
    domains = ReportingDomains(task.Clock(), lookups)
    domains.prefetch("h.test")
    lookups.answer(RUA)

    class Broken:
        def record_domain(self, *a: Any) -> None:
            raise RuntimeError("disk on fire")

    NoPolicySession("h.test", "mx.h.test", Broken(), domains).after_session(proto("TLSv1.3 X"), True, None, "",
                                                                           "opportunistic")
    NoPolicySession("h.test", "mx.h.test", None, domains).after_session(None, True, None, "", "opportunistic")
