"""Realistic and hostile messages for the MIME model and the transport rules (CRLF bytes)."""
from __future__ import annotations

import base64
import struct
import zlib


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


PNG = base64.b64encode(
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
    b"\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82").decode()

ALTERNATIVE_INLINE = crlf(f"""From: Alice Example <alice@example.test>
To: bob@partner.test
Subject: Quarterly figures
Message-ID: <alt-1@example.test>
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: text/plain; charset="us-ascii"
Content-Transfer-Encoding: 7bit

Hello Bob,
the figures are attached.
--alt
Content-Type: multipart/related; boundary="rel"

--rel
Content-Type: text/html; charset="utf-8"
Content-Transfer-Encoding: quoted-printable

<html><body><p>Hello Bob,</p><p>the figures <img src=3D"cid:logo"></p></body></html>
--rel
Content-Type: image/png; name="logo.png"
Content-Disposition: inline; filename="logo.png"
Content-ID: <logo>
Content-Transfer-Encoding: base64

{PNG}
--rel--
--alt--
""")

FORWARDED = crlf("""From: carol@example.test
To: dave@example.test
Subject: Fwd: invoice
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: text/plain; charset=utf-8

See below.
--outer
Content-Type: message/rfc822

From: vendor@supplier.test
Subject: =?iso-8859-1?q?Facture_r=E9gl=E9e?=
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="inner"

--inner
Content-Type: text/plain

Invoice attached.
--inner
Content-Type: application/zip; name="invoice.zip"
Content-Disposition: attachment; filename="invoice.zip"
Content-Transfer-Encoding: base64

UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA==
--inner--
--outer--
""")

SMIME_SIGNED = crlf("""From: signer@example.test
To: someone@partner.test
Subject: signed
MIME-Version: 1.0
Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256;
 boundary="sig"

This is an S/MIME signed message

--sig
Content-Type: text/plain; charset=us-ascii

Signed text that must not change.
--sig
Content-Type: application/pkcs7-signature; name="smime.p7s"
Content-Transfer-Encoding: base64
Content-Disposition: attachment; filename="smime.p7s"

MIAGCSqGSIb3DQEHAqCAMIACAQExDzANBglghkgBZQMEAgEFADCABgkqhkiG9w0BBwEAAKCAMIIB
--sig--
""")

CALENDAR = crlf("""From: organiser@example.test
To: guest@example.test
Subject: Meeting
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="cal"

--cal
Content-Type: text/plain; charset=utf-8

Team meeting on Monday.
--cal
Content-Type: text/calendar; charset=utf-8; method=REQUEST

BEGIN:VCALENDAR
METHOD:REQUEST
BEGIN:VEVENT
SUMMARY:Team meeting
END:VEVENT
END:VCALENDAR
--cal--
""")

NON_ASCII_NAMES = crlf("""From: =?utf-8?b?SsO8cmdlbiBNw7xsbGVy?= <juergen@example.test>
To: x@example.test
Subject: =?utf-8?q?Pr=C3=BCfbericht?= und Anhang
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="n"

--n
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

Grüße
--n
Content-Type: application/pdf
Content-Disposition: attachment;
 filename*0*=utf-8''Pr%C3%BCf;
 filename*1*=bericht%20%C3%A4.pdf
Content-Transfer-Encoding: base64

JVBERi0xLjQKJcOkw7zDtsOfCjEgMCBvYmoKPDw+PgplbmRvYmoKdHJhaWxlcgo8PD4+CiUlRU9GCg==
--n
Content-Type: application/octet-stream; name="=?utf-8?q?r=C3=A9sum=C3=A9=2Edocx?="
Content-Disposition: attachment; filename="=?utf-8?q?r=C3=A9sum=C3=A9=2Edocx?="
Content-Transfer-Encoding: base64

UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA==
--n--
""")

BROKEN = crlf("""From: broken@example.test
To: x@example.test
Subject: broken
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="br"

--br
Content-Type: text/plain; charset=x-unknown-charset

caf\u00e9 text in an unknown charset
--br
Content-Type: text/plain; charset=us-ascii

na\u00efve UTF-8 under a us-ascii label
--br
Content-Type: application/octet-stream; name="bad.bin"
Content-Transfer-Encoding: base64

SGVsbG8gd29ybGQ*!!!=x=
--br
Content-Type: text/plain

the closing boundary never comes
""")

PLAIN = crlf("""From: alice@example.test
To: bob@example.test
Subject: hello
Message-ID: <plain-1@example.test>
Date: Mon, 07 Dec 2026 08:00:00 +0000

Just a line of text.
""")


def nested_multiparts(depth: int) -> bytes:
    head = "From: a@x.test\r\nSubject: nest\r\nMIME-Version: 1.0\r\n"
    opens = "".join(f"Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n" for i in range(depth))
    closes = "".join(f"\r\n--b{i}--" for i in reversed(range(depth)))
    return (head + opens + "Content-Type: text/plain\r\n\r\ndeep" + closes + "\r\n").encode()


def many_parts(count: int) -> bytes:
    part = b"--m\r\nContent-Type: text/plain\r\n\r\nx\r\n"
    return (b"From: a@x.test\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=m\r\n\r\n" + part * count + b"--m--\r\n")


def zip_bomb(expanded: int = 1 << 30, name: str = "zeros.bin") -> bytes:
    """A ZIP with one member inflating to ``expanded`` zero octets (a few MB; built without a 1 GB buffer).

    After a full flush a compressor's output for the same input chunk repeats, so the
    deflate stream is the first chunk, one chunk repeated, and the end.
    """
    chunk = 1 << 20
    assert expanded % chunk == 0
    zero = bytes(chunk)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(zero) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(zero) + c.flush(zlib.Z_FULL_FLUSH)
    data = first + again * (expanded // chunk - 1) + c.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(expanded // chunk):
        crc = zlib.crc32(zero, crc)
    fname = name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(data), expanded, len(fname), 0) + fname
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(data), expanded,
                          len(fname), 0, 0, 0, 0, 0, 0) + fname
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    return local + data + central + end


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing ``text`` in Helvetica (xref offsets computed)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def with_attachment(payload: bytes, filename: str, ctype: str = "application/octet-stream") -> bytes:
    b64 = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (b"From: a@x.test\r\nTo: b@y.test\r\nSubject: file\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\nContent-Type: text/plain\r\n\r\nsee file\r\n"
            b"--z\r\nContent-Type: " + ctype.encode() + b"\r\nContent-Disposition: attachment; filename=\""
            + filename.encode() + b"\"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + b64 + b"--z--\r\n")


REALISTIC = {
    "alternative_inline": ALTERNATIVE_INLINE, "forwarded": FORWARDED, "smime_signed": SMIME_SIGNED,
    "calendar": CALENDAR, "non_ascii_names": NON_ASCII_NAMES, "broken": BROKEN, "plain": PLAIN,
}
