"""Certificate checks of exmta.tlspolicy.verify (RFC 7672 matching, WebPKI for MTA-STS), no network."""
from __future__ import annotations

import datetime
import hashlib

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto

from exmta.tlspolicy.config import TLSPolicyConfig
from exmta.tlspolicy.verify import TLSARecord, association, check_dane, check_webpki, make_store


class Peer:
    def __init__(self, chain: list[crypto.X509]) -> None:
        self.chain = chain

    def get_peer_cert_chain(self) -> list[crypto.X509]:
        return self.chain


def chain_of(leaf: trustme.LeafCert, ca: trustme.CA | None = None) -> list[crypto.X509]:
    pems = [p.bytes() for p in leaf.cert_chain_pems] + ([ca.cert_pem.bytes()] if ca else [])
    return [crypto.load_certificate(crypto.FILETYPE_PEM, p) for p in pems]


@pytest.fixture(scope="module")
def pki() -> dict[str, object]:
    ca = trustme.CA()
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "ca": ca,
        "leaf": ca.issue_cert("mx.example.test", "*.wild.example.test"),
        "expired": ca.issue_cert("mx.example.test", not_before=now - datetime.timedelta(days=9),
                                 not_after=now - datetime.timedelta(days=1)),
        "other": trustme.CA().issue_cert("mx.example.test"),
    }


def store_of(ca: trustme.CA, tmp_path) -> crypto.X509Store:  # noqa: ANN001
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return make_store(str(path))


def test_dane_ee_selectors_and_matching_types(pki) -> None:  # noqa: ANN001
    chain = chain_of(pki["leaf"])
    leaf = chain[0]
    for selector in (0, 1):
        for mtype in (0, 1, 2):
            rec = TLSARecord(3, selector, mtype, association(leaf, selector, mtype))
            assert rec.usable and check_dane(Peer(chain), [rec], ["anything.invalid"]) is None  # no name check
    spki = leaf.to_cryptography().public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert association(leaf, 1, 1) == hashlib.sha256(spki).digest()
    wrong = TLSARecord(3, 1, 1, b"\0" * 32)
    problem = check_dane(Peer(chain), [wrong], ["mx.example.test"])
    assert problem is not None and problem.kind == "validation-failure"
    # a rollover: the old key's record next to the new one
    assert check_dane(Peer(chain), [wrong, TLSARecord(3, 1, 1, association(leaf, 1, 1))], ["x"]) is None
    # an expired certificate still matches DANE-EE (RFC 7672 3.1.1: no date check)
    expired = chain_of(pki["expired"])
    assert check_dane(Peer(expired), [TLSARecord(3, 1, 1, association(expired[0], 1, 1))], ["x"]) is None


def test_dane_ta_needs_the_anchor_in_the_chain_and_the_name(pki) -> None:  # noqa: ANN001
    ca = pki["ca"]
    ca_cert = crypto.load_certificate(crypto.FILETYPE_PEM, ca.cert_pem.bytes())
    ta = TLSARecord(2, 0, 1, association(ca_cert, 0, 1))
    with_anchor = chain_of(pki["leaf"], ca)
    assert check_dane(Peer(with_anchor), [ta], ["mx.example.test"]) is None
    assert check_dane(Peer(with_anchor), [ta], ["a.wild.example.test"]) is None
    wrong_name = check_dane(Peer(with_anchor), [ta], ["other.example.test"])
    assert wrong_name is not None and "do not match" in wrong_name.text
    assert check_dane(Peer(chain_of(pki["leaf"])), [ta], ["mx.example.test"]) is not None  # anchor not sent
    other = chain_of(pki["other"])
    assert check_dane(Peer(other), [ta], ["mx.example.test"]) is not None  # another CA's leaf


def test_unusable_records_mean_tls_without_authentication(pki) -> None:  # noqa: ANN001
    chain = chain_of(pki["leaf"])
    records = [TLSARecord(1, 1, 1, b"\1" * 32), TLSARecord(0, 0, 1, b"\1" * 32), TLSARecord(3, 1, 1, b"short"),
               TLSARecord(3, 2, 1, b"\1" * 32), TLSARecord(3, 1, 9, b"\1" * 32)]
    assert not any(r.usable for r in records)
    assert check_dane(Peer(chain), records, ["mx.example.test"]) is None


