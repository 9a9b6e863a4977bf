#!/usr/bin/env python3
"""The cost of TLS-RPT "no-policy-found" recording on relay throughput (issue 18).

    .venv/bin/python benchmarks/tlsrpt_nopolicy.py [-m 600] [-c 20] [-d 100]

Builds, on loopback: a Knot zone with ``-d`` domains that publish nothing
(``n<i>``) and ``-d`` that publish a TLSRPT record (``r<i>``), none with
MTA-STS or DANE, each with an MX on one aiosmtpd host with STARTTLS.  Then
delivers ``-m`` messages round-robin through exmta's SMTP send connector, a
new connection per message, ``-c`` at a time:

* ``plain``: the connector without a policy engine (MX lookup, opportunistic
  TLS), before and after the others; the baseline is the mean;
* ``cold``: ``[tls_policy] tls_rpt = true`` only (no MTA-STS, no DANE), a
  new engine: the first message per domain starts the TLSRPT lookup;
* ``warm``: the same engine again (the answers cached);
* ``reporting``: the same engine to the ``r<i>`` domains: every session's
  result is written to the results file.

Prints msgs/s for each and the ratio to ``plain``.  Bounded: each run stops
at ``-t`` seconds.
"""
from __future__ import annotations

import argparse
import io
import shutil
import ssl
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.python.threadpool import ThreadPool  # noqa: E402

from exmta.config.schema import SendConnectorConfig  # noqa: E402
from exmta.model import DeliveryRequest, Envelope, MailParams, Outcome, Recipient  # noqa: E402
from exmta.routing.dns import DNSResolver  # noqa: E402
from exmta.send.smtp import SMTPSendConnector  # noqa: E402
from exmta.smtp.client import ClientTimeouts  # noqa: E402
from exmta.tlspolicy.config import TLSPolicyConfig  # noqa: E402
from exmta.tlspolicy.engine import TLSPolicyEngine  # noqa: E402
from exmta.tlspolicy.report import TLSResultLog  # noqa: E402
from support import knot  # noqa: E402
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
    work = Path(tempfile.mkdtemp(prefix="exmta-tlsrpt-"))
    quiet = [f"n{i}" for i in range(args.domains)]
    loud = [f"r{i}" for i in range(args.domains)]
    pki = TestPKI(work / "pki")
    mx = pki.server(*[f"mx.{d}.bench.test" for d in quiet + loud], file="mx")
    lines = []
    for d in quiet + loud:
        lines += [f"{d} MX 10 mx.{d}", f"mx.{d} A 127.0.0.2"]
    lines += [f'_smtp._tls.{d} TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{d}.bench.test"' for d in loud]
    dns_server = knot.KnotServer(work, {"bench.test": "\n".join(lines) + "\n"}).start()
    port = free_port("127.0.0.2")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(mx.cert), str(mx.key))
    sink = SmtpSink(host="127.0.0.2", port=port, tls_context=ctx).start()
    pool = ThreadPool(minthreads=2, maxthreads=8, name="bench")
    pool.start()
    results: dict[str, float] = {}
    results_file = work / "tlsrpt" / "results.jsonl"

    async def run_all() -> None:
        resolver = DNSResolver(reactor, pool, dns_server.nameservers, timeout=5.0)
        sc = SendConnectorConfig(name="internet", port=port, tls="opportunistic", max_messages_per_connection=1,
                                 max_per_destination=args.concurrency)
        conn = SMTPSendConnector(sc, reactor, reactor, resolver, "bench.exmta.test",
                                 timeouts=ClientTimeouts.uniform(10.0), idle_timeout=0)
        cfg = TLSPolicyConfig(mta_sts=False, dane=False, tls_rpt=True, cache_dir=str(work / "cache"))
        body = b"From: a@bench.exmta.test\r\nSubject: bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * 50

        async def run(label: str, engine: TLSPolicyEngine | None, domains: list[str]) -> None:
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

        await run("(warm-up)", None, quiet)
        await run("plain", None, quiet)
        engine = TLSPolicyEngine(cfg, reactor, reactor, pool, resolver, reporter=TLSResultLog(str(results_file),
                                                                                              reactor))
        await run("cold", engine, quiet)
        await run("warm", engine, quiet)
        await run("(warm-up)", engine, loud)  # the r<i> answers into the cache
        await run("reporting", engine, loud)
        first = results["plain"]
        await run("plain", None, quiet)
        results["plain"] = (first + results["plain"]) / 2
        await conn.close()

    def done(_: object) -> None:
        reactor.stop()

    def start() -> None:
        d = defer.Deferred.fromCoroutine(run_all())
        d.addErrback(lambda f: f.printTraceback())
        d.addBoth(done)

    try:
        task.deferLater(reactor, 0, start)
        reactor.run()
        written = len(results_file.read_text().splitlines()) if results_file.exists() else 0
    finally:
        pool.stop()
        sink.stop()
        dns_server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"results written: {written} (the r<i> sessions only)")
    base = results.get("plain")
    if base:
        print(f"baseline (mean of the two plain runs): {base:.1f} msgs/s")
        print("ratio to plain: " + ", ".join(f"{k} {v / base:.3f}" for k, v in results.items()
                                             if k not in ("plain", "(warm-up)")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
