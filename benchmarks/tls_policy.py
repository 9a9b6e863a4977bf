#!/usr/bin/env python3
"""The cost of MTA-STS and DANE policy lookups on relay throughput (issue 18).

    .venv/bin/python benchmarks/tls_policy.py [-m 600] [-c 20] [-d 100]

Builds, on loopback: a DNSSEC-signed zone with 100 destination domains
(Knot signs, unbound validates and caches, as in production), each with an
MX, a TLSA 3 1 1 record of the MX certificate, an MTA-STS TXT record and
policy (served by a local HTTPS host), and one aiosmtpd MX host with
STARTTLS.  Then delivers ``-m`` messages round-robin over the domains with
``-c`` at a time through exmta's SMTP send connector, a new connection per
message (so every message pays the policy step), four ways:

* ``no policy``: the connector alone (MX lookup, opportunistic TLS), run
  before and after the others (after a warm-up run); the baseline is the mean;
* ``cold``: MTA-STS and DANE, empty caches (first message per domain
  fetches the policy; unbound has just started);
* ``warm``: the same engine again (policies in memory, unbound warm);
* ``restart``: a new engine that finds the policies on disk.

Prints msgs/s for each and the ratio to ``no policy``.  Bounded: each run
stops at ``-t`` seconds.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import ssl
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.python.threadpool import ThreadPool  # noqa: E402

from exmta.config.schema import SendConnectorConfig  # noqa: E402
from exmta.model import DeliveryRequest, Envelope, MailParams, Outcome, Recipient  # noqa: E402
from exmta.routing.dns import DNSResolver  # noqa: E402
from exmta.send.smtp import SMTPSendConnector  # noqa: E402
from exmta.smtp.client import ClientTimeouts  # noqa: E402
from exmta.tlspolicy.config import TLSPolicyConfig  # noqa: E402
from exmta.tlspolicy.engine import TLSPolicyEngine  # noqa: E402
from support import dnssec  # noqa: E402
from support.policyhost import PolicyHost, policy  # noqa: E402
from support.procs import free_port  # noqa: E402
from support.sinks import SmtpSink  # noqa: E402
from support.tlscerts import TestPKI  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--messages", type=int, default=600)
    ap.add_argument("-c", "--concurrency", type=int, default=20)
    ap.add_argument("-d", "--domains", type=int, default=100)
    ap.add_argument("-t", "--time-limit", type=float, default=25.0, help="seconds per run at most")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="exmta-tlspolicy-"))
    domains = [f"d{i}" for i in range(args.domains)]
    pki = TestPKI(work / "pki")
    mx = pki.server(*[f"mx.{d}.bench.test" for d in domains], file="mx")
    leaf = x509.load_pem_x509_certificate(mx.cert.read_bytes())
    spki = leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    tlsa = hashlib.sha256(spki).hexdigest()
    lines = []
    for d in domains:
        lines += [f"{d} MX 10 mx.{d}", f"mx.{d} A 127.0.0.2", f"_25._tcp.mx.{d} TLSA 3 1 1 {tlsa}",
                  f'_mta-sts.{d} TXT "v=STSv1; id=1"', f"mta-sts.{d} A 127.0.0.1"]
    zone = dnssec.SignedZone(work, "bench.test", "\n".join(lines) + "\n").start()
    unbound = dnssec.Unbound(work, zone, cache=True).start()
    port = free_port("127.0.0.2")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(mx.cert), str(mx.key))
    sink = SmtpSink(host="127.0.0.2", port=port, tls_context=ctx).start()
    host = PolicyHost(pki, [f"mta-sts.{d}.bench.test" for d in domains])
    for d in domains:
        host.policies[f"mta-sts.{d}.bench.test"] = (200, "text/plain", policy("enforce", f"mx.{d}.bench.test"))
    pool = ThreadPool(minthreads=2, maxthreads=8, name="bench")
    pool.start()
    results: dict[str, float] = {}

    async def run_all() -> None:
        host.listen(reactor)
        resolver = DNSResolver(reactor, pool, unbound.nameservers, timeout=5.0)
        sc = SendConnectorConfig(name="internet", port=port, tls="opportunistic", max_messages_per_connection=1,
                                 max_per_destination=args.concurrency)
        conn = SMTPSendConnector(sc, reactor, reactor, resolver, "bench.exmta.test",
                                 timeouts=ClientTimeouts.uniform(10.0), idle_timeout=0)
        cfg = TLSPolicyConfig(dane=True, dane_resolvers=(f"127.0.0.1:{unbound.port}",), ca_file=str(pki.ca_file),
                              cache_dir=str(work / "cache"), https_port=host.port_number)
        body = b"From: a@bench.exmta.test\r\nSubject: bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * 50

        async def run(label: str, engine: TLSPolicyEngine | None) -> None:
            conn.tls_policy = engine
            sem = defer.DeferredSemaphore(args.concurrency)
            failed = 0
            start = time.monotonic()
            deadline = start + args.time_limit

            async def one(i: int) -> None:
                nonlocal failed
                if time.monotonic() > deadline:
                    return
                rcpt = Recipient(f"u{i}@{domains[i % len(domains)]}.bench.test")
                env = Envelope("a@bench.exmta.test", [rcpt], params=MailParams(), queue_id=f"Q{i}", size=len(body))
                [r] = await conn.deliver(DeliveryRequest(f"Q{i}", env, (rcpt,), lambda: io.BytesIO(body)))
                if r.outcome is not Outcome.DELIVERED:
                    failed += 1
                    if failed == 1:
                        print(f"  first failure: {r.reply}", flush=True)

            await defer.gatherResults([sem.run(lambda i=i: defer.Deferred.fromCoroutine(one(i)))
                                       for i in range(args.messages)])
            elapsed = time.monotonic() - start
            results[label] = args.messages / elapsed
            print(f"{label:<10} {args.messages} msgs to {len(domains)} domains in {elapsed:6.2f} s = "
                  f"{results[label]:7.1f} msgs/s  (failed: {failed})", flush=True)

        await run("(warm-up)", None)  # MX and A records into unbound's cache, code paths warm
        await run("no policy", None)
        engine = TLSPolicyEngine(cfg, reactor, reactor, pool, resolver)
        await run("cold", engine)
        await run("warm", engine)
        await run("restart", TLSPolicyEngine(cfg, reactor, reactor, pool, resolver))
        first = results["no policy"]
        await run("no policy", None)  # again: the baseline is the mean of both runs
        results["no policy"] = (first + results["no policy"]) / 2
        await conn.close()
        await host.stop()

    def done(_: object) -> None:
        reactor.stop()

    def start() -> None:
        d = defer.Deferred.fromCoroutine(run_all())
        d.addErrback(lambda f: f.printTraceback())
        d.addBoth(done)

    try:
        task.deferLater(reactor, 0, start)
        reactor.run()
    finally:
        pool.stop()
        sink.stop()
        unbound.stop()
        zone.stop()
        shutil.rmtree(work, ignore_errors=True)
    base = results.get("no policy")
    if base:
        print(f"baseline (mean of the two no-policy runs): {base:.1f} msgs/s")
        print("ratio to no policy: " + ", ".join(f"{k} {v / base:.3f}" for k, v in results.items()
                                                 if k not in ("no policy", "(warm-up)")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
