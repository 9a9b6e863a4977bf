"""ARC sealing (RFC 8617) of forwarded mail, verified by exmta's ARC filter against Knot."""
from __future__ import annotations

import io
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.internet.defer import Deferred

from exmta.config.load import ConfigError, parse_config
from exmta.dns import AuthDNS
from exmta.filters.arc import verify_arc
from exmta.model import DeliveryRequest, Envelope, Recipient
from exmta.routing.dns import DNSResolver
from exmta.send.dkim_sign import DKIMSigner, arc_seal, signer_from_config
from support import authzones, knot
from support.authzones import message

pytestmark = pytest.mark.integration

AR = b"Authentication-Results: mx.example.test;\r\n\tspf=pass smtp.mailfrom=a@other.test;\r\n\tarc=none\r\n"


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory, keys: authzones.Keys) -> Iterator[AuthDNS]:
    with knot.KnotServer(tmp_path_factory.mktemp("arcdns"), authzones.zones(keys)) as server:
        yield AuthDNS(DNSResolver(None, None, server.nameservers, timeout=3.0))


def test_sealed_message_verifies_and_a_second_hop_extends_the_chain(dns: AuthDNS, keys: authzones.Keys) -> None:
    sealed = arc_seal(AR + message(from_="a@other.test"), keys.rsa, "mx.example.test")
    assert sealed is not None and sealed.startswith(b"ARC-Seal: i=1;")
    result = verify_arc(dns, sealed)
    assert (result.result, result.instances) == ("pass", 1)
    # the next hop checks, records arc=pass and seals again (i=2)
    hop2 = b"Authentication-Results: relay.example.test; arc=pass\r\n" + sealed
    sealed2 = arc_seal(hop2, keys.rsa, "relay.example.test")
    assert sealed2 is not None and sealed2.startswith(b"ARC-Seal: i=2;")
    assert verify_arc(dns, sealed2).result == "pass"
    assert verify_arc(dns, sealed2.replace(b"Hello.", b"Hullo.")).result == "fail"


def test_mail_we_did_not_check_is_not_sealed(keys: authzones.Keys) -> None:
    assert arc_seal(message(), keys.rsa, "mx.example.test") is None
    other = b"Authentication-Results: someone.else; spf=pass smtp.mailfrom=x@y.test\r\n" + message()
    assert arc_seal(other, keys.rsa, "mx.example.test") is None


def test_signer_seals_forwarded_mail_and_signs_our_own(dns: AuthDNS, keys: authzones.Keys) -> None:
    signer = DKIMSigner([keys.rsa], arc_key=keys.rsa, authserv_id="mx.example.test")
    forwarded = AR + message(from_="a@other.test")
    rcpt = Recipient("b@dest.test")
    req = DeliveryRequest("Q", Envelope("a@other.test", [rcpt]), (rcpt,), lambda: io.BytesIO(forwarded))
    out: list[Any] = []
    Deferred.fromCoroutine(signer.prepare(req)).addBoth(out.append)
    data = out[0].open_content().read()
    assert data.startswith(b"ARC-Seal: i=1;") and b"DKIM-Signature" not in data  # not our domain: sealed only
    assert verify_arc(dns, data).result == "pass"


def test_arc_seal_config(tmp_path: Path) -> None:
    from exmta.send.dkim_sign import generate_key

    rsa, _ = generate_key("rsa-sha256", 2048)
    ed, _ = generate_key("ed25519-sha256")
    (tmp_path / "r.pem").write_bytes(rsa)
    (tmp_path / "e.key").write_bytes(ed)
    base = f"""
[server]
hostname = "mx.example.test"
data_dir = "{tmp_path}"
[receive.in]
listen = ["tcp:2525:interface=127.0.0.1"]
[filters.authres]
plugin = "authres"
authserv_id = "mx-auth.example.test"
"""
    good = base + """[dkim]
keys = [{ domain = "example.test", selector = "r", key_file = "r.pem", arc_seal = true }]
"""
    config = parse_config(tomllib.loads(good))
    assert config.dkim_keys[0].arc_seal is True
    signer = signer_from_config(config)
    assert signer.arc_key is not None and signer.authserv_id == "mx-auth.example.test"
    bad = base + """[dkim]
keys = [
  { domain = "example.test", selector = "e", algorithm = "ed25519-sha256", key_file = "e.key", arc_seal = true },
  { domain = "example.test", selector = "r", key_file = "r.pem", arc_seal = "yes" },
]
"""
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(bad))
    assert [p.split(":")[0] for p in info.value.problems] == ["dkim.keys[1].arc_seal", "dkim.keys[2].arc_seal"]


def test_our_authentication_results_can_be_sealed(dns: AuthDNS, keys: authzones.Keys) -> None:
    from exmta.filters.authres import AuthState, DKIMResult, DMARCResult, SPFResult, format_auth_results

    state = AuthState()
    state.mailfrom = SPFResult("pass", "mailfrom", "other.test", "a@other.test", "sender SPF authorized")
    state.mailfrom_sender = "a@other.test"
    state.dkim = [DKIMResult("fail", "other.test", "o1", "rsa-sha256", "abcdefgh", "body hash mismatch", "@other.test")]
    state.dmarc = DMARCResult("fail", "other.test", "reject", "none", "x", "other.test", record={"p": "reject"})
    value = format_auth_results("mx.example.test", state)
    msg = f"Authentication-Results: {value}\r\n".encode() + message(from_="a@other.test")
    sealed = arc_seal(msg, keys.rsa, "mx.example.test")
    assert sealed is not None
    aar = sealed.split(b"ARC-Authentication-Results:", 1)[1].split(b"\r\n\r\n", 1)[0]
    assert b"dkim=fail" in aar and b"spf=pass" in aar and b"dmarc=fail" in aar
    assert verify_arc(dns, sealed).result == "pass"
