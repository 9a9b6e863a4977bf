"""A real S/MIME signature still verifies (openssl) after a disclaimer was added with the Wrap fallback."""
from __future__ import annotations

import datetime as dt
import email
import subprocess
from email import policy

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from exmta.filters.base import HeaderEdits
from exmta.message import MimeMessage, apply_disclaimer


def signed_message() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, "signer@example.test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    smime = (pkcs7.PKCS7SignatureBuilder().set_data(b"Content-Type: text/plain\r\n\r\nSigned text.\r\n")
             .add_signer(cert, key, hashes.SHA256())
             .sign(serialization.Encoding.SMIME, [pkcs7.PKCS7Options.DetachedSignature]))
    smime = smime.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return b"From: signer@example.test\r\nTo: someone@partner.test\r\nSubject: signed\r\n" + smime


def verify(entity: bytes, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "entity.eml"
    path.write_bytes(entity)
    return subprocess.run(["openssl", "smime", "-verify", "-noverify", "-in", str(path), "-out", "/dev/null"],
                          capture_output=True, timeout=60)


def test_wrapped_signed_entity_still_verifies(tmp_path):
    raw = signed_message()
    assert verify(raw, tmp_path).returncode == 0
    msg = MimeMessage(raw)
    edit = apply_disclaimer(msg, text="External disclaimer", fallback="wrap")
    journal = HeaderEdits()
    journal.ops = list(edit.header_ops)
    out = journal.apply(msg.raw_headers) + b"\r\n" + edit.body
    parsed = email.message_from_bytes(out, policy=policy.default)
    signed, notice = parsed.iter_parts()
    assert notice.get_content().strip() == "External disclaimer"
    # the first part of the new multipart/mixed, byte for byte, is a verifiable S/MIME entity
    wrapped = MimeMessage(out)
    first = wrapped.root.children[0]
    entity = first.raw[first.start:first.end]
    result = verify(entity, tmp_path)
    assert result.returncode == 0, result.stderr
    assert b"Verification successful" in result.stderr
    assert verify(entity.replace(b"Signed text.", b"Signed text!"), tmp_path).returncode != 0  # the check bites
