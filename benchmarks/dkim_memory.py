#!/usr/bin/env python3
"""Issue 11 item 5: memory and time of DKIM verification of one 30 MiB signed message (tracemalloc peak).

    benchmarks/dkim_memory.py LABEL

Runs exmta.filters.dkim_verify on the tree first on PYTHONPATH; compare two trees with PYTHONPATH=...
Writes a temporary file under $TMPDIR. Prints: LABEL results peak MiB seconds.
"""
import sys, tracemalloc, base64, time, os, tempfile
import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from exmta.filters.base import MessageView
from exmta.filters.authres import AuthState
from twisted.internet.defer import Deferred
class InlineDNS:
    timeout = 5.0
    def __init__(self, records): self.records = records
    def dkim_txt(self, name, timeout=5):
        key = name if isinstance(name, bytes) else name.encode()
        return self.records.get(key.rstrip(b".") + b".")
    def run(self, fn, *args):
        from twisted.internet.defer import maybeDeferred
        return maybeDeferred(fn, *args)
BIG = os.path.join(tempfile.mkdtemp(), "big.eml")
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
pub = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
dns = InlineDNS({b"sel._domainkey.example.test.": b"v=DKIM1; k=rsa; p=" + base64.b64encode(pub)})
line = b"0123456789 abcdefghij  klmnopqrstuvwxyz\t\r\n"
body = line * (30 * 1024 * 1024 // len(line)); head = b"From: a@example.test\r\nSubject: big\r\n"
sig = dkim.sign(head + b"\r\n" + body, b"sel", b"example.test", pem, include_headers=[b"from", b"subject"])
open(BIG, "wb").write(sig + head + b"\r\n" + body); del body
view = MessageView(lambda: open(BIG, "rb"), size=len(sig)+len(head)+2+30*1024*1024)
from exmta.filters import dkim_verify
tracemalloc.start(); t=time.perf_counter(); out=[]
if hasattr(dkim_verify, "body_hashes"):
    Deferred.fromCoroutine(dkim_verify.dkim_results(dns, AuthState(), view)).addCallback(out.append)
else:
    data = dkim_verify.read_message(view); out.append(dkim_verify.verify_all(dns, data))
print(sys.argv[1], [r.result for r in out[0]], "peak MiB %.1f" % (tracemalloc.get_traced_memory()[1]/2**20), "s %.2f" % (time.perf_counter()-t))
os.remove(BIG)
