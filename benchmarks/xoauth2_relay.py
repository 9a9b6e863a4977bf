#!/usr/bin/env python3
"""The XOAUTH2 relay under load: token requests made and msgs/s, end to end on loopback.

    .venv/bin/python benchmarks/xoauth2_relay.py [-n 1000] [-c 4] [--per-connection 1] [-t 110]

Starts the real parts of ``tests/support/xoauth2_parts.py`` (npm
oidc-provider as the token endpoint, Dovecot submission checking every token
by introspection, an aiosmtpd sink, a wiretap) and exmta with an anonymous
LAN connector and an ``auth = "xoauth2"`` send connector.  ``-c`` LAN clients
send ``-n`` messages in all (reusing their connection to exmta); exmta opens
a new session, and so logs in with XOAUTH2, every ``--per-connection``
messages (1 = every message: the worst case for the token cache).  The run is
bounded by ``-t`` seconds; everything started is stopped by PID.

Prints the messages delivered, the wall time from the first send to the last
message at the sink, msgs/s, the XOAUTH2 logins Dovecot saw, and the token
requests made (oidc-provider's count and exmta's metric) with the cache hits.
Last line (for scripts): ``xoauth2_msgs=.. xoauth2_msgs_per_s=.. token_requests=.. logins=..``
"""
from __future__ import annotations

import argparse
import shutil
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from support.exmta_proc import ExmtaProcess  # noqa: E402
from support.procs import LOOPBACK  # noqa: E402
from support.xoauth2_parts import EXMTA_TOML, Parts  # noqa: E402


def client(port: int, first: int, count: int, errors: list[str], deadline: float) -> None:
    """One LAN device: one connection to exmta, ``count`` messages."""
    try:
        with smtplib.SMTP(LOOPBACK, port, local_hostname="printer.lan", timeout=30) as c:
            for i in range(first, first + count):
                if time.monotonic() > deadline:
                    errors.append("time limit")
                    return
                c.sendmail("scanner@example.test", ["bob@fabrikam.test"],
                           f"Subject: bench {i}\r\nMessage-ID: <b{i}@example.test>\r\n\r\nscan {i}\r\n".encode())
    except (OSError, smtplib.SMTPException) as exc:
        errors.append(f"{exc.__class__.__name__}: {exc}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=1000, help="messages (default 1000)")
    ap.add_argument("-c", type=int, default=4, help="concurrent LAN clients (default 4)")
    ap.add_argument("--per-connection", type=int, default=1,
                    help="exmta's max_messages_per_connection toward Dovecot (default 1: a login per message)")
    ap.add_argument("-t", type=float, default=110.0, help="time limit in seconds (default 110)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="xoauth2-bench-"))
    parts = Parts(tmp / "parts")
    ex: ExmtaProcess | None = None
    try:
        toml = EXMTA_TOML.replace("max_messages_per_connection = 1",
                                  f"max_messages_per_connection = {args.per_connection}")
        toml = toml.replace('protocol_log = "verbose"', 'protocol_log = "off"')
        subst = {"next_hop": parts.tap.next_hop, "ca_file": parts.pki.ca_file, "token_url": parts.oidc.token_url,
                 "client_id": "exmta-app", "credential": 'client_secret = "s3cret-for-exmta-Zq8"',
                 "lifetime": "1h", "metrics_port": parts.metrics_port}
        ex = ExmtaProcess(tmp / "exmta", toml=toml, subst=subst).start()
        deadline = time.monotonic() + args.t
        errors: list[str] = []
        per_client = [args.n // args.c + (1 if i < args.n % args.c else 0) for i in range(args.c)]
        starts = [sum(per_client[:i]) for i in range(args.c)]
        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(ex.port, s, k, errors, deadline), daemon=True)
                   for s, k in zip(starts, per_client)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        while len(parts.sink.messages) < args.n and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        delivered = len(parts.sink.messages)
        logins = sum("Login: user=" in line and "method=XOAUTH2" in line
                     for line in parts.dovecot.log_text().splitlines())
        issued = len(parts.oidc.issued())
        requests = parts.metric("exmta_oauth2_token_requests_total")
        hits = parts.metric("exmta_oauth2_token_cache_hits_total")
        rate = delivered / elapsed if elapsed > 0 else 0.0
        print(f"messages delivered        {delivered} of {args.n} ({args.c} clients, "
              f"{args.per_connection} message(s) per exmta session)")
        print(f"wall time                 {elapsed:.2f} s (first send to last message at the sink)")
        print(f"throughput                {rate:.1f} msgs/s")
        print(f"XOAUTH2 logins (Dovecot)  {logins}")
        print(f"token requests            {issued} issued by the endpoint; exmta counted {requests:.0f}, "
              f"cache hits {hits:.0f}")
        if errors:
            print(f"client errors             {len(errors)}: {errors[:3]}")
        print(f"xoauth2_msgs={delivered} xoauth2_msgs_per_s={rate:.1f} token_requests={issued} logins={logins}")
        return 0 if delivered == args.n and not errors else 1
    finally:
        if ex is not None:
            ex.stop()
        parts.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
