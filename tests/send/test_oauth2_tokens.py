"""The token source on task.Clock: cache, renewal before expiry, one request in flight, failures held, assertions."""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
from urllib.parse import parse_qs

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import defer
from twisted.internet.task import Clock

from exmta.config.schema import OAuth2Config
from exmta.send.oauth2 import (
    FAILURE_HOLD, ClientAssertion, ClientSecret, TokenError, TokenSource, endpoint_problem, load_credential,
)
from support.sync import failure as failure_of, result as result_of

URL = "http://127.0.0.1:9/token"
CFG = OAuth2Config(token_endpoint=URL, client_id="app", client_secret="s3cret", mailbox="relay@contoso.test",
                   refresh_before=300)


class Endpoint:
    """Answers each POST with the next queued (status, body), or leaves it pending."""

    def __init__(self, lifetime: int = 3600) -> None:
        self.lifetime = lifetime
        self.forms: list[dict[str, list[str]]] = []
        self.pending: list[defer.Deferred[tuple[int, bytes]]] = []
        self.answer: tuple[int, bytes] | Exception | None = None

    def post(self, url: str, body: bytes, timeout: float) -> defer.Deferred[tuple[int, bytes]]:
        assert url == URL
        self.forms.append(parse_qs(body.decode()))
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        if self.answer is not None:
            return defer.succeed(self.answer)
        d: defer.Deferred[tuple[int, bytes]] = defer.Deferred()
        self.pending.append(d)
        return d

    def grant(self) -> None:
        doc = {"access_token": f"tok-{len(self.forms)}", "expires_in": self.lifetime, "token_type": "Bearer"}
        self.pending.pop(0).callback((200, json.dumps(doc).encode()))


def source(clock: Clock, endpoint: Endpoint, cfg: OAuth2Config = CFG) -> TokenSource:
    return TokenSource(cfg, clock, post=endpoint.post, credential=ClientSecret("s3cret"))


def test_client_secret_form() -> None:
    ep = Endpoint()
    src = source(Clock(), ep)
    d = src.token()
    ep.grant()
    assert result_of(d) == "tok-1"
    assert ep.forms == [{"grant_type": ["client_credentials"], "client_id": ["app"],
                         "scope": ["https://outlook.office365.com/.default"], "client_secret": ["s3cret"]}]


def test_concurrent_callers_share_one_request_and_the_cache() -> None:
    ep = Endpoint()
    src = source(Clock(), ep)
    waiting = [src.token() for _ in range(50)]
    assert len(ep.forms) == 1
    ep.grant()
    assert {result_of(d) for d in waiting} == {"tok-1"}
    assert result_of(src.token()) == "tok-1"
    assert src.requests == {"ok": 1} and src.cache_hits == 1


def test_renewed_before_expiry_while_the_old_token_serves() -> None:
    clock, ep = Clock(), Endpoint(lifetime=3600)
    src = source(clock, ep)
    d = src.token()
    ep.grant()
    result_of(d)
    clock.advance(3600 - 301)
    assert result_of(src.token()) == "tok-1" and len(ep.forms) == 1
    clock.advance(2)                                  # inside refresh_before: renew in the background
    assert result_of(src.token()) == "tok-1" and len(ep.forms) == 2
    assert result_of(src.token()) == "tok-1" and len(ep.forms) == 2  # one renewal in flight
    ep.grant()
    assert result_of(src.token()) == "tok-2"


def test_expired_token_is_never_served() -> None:
    clock, ep = Clock(), Endpoint(lifetime=3600)
    src = source(clock, ep)
    d = src.token()
    ep.grant()
    result_of(d)
    clock.advance(3600)
    d = src.token()
    assert not d.called                               # waits for the new one
    ep.grant()
    assert result_of(d) == "tok-2"


def test_refused_client_is_a_clear_transient_error_held_briefly() -> None:
    clock, ep = Clock(), Endpoint()
    ep.answer = (401, json.dumps({"error": "invalid_client",
                                  "error_description": "client authentication failed\nTrace ID: x"}).encode())
    src = source(clock, ep)
    f = failure_of(src.token())
    assert f.check(TokenError) and f.value.reason == "refused"
    assert str(f.value) == (f"token endpoint {URL} refused client app: HTTP 401 invalid_client: "
                            "client authentication failed")
    assert f.value.reply.code == 451 and f.value.reply.status == "4.7.0"
    failure_of(src.token())
    assert len(ep.forms) == 1                         # held: a queue run costs one request
    clock.advance(FAILURE_HOLD)
    failure_of(src.token())
    assert len(ep.forms) == 2
    assert src.requests == {"refused": 2}


@pytest.mark.parametrize("answer, reason, text", [
    (ConnectionRefusedError("Connection refused"), "unreachable", "unreachable: ConnectionRefusedError"),
    (defer.TimeoutError(), "unreachable", "did not answer within 30s"),
    ((503, b"<html>busy</html>"), "unavailable", "answered HTTP 503"),
    ((200, b"<html>portal</html>"), "bad_response", "not JSON"),
    ((200, b'{"access_token": "a b", "expires_in": 3600}'), "bad_response", "without a usable bearer token"),
    ((200, b'{"access_token": "x", "token_type": "mac"}'), "bad_response", "without a usable bearer token"),
    ((400, b'{"error": "invalid_scope"}'), "refused", "HTTP 400 invalid_scope"),
])
def test_failures_are_classified(answer: object, reason: str, text: str) -> None:
    ep = Endpoint()
    ep.answer = answer  # type: ignore[assignment]
    f = failure_of(source(Clock(), ep).token())
    assert f.value.reason == reason and text in str(f.value)
    assert "s3cret" not in str(f.value)


