#!/usr/bin/env python3
"""Issue 11 item 5: memory and time of DKIM verification of one 30 MiB signed message.

    benchmarks/dkim_memory.py LABEL

Runs exmta.filters.dkim_verify of the tree first on PYTHONPATH (compare two
trees with ``PYTHONPATH=TREE``), with the key in memory (no DNS). Writes one
temporary file under $TMPDIR and removes it. Prints: LABEL, the results, the
tracemalloc peak in MiB and the seconds taken.
"""
from __future__ import annotations

import base64
import os
import sys
import tempfile
import time
import tracemalloc
from typing import Any

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.defer import Deferred, maybeDeferred

from exmta.filters import dkim_verify
from exmta.filters.authres import AuthState
from exmta.filters.base import MessageView

MIB = 30


class InlineDNS:
    """The AuthDNS interface dkim_verify uses, with one key in memory; checks run inline."""

    timeout = 5.0

    def __init__(self, records: dict[bytes, bytes]) -> None:
        self.records = records

    def dkim_txt(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        key = name if isinstance(name, bytes) else name.encode()
        return self.records.get(key.rstrip(b".") + b".")

    def run(self, fn: Any, *args: Any) -> Deferred:
        return maybeDeferred(fn, *args)


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "run"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    dns = InlineDNS({b"sel._domainkey.example.test.": b"v=DKIM1; k=rsa; p=" + base64.b64encode(pub)})
    line = b"0123456789 abcdefghij  klmnopqrstuvwxyz\t\r\n"
    body = line * (MIB * 1024 * 1024 // len(line))
    head = b"From: a@example.test\r\nSubject: big\r\n"
    sig = dkim.sign(head + b"\r\n" + body, b"sel", b"example.test", pem, include_headers=[b"from", b"subject"])
    fd, path = tempfile.mkstemp(suffix=".eml")
    with os.fdopen(fd, "wb") as f:
        f.write(sig + head + b"\r\n" + body)
    size = len(sig) + len(head) + 2 + len(body)
    del body
    try:
        view = MessageView(lambda: open(path, "rb"), size=size)
        out: list[Any] = []
        tracemalloc.start()
        t0 = time.perf_counter()
        if hasattr(dkim_verify, "body_hashes"):  # streamed (this branch)
            Deferred.fromCoroutine(dkim_verify.dkim_results(dns, AuthState(), view)).addCallback(out.append)
        else:  # the whole message in memory (before)
            out.append(dkim_verify.verify_all(dns, dkim_verify.read_message(view)))
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    finally:
        os.remove(path)
    print(f"{label} results={[r.result for r in out[0]]} peak_mib={peak:.1f} seconds={seconds:.2f}")


if __name__ == "__main__":
    main()
