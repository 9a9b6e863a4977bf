"""Certificate checks after the handshake: WebPKI for MTA-STS, TLSA matching for DANE.

The handshake itself does not verify (the context accepts any certificate)
so that one place decides, with the peer's whole chain at hand, and says
why in RFC 8460 terms: each check returns ``None`` or a :class:`Problem`
whose ``kind`` is a TLS-RPT result type.

* :func:`check_webpki`: the chain to a trusted root (system roots or a CA
  file) and the leaf's names against the MX host name (RFC 6125 with
  wildcards, RFC 8461 4.2);
* :func:`check_dane`: RFC 7672 section 3: DANE-EE(3) matches the leaf
  (no name or date check), DANE-TA(2) a certificate of the chain that then
  must issue the leaf (PKIX to that anchor, names checked); selectors
  0 (certificate) and 1 (SubjectPublicKeyInfo), matching types 0 (exact),
  1 (SHA-256) and 2 (SHA-512).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto

__all__ = ["Problem", "TLSARecord", "association", "check_dane", "check_names", "check_webpki", "is_ca",
           "make_store", "peer_chain"]


@dataclass(frozen=True)
class Problem:
    kind: str      # RFC 8460 result type: certificate-host-mismatch, certificate-expired, ...
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class TLSARecord:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """RFC 7672 3.1: only DANE-TA(2) and DANE-EE(3), known selectors and matching types, right sizes."""
        if self.usage not in (2, 3) or self.selector not in (0, 1) or self.mtype not in (0, 1, 2):
            return False
        return {0: len(self.data) > 0, 1: len(self.data) == 32, 2: len(self.data) == 64}[self.mtype]

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()[:16]}..."


def peer_chain(connection: Any) -> list[crypto.X509]:
    """The certificates the server sent, leaf first (empty when none)."""
    try:
        chain = connection.get_peer_cert_chain()
    except Exception:
        chain = None
    if chain:
        return list(chain)
    try:
        leaf = connection.get_peer_certificate()
    except Exception:
        leaf = None
    return [leaf] if leaf is not None else []


def make_store(ca_file: str | None, anchors: Sequence[crypto.X509] = (), partial: bool = False) -> crypto.X509Store:
    """An X509Store of ``anchors``, or of ``ca_file`` / the system roots when there are none."""
    store = crypto.X509Store()
    if anchors:
        for cert in anchors:
            store.add_cert(cert)
    elif ca_file:
        store.load_locations(ca_file)
    else:
        import ssl

        paths = ssl.get_default_verify_paths()
        cafile = paths.cafile if paths.cafile and os.path.exists(paths.cafile) else None
        capath = paths.capath if paths.capath and os.path.isdir(paths.capath) else None
        if cafile or capath:
            store.load_locations(cafile, capath)
    if partial:  # a DANE-TA anchor may be an intermediate, not a self-signed root
        store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    return store


def _pkix(chain: list[crypto.X509], store: crypto.X509Store) -> Problem | None:
    leaf, rest = chain[0], chain[1:]
    try:
        crypto.X509StoreContext(store, leaf, chain=rest).verify_certificate()
    except crypto.X509StoreContextError as exc:
        text = str(exc.args[0] if exc.args else exc)
        low = text.lower()
        kind = "certificate-expired" if "expired" in low or "not yet valid" in low else "certificate-not-trusted"
        return Problem(kind, f"certificate not trusted: {text}")
    return None


def is_ca(cert: x509.Certificate) -> bool:
    """A CA certificate (basicConstraints CA:TRUE): a chain that ends in one lacks only a trusted root."""
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def check_names(leaf: crypto.X509, names: Sequence[str]) -> Problem | None:
    """Does the leaf cover any of ``names`` (RFC 6125: SAN dNSName, wildcards in the first label)?"""
    from service_identity import VerificationError
    from service_identity.cryptography import verify_certificate_hostname

    cert = leaf.to_cryptography()
    for name in names:
        try:
            verify_certificate_hostname(cert, name.rstrip("."))
            return None
        except VerificationError:
            continue
        except Exception:  # a certificate service_identity cannot read (no SAN at all, ...)
            continue
    from exmta.tls.certs import certificate_names

    have = ", ".join(certificate_names(cert)) or "none"
    return Problem("certificate-host-mismatch",
                   f"certificate names ({have}) do not match {' or '.join(names)}")


def check_webpki(connection: Any, names: Sequence[str], store: crypto.X509Store) -> Problem | None:
    """MTA-STS: a trusted chain and a matching name."""
    chain = peer_chain(connection)
    if not chain:
        return Problem("certificate-not-trusted", "the server sent no certificate")
    return _pkix(chain, store) or check_names(chain[0], names)


def association(cert: crypto.X509 | x509.Certificate, selector: int, mtype: int) -> bytes:
    """The TLSA association data of ``cert`` for a selector and matching type."""
    c = cert.to_cryptography() if isinstance(cert, crypto.X509) else cert
    if selector == 0:
        data = c.public_bytes(serialization.Encoding.DER)
    else:
        data = c.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def check_dane(connection: Any, records: Sequence[TLSARecord], names: Sequence[str]) -> Problem | None:
    """RFC 7672: any usable record that authenticates the server is enough."""
    usable = [r for r in records if r.usable]
    if not usable:
        return None  # unusable records only: TLS is required but not authenticated (RFC 7672 2.2)
    chain = peer_chain(connection)
    if not chain:
        return Problem("validation-failure", "the server sent no certificate")
    leaf = chain[0]
    problems: list[str] = []
    for rec in usable:
        if rec.usage == 3:
            if association(leaf, rec.selector, rec.mtype) == rec.data:
                return None
            problems.append(f"DANE-EE {rec}: leaf does not match")
            continue
        for cert in chain:  # usage 2: a trust anchor the server sends in its chain
            if association(cert, rec.selector, rec.mtype) != rec.data:
                continue
            store = make_store(None, anchors=[cert], partial=True)
            problem = _pkix(chain, store) if cert is not leaf else None
            problem = problem or check_names(leaf, names)
            if problem is None:
                return None
            problems.append(f"DANE-TA {rec}: {problem.text}")
            break
        else:
            problems.append(f"DANE-TA {rec}: no certificate of the chain matches")
    return Problem("validation-failure", "no TLSA record matches the server certificate: " + "; ".join(problems))
