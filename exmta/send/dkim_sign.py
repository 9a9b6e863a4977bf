"""DKIM signing of outgoing mail (RFC 6376, RSA and Ed25519 per RFC 8463), and key generation.

Signing is the last change to the bytes: the send connector asks
:meth:`DKIMSigner.prepare` for the request to deliver, which reads the
queued message, prepends one DKIM-Signature per configured selector of
the author's domain (the From: domain, else the envelope sender's) and
hands the connector a request whose ``open_content`` gives the signed
bytes. The signed headers are dkimpy's RFC 6376 5.4.1 set with From
oversigned (a second From: cannot be added without breaking the
signature); canonicalisation relaxed/relaxed.

With a key marked ``arc_seal = true``, mail that carries our
Authentication-Results (mail we received and checked, then forward) also
gets an ARC set (RFC 8617) before the DKIM signatures.

When signing fails (a bad key, a bug, a message dkimpy cannot parse), each
key's ``on_failure`` decides: ``"defer"`` (the default) keeps the message in
the queue with ``451 4.7.5`` and a logged reason, since a domain whose DMARC
policy is ``p=reject`` would have it bounced at the receiver if it left
unsigned (Exchange and OpenDKIM do not send such mail unsigned either);
``"send_unsigned"`` sends it as it is, with a warning.

``exmta dkim keygen`` uses :func:`generate_key` and :func:`txt_record`.
"""
from __future__ import annotations

import base64
import io
import os
import re
from dataclasses import dataclass, replace
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any, Sequence

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from exmta.config.reader import domain as _domain
from exmta.config.schema import DKIMKeyConfig
from exmta.model import DeliveryRequest, Reply

__all__ = ["DKIMKey", "DKIMSigner", "SigningDeferred", "generate_key", "load_key", "sign_message", "txt_record"]

log = Logger()

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
ON_FAILURE = ("defer", "send_unsigned")
MAX_SIGN_OCTETS = 64 * 1024 * 1024


@dataclass(frozen=True)
class DKIMKey:
    """One signing key: ``private`` is PEM (RSA, PKCS#1) or the base64 Ed25519 seed."""

    domain: str
    selector: str
    algorithm: str
    private: bytes
    on_failure: str = "defer"  # when signing fails: "defer" | "send_unsigned"


class SigningDeferred(Exception):
    """Signing failed and a key says not to send unsigned: the connector defers with ``reply``."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class _SigningFailed(Exception):
    """Signing with ``keys`` (empty: before they were known) raised ``__cause__``."""

    def __init__(self, domain: str, keys: Sequence[DKIMKey]) -> None:
        super().__init__(domain)
        self.domain = domain
        self.keys = tuple(keys)


def generate_key(algorithm: str = "rsa-sha256", bits: int = 2048) -> tuple[bytes, bytes]:
    """A new key pair: (private key file content, the public key for the DNS ``p=`` tag, base64)."""
    if algorithm == "rsa-sha256":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        if bits < 1024 or bits > 8192:
            raise ValueError("RSA keys must have 1024 to 8192 bits (2048 recommended)")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return private, base64.b64encode(public)
    if algorithm == "ed25519-sha256":
        import nacl.encoding
        import nacl.signing

        signing = nacl.signing.SigningKey.generate()
        return (signing.encode(nacl.encoding.Base64Encoder) + b"\n",
                signing.verify_key.encode(nacl.encoding.Base64Encoder))
    raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")


def record_text(algorithm: str, public: bytes) -> str:
    """The TXT record value: ``v=DKIM1; k=rsa; p=...``."""
    k = "rsa" if algorithm.startswith("rsa") else "ed25519"
    return f"v=DKIM1; k={k}; p={public.decode('ascii')}"


def txt_record(selector: str, domain: str, algorithm: str, public: bytes) -> str:
    """A zone-file line to publish, the value split into strings of at most 250 characters."""
    text = record_text(algorithm, public)
    chunks = [text[i:i + 250] for i in range(0, len(text), 250)]
    quoted = " ".join(f'"{c}"' for c in chunks)
    return f"{selector}._domainkey.{domain.rstrip('.')}. IN TXT ( {quoted} )"


def load_key(domain: str, selector: str, algorithm: str, path: str) -> DKIMKey:
    """Read and check a key file (ValueError says what is wrong)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    with open(path, "rb") as f:
        private = f.read()
    key = DKIMKey(domain.lower().rstrip("."), selector, algorithm, private)
    try:
        sign_message(b"From: a@" + key.domain.encode() + b"\r\n\r\nx\r\n", [key])
    except Exception as e:
        raise ValueError(f"{path}: not a usable {algorithm} private key ({e})") from None
    return key