def test_webpki_reasons(pki, tmp_path) -> None:  # noqa: ANN001
    store = store_of(pki["ca"], tmp_path)
    assert check_webpki(Peer(chain_of(pki["leaf"])), ["mx.example.test"], store) is None
    assert check_webpki(Peer(chain_of(pki["leaf"])), ["mx1.wild.example.test"], store) is None
    assert check_webpki(Peer(chain_of(pki["leaf"])), ["mx.other.test"], store).kind == "certificate-host-mismatch"
    assert check_webpki(Peer(chain_of(pki["expired"])), ["mx.example.test"], store).kind == "certificate-expired"
    assert check_webpki(Peer(chain_of(pki["other"])), ["mx.example.test"], store).kind == "certificate-not-trusted"
    assert check_webpki(Peer([]), ["mx.example.test"], store).kind == "certificate-not-trusted"


def test_overrides_exact_wildcard_and_default() -> None:
    from exmta.tlspolicy.engine import TLSPolicyEngine

    cfg = TLSPolicyConfig(mta_sts=False, overrides={"a.example": "none", "*.lab.example": "testing"})
    engine = TLSPolicyEngine(cfg, None, None, None, None)
    assert engine.override_for("a.example") == "none"
    assert engine.override_for("x.lab.example") == "testing" and engine.override_for("y.x.lab.example") == "testing"
    assert engine.override_for("lab.example") == "enforce" and engine.override_for("b.example") == "enforce"
    everything = TLSPolicyEngine(TLSPolicyConfig(mta_sts=False, overrides={"*": "testing"}), None, None, None, None)
    assert everything.override_for("any.example") == "testing"


def test_validating_resolver_keeps_answers_for_their_ttl_but_never_bogus() -> None:
    from twisted.internet import task

    from exmta.tlspolicy.dane import Answer, ValidatingResolver
    from support.sync import result

    class Counting(ValidatingResolver):
        asked: list[tuple[str, str]] = []
        answers: dict[str, Answer] = {}

        def query_blocking(self, name: str, rdtype: str) -> Answer:
            self.asked.append((name, rdtype))
            return self.answers[name]

    clock = task.Clock()
    v = Counting(None, None, [("127.0.0.1", 53)], clock=clock, max_cache=300)
    v.answers = {"a.test": Answer("secure", ("r",), ttl=30.0), "b.test": Answer("bogus"),
                 "c.test": Answer("secure", ("r",), ttl=3600.0)}
    for _ in range(2):
        assert result(v.query("a.test", "TLSA")).status == "secure"
        assert result(v.query("b.test", "TLSA")).status == "bogus"
        assert result(v.query("c.test", "TLSA")).status == "secure"
    assert v.asked.count(("a.test", "TLSA")) == 1 and v.asked.count(("b.test", "TLSA")) == 2
    clock.advance(31)
    result(v.query("a.test", "TLSA"))
    result(v.query("c.test", "TLSA"))
    assert v.asked.count(("a.test", "TLSA")) == 2 and v.asked.count(("c.test", "TLSA")) == 1
    clock.advance(300)  # capped at max_cache
    result(v.query("c.test", "TLSA"))
    assert v.asked.count(("c.test", "TLSA")) == 2


def test_an_internal_error_defers_never_falls_back_to_clear_text() -> None:
    from twisted.internet import defer

    from exmta.tlspolicy.engine import DomainPolicy, PolicyDeferral, Skip, TLSPolicyEngine
    from support.sync import result

    engine = TLSPolicyEngine(TLSPolicyConfig(mta_sts=False), None, None, None, None)

    class Broken:
        async def policy_for(self, domain: str) -> None:
            raise RuntimeError("bug")

    engine.sts = Broken()  # type: ignore[assignment]
    [failure] = result(defer.Deferred.fromCoroutine(engine.for_domain("x.example")).addErrback(lambda f: [f]))
    assert isinstance(failure.value, PolicyDeferral) and failure.value.reply.code == 451
    policy = DomainPolicy("x.example", engine, sts=object())  # type: ignore[arg-type]
    skipped = result(defer.Deferred.fromCoroutine(policy.host("mx.x.example")))
    assert isinstance(skipped, Skip) and "internal error" in skipped.reason
    assert policy.deferral().reply.status == "4.7.5"


def test_a_check_that_raises_refuses_under_enforce_and_passes_under_testing() -> None:
    from exmta.tlspolicy.engine import HostPolicy, TLSPolicyEngine

    engine = TLSPolicyEngine(TLSPolicyConfig(mta_sts=False), None, None, None, None)

    class Weird:
        def get_peer_cert_chain(self) -> list[object]:
            return [object()]  # not a certificate

    enforced = HostPolicy("dane", "mx.example.test", "example.test", True, engine,
                          tlsa=(TLSARecord(3, 1, 1, b"\1" * 32),))
    assert "could not be checked" in (enforced.verify(Weird()) or "")
    testing = HostPolicy("dane", "mx.example.test", "example.test", False, engine,
                         tlsa=(TLSARecord(3, 1, 1, b"\1" * 32),))
    assert testing.verify(Weird()) is None
