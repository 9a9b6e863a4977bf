"""Read and check PEM certificates and private keys.

A certificate that is expired, not yet valid, or does not belong to its key
is refused with a message that names the file, at config check time and on
reload (the old certificate then stays in use).  Parsing uses
``cryptography``; the contexts are built from the same bytes by pyOpenSSL.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID, NameOID

__all__ = ["CertificateError", "LoadedCertificate", "certificate_names", "load_certificate", "mtimes"]

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


class CertificateError(Exception):
    """A certificate or key file cannot be used; the message names the file."""


@dataclass(frozen=True)
class LoadedCertificate:
    """A checked certificate: the leaf, its chain and key as PEM bytes, plus facts for logs."""

    paths: tuple[str, ...]
    leaf_pem: bytes
    chain_pem: tuple[bytes, ...]
    key_pem: bytes
    subject: str
    names: tuple[str, ...]
    not_after: datetime.datetime


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CertificateError(f"{path}: {what} file does not exist") from None
    except OSError as e:
        raise CertificateError(f"{path}: {what} file cannot be read: {e.strerror}") from None


def _split_certs(data: bytes, path: str) -> list[x509.Certificate]:
    if _PEM_CERT not in data:
        return []
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CertificateError(f"{path}: not a valid PEM certificate file: {e}") from None


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The subject CN and the SAN DNS names, lower case, without duplicates."""
    names: list[str] = []
    for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attr.value if isinstance(attr.value, str) else attr.value.decode("utf-8", "replace")
        names.append(value.lower())
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        names += [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        pass
    return tuple(dict.fromkeys(names))


def _check_dates(cert: x509.Certificate, path: str, now: datetime.datetime, what: str) -> None:
    if now > cert.not_valid_after_utc:
        raise CertificateError(
            f"{path}: {what} {cert.subject.rfc4514_string()} expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    if now < cert.not_valid_before_utc:
        raise CertificateError(
            f"{path}: {what} {cert.subject.rfc4514_string()} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_certificate(cert: str, key: str | None = None, chain: str | None = None,
                     now: datetime.datetime | None = None) -> LoadedCertificate:
    """Read ``cert`` (+ ``chain``) and ``key`` (default: in ``cert``); raise CertificateError."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    cert_data = _read(cert, "certificate")
    certs = _split_certs(cert_data, cert)
    if not certs:
        raise CertificateError(f"{cert}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file")
    leaf, chain_certs = certs[0], certs[1:]
    if chain:
        extra = _split_certs(_read(chain, "chain"), chain)
        if not extra:
            raise CertificateError(f"{chain}: no PEM certificate in the chain file")
        chain_certs += extra
    key_path = key or cert
    key_data = cert_data if key is None else _read(key, "key")
    if b"PRIVATE KEY-----" not in key_data:
        raise CertificateError(f"{key_path}: no PEM private key in the file"
                               + ("" if key else " (set key = \"...\" when the key is in its own file)"))
    try:
        private_key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise CertificateError(f"{key_path}: the private key is encrypted; exmta needs it unencrypted "
                               "(protect it with file permissions)") from None
    except (ValueError, Exception) as e:  # cryptography raises several types for bad keys
        raise CertificateError(f"{key_path}: the private key cannot be read: {e}") from None
    _check_dates(leaf, cert, now, "certificate")
    for c in chain_certs:
        _check_dates(c, chain or cert, now, "chain certificate")
    if _spki(private_key.public_key()) != _spki(leaf.public_key()):
        raise CertificateError(
            f"{key_path}: the private key does not match the certificate {leaf.subject.rfc4514_string()} "
            f"in {cert}")
    pem = serialization.Encoding.PEM
    key_pem = private_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    paths = tuple(p for p in (cert, key, chain) if p)
    return LoadedCertificate(
        paths=paths,
        leaf_pem=leaf.public_bytes(pem),
        chain_pem=tuple(c.public_bytes(pem) for c in chain_certs),
        key_pem=key_pem,
        subject=leaf.subject.rfc4514_string(),
        names=certificate_names(leaf),
        not_after=leaf.not_valid_after_utc,
    )


def mtimes(paths: tuple[str, ...]) -> tuple[tuple[str, int, int, int], ...]:
    """(path, mtime_ns, inode, size) of each file (zeros when missing): a cheap change signature."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((p, st.st_mtime_ns, st.st_ino, st.st_size))
        except OSError:
            out.append((p, 0, 0, 0))
    return tuple(out)