def sign_message(message: bytes, keys: Sequence[DKIMKey]) -> bytes:
    """``message`` with one DKIM-Signature per key prepended (blocking)."""
    import dkim

    signatures = b""
    for key in keys:
        sig = dkim.sign(message, key.selector.encode("ascii"), key.domain.encode("ascii"), key.private,
                        canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=key.algorithm.encode("ascii"),
                        linesep=b"\r\n")
        signatures += sig
    return signatures + message


def arc_seal(message: bytes, key: DKIMKey, authserv_id: str) -> bytes | None:
    """``message`` with a new ARC set (RFC 8617) on top, or None when it has no
    Authentication-Results from ``authserv_id`` to seal (mail we did not check). Blocking."""
    import dkim

    seal = dkim.arc_sign(message, key.selector.encode("ascii"), key.domain.encode("ascii"), key.private,
                         authserv_id.encode("ascii"), linesep=b"\r\n")
    if not seal:
        return None
    return b"".join(seal) + message


def author_domain(message: bytes, sender: str) -> str:
    """The domain to sign for: the single From: address's domain, else the envelope sender's."""
    head = message.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    headers = BytesHeaderParser(policy=compat32).parsebytes(head)
    froms = headers.get_all("From") or []
    addresses = getaddresses([str(f) for f in froms])
    domains = {a.rpartition("@")[2].lower().rstrip(".") for _, a in addresses if "@" in a}
    if len(domains) == 1:
        return domains.pop()
    return sender.rpartition("@")[2].lower().rstrip(".")


class DKIMSigner:
    """Signs a DeliveryRequest's content with the keys of its author domain (see the module docstring)."""

    def __init__(self, keys: Sequence[DKIMKey], reactor: Any = None, threadpool: Any = None,
                 arc_key: DKIMKey | None = None, authserv_id: str = "") -> None:
        """``arc_key``: also ARC-seal (RFC 8617) every message that carries our Authentication-Results."""
        self.arc_key = arc_key
        self.authserv_id = authserv_id
        self.keys: dict[str, list[DKIMKey]] = {}
        for key in keys:
            self.keys.setdefault(key.domain, []).append(key)
        self.reactor = reactor
        self.threadpool = threadpool

    def _run(self, fn: Any, *args: Any) -> Deferred[Any]:
        if self.threadpool is None:
            return maybeDeferred(fn, *args)
        return deferToThreadPool(self.reactor, self.threadpool, fn, *args)

    def sign_content(self, request: DeliveryRequest) -> bytes | None:
        """The signed message, or None when there is no key for its domain (blocking).

        Raises _SigningFailed naming the keys involved (none: the failure came before they were known).
        """
        domain, keys = "", []
        try:
            with request.open_content() as f:
                message = f.read(MAX_SIGN_OCTETS + 1)
            if len(message) > MAX_SIGN_OCTETS:
                return None
            domain = author_domain(message, request.envelope.sender)
            keys = list(self.keys.get(domain, ()))
            sealed = None
            if self.arc_key is not None:
                keys.append(self.arc_key)
                sealed = arc_seal(message, self.arc_key, self.authserv_id)
                keys.pop()
            if sealed is not None:
                message = sealed
            if not keys:
                return sealed
            return sign_message(message, keys)
        except Exception as e:
            raise _SigningFailed(domain, keys) from e

    async def prepare(self, request: DeliveryRequest) -> DeliveryRequest:
        """The request to deliver: signed when a key matches. When signing fails the keys'
        ``on_failure`` decides: raise SigningDeferred (default), or send unsigned with a warning."""
        try:
            signed = await self._run(self.sign_content, request)
        except _SigningFailed as e:
            cause = e.__cause__ or e
            if e.keys and all(k.on_failure == "send_unsigned" for k in e.keys):
                log.warn("DKIM signing of {queue_id} for {domain} failed ({error}); sending it unsigned "
                         "(on_failure = \"send_unsigned\")", queue_id=request.queue_id, domain=e.domain,
                         error=repr(cause))
                return request
            log.error("DKIM signing of {queue_id} for {domain} failed ({error}); deferred, not sent unsigned",
                      queue_id=request.queue_id, domain=e.domain or "?", error=repr(cause))
            raise SigningDeferred(Reply.make(451, "4.7.5", f"DKIM signing for {e.domain or 'the message'} "
                                             f"failed ({cause.__class__.__name__}); not sent unsigned")) from cause
        if signed is None:
            return request
        return replace(request, open_content=lambda: io.BytesIO(signed))