def test_invalidate_replaces_a_token_once() -> None:
    clock, ep = Clock(), Endpoint()
    src = source(clock, ep)
    d = src.token()
    ep.grant()
    result_of(d)
    assert src.invalidate("tok-1")                    # refused by the server: a new one
    d = src.token()
    assert src.invalidate("tok-1")                    # a second session with the old one: being replaced
    ep.grant()
    assert result_of(d) == "tok-2"
    assert not src.invalidate("tok-2")                # the replacement refused too: the app's rights, not the token
    assert result_of(src.token()) == "tok-2" and len(ep.forms) == 2


def test_short_lived_token_is_still_cached() -> None:
    clock, ep = Clock(), Endpoint(lifetime=8)
    src = source(clock, ep)
    d = src.token()
    ep.grant()
    result_of(d)
    clock.advance(3)
    assert result_of(src.token()) == "tok-1" and len(ep.forms) == 1
    clock.advance(1.5)                                # past half its life: renewed in the background
    assert result_of(src.token()) == "tok-1" and len(ep.forms) == 2
    clock.advance(2)                                  # within the last quarter: never sent
    d = src.token()
    assert not d.called
    ep.grant()
    assert result_of(d) == "tok-2"


def test_endpoint_problem() -> None:
    assert endpoint_problem("https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token") is None
    assert endpoint_problem("http://127.0.0.1:8080/token") is None
    assert "in clear" in endpoint_problem("http://login.example.com/token")
    assert "not an https" in endpoint_problem("ftp://x/token")


def make_cert(tmp_path, name: str = "app") -> tuple[str, str, rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path), key, cert


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_certificate_assertion_is_an_rs256_jwt_with_x5t(tmp_path) -> None:
    cert_path, key_path, key, cert = make_cert(tmp_path)
    cfg = OAuth2Config(token_endpoint=URL, client_id="app", certificate=cert_path, private_key=key_path)
    cred = load_credential(cfg)
    assert isinstance(cred, ClientAssertion)
    form = cred.form("app", URL, 1_700_000_000)
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    head, body, sig = form["client_assertion"].split(".")
    header, claims = json.loads(b64url_decode(head)), json.loads(b64url_decode(body))
    der = cert.public_bytes(serialization.Encoding.DER)
    assert header == {"alg": "RS256", "typ": "JWT",
                      "x5t": base64.urlsafe_b64encode(hashlib.sha1(der).digest()).rstrip(b"=").decode(),
                      "x5t#S256": base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()}
    assert claims["aud"] == URL and claims["iss"] == claims["sub"] == "app"
    assert claims["exp"] - claims["iat"] == 600 and claims["nbf"] == 1_700_000_000 and len(claims["jti"]) == 32
    key.public_key().verify(b64url_decode(sig), f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    assert cred.form("app", URL, 1_700_000_000)["client_assertion"] != form["client_assertion"]  # new jti


def test_certificate_with_the_wrong_key_is_refused(tmp_path) -> None:
    cert_path, _, _, _ = make_cert(tmp_path, "one")
    _, other_key, _, _ = make_cert(tmp_path, "two")
    cfg = OAuth2Config(token_endpoint=URL, client_id="app", certificate=cert_path, private_key=other_key)
    with pytest.raises(ValueError, match="does not belong to the certificate"):
        load_credential(cfg)


def test_relay_user_and_ready() -> None:
    import io

    from exmta.model import DeliveryRequest, Envelope, MailParams, Recipient
    from exmta.send.oauth2 import XOAuth2Relay

    def request(sender: str) -> DeliveryRequest:
        rcpt = Recipient("bob@fabrikam.test")
        env = Envelope(sender=sender, recipients=[rcpt], params=MailParams(), queue_id="Q1", size=3)
        return DeliveryRequest("Q1", env, (rcpt,), lambda: io.BytesIO(b"x\r\n"))

    ep = Endpoint()
    src = source(Clock(), ep)
    fixed = XOAuth2Relay(CFG, src)
    assert fixed.user_for(request("scanner@contoso.test")) == "relay@contoso.test"
    as_sender = XOAuth2Relay(OAuth2Config(token_endpoint=URL, client_id="app", client_secret="s", send_as="sender",
                                          mailbox="relay@contoso.test"), src)
    assert as_sender.user_for(request("scanner@contoso.test")) == "scanner@contoso.test"
    assert as_sender.user_for(request("")) == "relay@contoso.test"  # a DSN's null sender
    d = fixed.ready()
    ep.grant()
    assert result_of(d) is None
    ep.answer = (401, b'{"error": "invalid_client"}')
    down = XOAuth2Relay(CFG, source(Clock(), ep))
    reply = result_of(down.ready())
    assert reply.code == 451 and "refused client app: HTTP 401 invalid_client" in reply.text


def test_rotated_secret_file_is_used_from_the_next_request(tmp_path) -> None:
    import os

    secret = tmp_path / "secret"
    secret.write_text("old-secret\n")
    cfg = OAuth2Config(token_endpoint=URL, client_id="app", client_secret_file=str(secret), mailbox="r@c.test")
    clock, ep = Clock(), Endpoint()
    src = TokenSource(cfg, clock, post=ep.post)
    d = src.token()
    ep.grant()
    result_of(d)
    secret.write_text("the-new-secret\n")
    os.utime(secret, (1, 1))
    clock.advance(3600)
    d = src.token()
    ep.grant()
    result_of(d)
    assert [f["client_secret"] for f in ep.forms] == [["old-secret"], ["the-new-secret"]]
