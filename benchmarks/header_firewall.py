#!/usr/bin/env python3
"""Cost of the outbound header firewall per delivery: open + read a queued message with and without it.

    .venv/bin/python benchmarks/header_firewall.py [--size 4096] [--count 20000] [--seconds 60]

Writes one message file under a temporary directory (with or without
X-MS-Exchange-Organization-* headers), then opens and reads it in 64 KiB
chunks, as the SMTP client does, ``count`` times per round (bounded by ``seconds``),
directly and through OutboundHeaderFirewall, alternating for ``rounds``
rounds. Prints the best microseconds per delivery of each case and the
difference.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from exmta.model import DeliveryRequest, Envelope, Recipient
from exmta.send.header_firewall import OutboundHeaderFirewall

READ = 64 * 1024


def run(open_content, count: int, seconds: float) -> float:
    deadline = time.monotonic() + seconds
    start = time.perf_counter()
    done = 0
    while done < count and time.monotonic() < deadline:
        with open_content() as f:
            while f.read(READ):
                pass
        done += 1
    return (time.perf_counter() - start) / done * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096, help="body octets (default 4096)")
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--seconds", type=float, default=60.0, help="time limit per case")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; the best of each is printed")
    args = p.parse_args()
    head = (b"Received: from ex1 by mx; Mon, 7 Dec 2026 08:00:00 +0000\r\nFrom: a@contoso.example\r\n"
            b"To: b@fabrikam.example\r\nSubject: benchmark\r\nMessage-ID: <m@contoso.example>\r\n")
    org = b"X-MS-Exchange-Organization-AuthAs: Internal\r\nX-MS-Exchange-Organization-SCL: -1\r\n"
    body = (b"x" * 76 + b"\r\n") * max(1, args.size // 78)
    with tempfile.TemporaryDirectory() as tmp:
        for label, content in (("plain", head + b"\r\n" + body), ("with org headers", head + org + b"\r\n" + body)):
            path = Path(tmp) / "msg"
            path.write_bytes(content)
            env = Envelope(sender="a@contoso.example", recipients=[Recipient("b@fabrikam.example")], queue_id="Q")

            def opener():
                return open(path, "rb", buffering=READ)

            request = DeliveryRequest("Q", env, tuple(env.recipients), opener)
            fw = OutboundHeaderFirewall("internet")
            direct, filtered = [], []
            for _ in range(args.rounds):  # A B A B ..., the best of each: the machine is shared
                direct.append(run(opener, args.count, args.seconds / args.rounds))
                filtered.append(run(lambda: fw.open_filtered(request), args.count, args.seconds / args.rounds))
            direct, filtered = min(direct), min(filtered)
            print(f"{label:18} {len(content):>8} octets: direct {direct:7.1f} us, firewall {filtered:7.1f} us, "
                  f"+{filtered - direct:5.1f} us per delivery")


if __name__ == "__main__":
    main()
