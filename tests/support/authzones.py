"""Test zones and keys for the mail authentication tests (served by Knot on loopback)."""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from exmta.send.dkim_sign import DKIMKey, generate_key, record_text

LONG = "x" * 250


def txt(value: str) -> str:
    """A zone-file TXT value split into quoted strings of at most 250 characters."""
    return " ".join(f'"{value[i:i + 250]}"' for i in range(0, len(value), 250)) or '""'


@dataclass
class Keys:
    rsa: DKIMKey
    ed: DKIMKey
    short: DKIMKey
    other: DKIMKey           # signs for other.test (not aligned with example.test)
    public: dict[str, bytes] = field(default_factory=dict)


def make_keys() -> Keys:
    pub = {}
    priv, pub["sel1"] = generate_key("rsa-sha256", 2048)
    rsa = DKIMKey("example.test", "sel1", "rsa-sha256", priv)
    priv, pub["ed"] = generate_key("ed25519-sha256")
    ed = DKIMKey("example.test", "ed", "ed25519-sha256", priv)
    priv, pub["short"] = generate_key("rsa-sha256", 1024)
    short = DKIMKey("example.test", "short", "rsa-sha256", priv)
    priv, pub["other"] = generate_key("rsa-sha256", 2048)
    other = DKIMKey("other.test", "o1", "rsa-sha256", priv)
    return Keys(rsa, ed, short, other, pub)


def zones(keys: Keys) -> dict[str, str]:
    p = keys.public
    example = f"""\
@ TXT "v=spf1 ip4:192.0.2.0/24 -all"
@ MX 10 mx
mx A 127.0.0.1
_dmarc TXT "v=DMARC1; p=reject; sp=quarantine; rua=mailto:dmarc-rua@example.test"
sel1._domainkey TXT {txt(record_text("rsa-sha256", p["sel1"]))}
ed._domainkey TXT {txt(record_text("ed25519-sha256", p["ed"]))}
short._domainkey TXT {txt(record_text("rsa-sha256", p["short"]))}
notb64._domainkey TXT "v=DKIM1; k=rsa; p=!!!not*base64!!!"
revoked._domainkey TXT "v=DKIM1; k=rsa; p="
big._domainkey TXT {txt("v=DKIM1; k=rsa; p=" + "A" * 9000)}
sub TXT "v=spf1 ip4:192.0.2.0/24 -all"
strict TXT "v=spf1 ip4:192.0.2.0/24 -all"
_dmarc.strict TXT "v=DMARC1; p=reject; aspf=s; adkim=s"
"""
    other = f"""\
@ TXT "v=spf1 ip4:198.51.100.0/24 -all"
ext.test._report._dmarc TXT "v=DMARC1"
o1._domainkey TXT {txt(record_text("rsa-sha256", p["other"]))}
"""
    spf = """\
plain TXT "v=spf1 ip4:192.0.2.0/24 -all"
inc TXT "v=spf1 include:plain.spf.test ~all"
redir TXT "v=spf1 redirect=plain.spf.test"
macro TXT "v=spf1 exists:%{ir}.%{l1r+-}._spf.spf.test -all"
10.2.0.192.alice._spf A 127.0.0.2
mxm TXT "v=spf1 mx -all"
mxm MX 10 mail
mail A 192.0.2.20
amech TXT "v=spf1 a -all"
amech A 192.0.2.30
ip6m TXT "v=spf1 ip6:2001:db8::/32 -all"
soft TXT "v=spf1 ~all"
neutral TXT "v=spf1 ?all"
exp TXT "v=spf1 -all exp=explain.spf.test"
explain TXT "%{i} is not one of %{d}'s servers"
toomany TXT "v=spf1 include:l1 include:l2 include:l3 include:l4 include:l5 include:l6 include:l7 include:l8 include:l9 include:l10 include:l11 -all"
void TXT "v=spf1 a:nx1.spf.test a:nx2.spf.test a:nx3.spf.test ip4:192.0.2.0/24 -all"
tempinc TXT "v=spf1 include:x.broken.test -all"
syntax TXT "v=spf1 ip4:300.1.1.1 -all"
badmech TXT "v=spf1 frobnicate:example.test -all"
two TXT "v=spf1 -all"
two TXT "v=spf1 +all"
nospf TXT "hello world"
helo TXT "v=spf1 ip4:192.0.2.0/24 -all"
""" + "".join(f'l{i} TXT "v=spf1 -all"\n' for i in range(1, 12))
    return {
        "example.test": example,
        "other.test": other,
        "spf.test": spf,
        "quar.test": '@ TXT "v=spf1 ip4:192.0.2.0/24 -all"\n_dmarc TXT "v=DMARC1; p=quarantine"\n',
        "pct.test": '@ TXT "v=spf1 ip4:192.0.2.0/24 -all"\n_dmarc TXT "v=DMARC1; p=reject; pct=0"\n',
        "tagonly.test": '@ TXT "v=spf1 ip4:192.0.2.0/24 -all"\n_dmarc TXT "v=DMARC1; p=none"\n',
        "baddmarc.test": '@ TXT "v=spf1 -all"\n_dmarc TXT "v=DMARC1; p=bogus"\n',
        "twodmarc.test": '_dmarc TXT "v=DMARC1; p=reject"\n_dmarc TXT "v=DMARC1; p=none"\n',
        "bigdmarc.test": f'_dmarc TXT {txt("v=DMARC1; p=reject; x=" + "y" * 9000)}\n',
        "ext.test": ('@ TXT "v=spf1 ip4:192.0.2.0/24 -all"\n'
                     '_dmarc TXT "v=DMARC1; p=quarantine; rua=mailto:agg@other.test!10m,mailto:agg@third.test"\n'),
        "broken.test": "this line is not a record\n",
        # ext.test's second rua domain: served, but without the report agreement (a real "no", not a
        # REFUSED from a server that does not know the zone, which is a temporary error)
        "third.test": '@ TXT "v=spf1 -all"\n',
    }


class SilentUDP:
    """A loopback UDP port that never answers: a DNS server that times out."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def silent_udp() -> Iterator[SilentUDP]:
    s = SilentUDP()
    try:
        yield s
    finally:
        s.close()


def message(from_: str = "Alice <alice@example.test>", body: bytes = b"Hello.\r\n", extra: bytes = b"") -> bytes:
    head = f"From: {from_}\r\nTo: bob@dest.test\r\nSubject: test\r\nDate: Sat, 28 Nov 2026 09:00:00 +0000\r\n"
    head += "Message-ID: <1@example.test>\r\n"
    return extra + head.encode("utf-8") + b"\r\n" + body


__all__ = ["Keys", "Path", "SilentUDP", "make_keys", "message", "silent_udp", "txt", "zones"]