# ---------------------------------------------------------------- configuration ([dkim] and dkim_sign)

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")


def read_dkim(r: Any, data_dir: str) -> tuple[Any, ...]:
    """``[dkim] keys = [{domain, selector, algorithm, key_file}, ...]`` -> DKIMKeyConfig tuple.

    Each key file is read and tried now, so a bad key is a configuration
    problem naming ``dkim.keys[N].key_file``, not a failure at send time.
    """
    entries = r.get("keys", [], lambda v: v if isinstance(v, list) else _fail("must be a list of tables"))
    out: list[DKIMKeyConfig] = []
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(entries, 1):
        where = f"keys[{i}]"
        if not isinstance(entry, dict):
            r.error(where, "must be a table {domain, selector, algorithm, key_file}")
            continue
        unknown = set(entry) - {"domain", "selector", "algorithm", "key_file", "arc_seal", "on_failure"}
        for name in sorted(unknown):
            r.error(f"{where}.{name}", "unknown setting")
        try:
            domain = _domain(entry.get("domain"))
        except (ValueError, TypeError) as e:
            r.error(f"{where}.domain", str(e))
            continue
        selector = entry.get("selector")
        if not isinstance(selector, str) or not _SELECTOR.match(selector):
            r.error(f"{where}.selector", f"must be a DNS label such as \"s2026\", not {selector!r}")
            continue
        algorithm = entry.get("algorithm", "rsa-sha256")
        if algorithm not in ALGORITHMS:
            r.error(f"{where}.algorithm", f"must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
            continue
        path = entry.get("key_file")
        if not isinstance(path, str) or not path:
            r.error(f"{where}.key_file", "is required: the private key file (exmta dkim keygen writes one)")
            continue
        path = path if os.path.isabs(path) else os.path.join(data_dir, path)
        try:
            load_key(domain, selector, algorithm, path)
        except OSError as e:
            r.error(f"{where}.key_file", f"cannot read {path}: {e.strerror}"
                    + ("" if os.path.isabs(entry["key_file"]) else f" (key_file is relative to data_dir {data_dir})"))
            continue
        except ValueError as e:
            r.error(f"{where}.key_file", str(e))
            continue
        if (domain, selector) in seen:
            r.error(f"{where}.selector", f"{selector} is already configured for {domain}")
            continue
        seen.add((domain, selector))
        seal = entry.get("arc_seal", False)
        if not isinstance(seal, bool):
            r.error(f"{where}.arc_seal", "must be true or false")
            continue
        if seal and algorithm != "rsa-sha256":
            r.error(f"{where}.arc_seal", "ARC sealing needs an rsa-sha256 key (RFC 8617)")
            continue
        if seal and any(k.arc_seal for k in out):
            r.error(f"{where}.arc_seal", "only one key may have arc_seal = true")
            continue
        on_failure = entry.get("on_failure", "defer")
        if on_failure not in ON_FAILURE:
            r.error(f"{where}.on_failure", f"must be one of {', '.join(ON_FAILURE)}, not {on_failure!r}")
            continue
        extra: dict[str, Any] = {"arc_seal": True} if seal else {}
        if on_failure != "defer":
            extra["on_failure"] = on_failure
        out.append(DKIMKeyConfig(domain=domain, selector=selector, key_file=path, algorithm=algorithm, **extra))
    r.finish()
    return tuple(out)


def _fail(message: str) -> Any:
    raise ValueError(message)


def signer_from_config(config: Any, reactor: Any = None, threadpool: Any = None) -> DKIMSigner:
    keys = [replace(load_key(k.domain, k.selector, k.algorithm, k.key_file),
                    on_failure=getattr(k, "on_failure", "defer"))
            for k in config.dkim_keys]
    arc = [key for key, k in zip(keys, config.dkim_keys) if getattr(k, "arc_seal", False)]
    # seal with the authserv-id our authres filter writes (its authserv_id, else the hostname)
    authserv_id = next((str(t["authserv_id"]) for t in config.filters.values()
                        if t.get("plugin") == "authres" and "authserv_id" in t), config.hostname)
    return DKIMSigner(keys, reactor, threadpool, arc_key=arc[0] if arc else None, authserv_id=authserv_id)


def attach_signers(config: Any, connectors: dict[str, Any], reactor: Any, threadpool: Any) -> None:
    """Give every SMTP/LMTP connector with ``dkim_sign = true`` one shared signer."""
    signer = signer_from_config(config, reactor, threadpool)
    for sc in config.send:
        connector = connectors.get(sc.name)
        if getattr(sc, "dkim_sign", False) and connector is not None and hasattr(connector, "signer"):
            connector.signer = signer
