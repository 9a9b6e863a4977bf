#!/usr/bin/env python3
"""CPU that transport rules add per relayed message, and in-process receive msgs/s with and without them.

    .venv/bin/python benchmarks/rules_cpu.py [-n 2000] [-t 20] [--sizes 4096,102400]

For each message size, in one process and without sockets (the real
ESMTPServer on a StringTransport, the in-memory store, a Clock):

* ``receive``: msgs/s and CPU ms per message through EHLO/MAIL/RCPT/DATA/250
  with no rules, then with 25 typical rules (mixed sender, recipient,
  subject, header, size and IP conditions; one disclaimer that applies to
  every message; one attachment condition; rules evaluated inline);
* ``rules only``: CPU ms per message of ``TransportRules`` evaluation alone
  (read, parse lazily, 25 rules, body and header edits).

The 100 KiB message carries a 90 KiB PDF attachment so the attachment
condition parses the tree. Each loop is bounded by ``-n`` messages and ``-t``
seconds. The last line is ``key=value`` for scripts; ``rules_cost_pct``
compares the added CPU with exmta's relay CPU per message from
benchmarks/PERFORMANCE.rst (``--relay-ms``: receive worker + main, 1.08 +
0.62 ms at 4 KiB, 1.47 + 0.87 ms at 100 KiB): the share of relay
throughput the rules take when the CPU is the limit.
"""
from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from exmta.config.schema import AcceptedDomain, Config, ReceiveConnectorConfig  # noqa: E402
from exmta.filters import FilterChain  # noqa: E402
from exmta.receive.policy import DefaultReceivePolicy  # noqa: E402
from exmta.rules.hook import TransportRules  # noqa: E402
from exmta.rules.wiring import ConnectorRules  # noqa: E402
from exmta.smtp.server import ESMTPServerFactory  # noqa: E402
from exmta.testing.memstore import MemoryStore  # noqa: E402

RULE = """
[[rule]]
name = "{name}"
[rule.conditions]
{cond}
[rule.actions]
{action}
"""

TYPICAL = [
    ('SenderDomainIs = ["finance.bench.test"]', 'BlindCopyTo = "compliance@bench.test"'),
    ('SentTo = ["payroll@bench.test"]\nFromScope = "NotInOrganization"', 'RejectMessageReasonText = "No"'),
    ('FromScope = "NotInOrganization"', 'PrependSubject = "[EXTERNAL] "'),
    ('RecipientDomainIs = ["partner.example"]', 'RouteMessageOutboundConnector = "partner-tls"'),
    ('SubjectContainsWords = ["lottery", "winner", "bitcoin"]', 'SetSCL = 9'),
    ('SubjectMatchesPatterns = ["^URGENT.*wire transfer"]', 'Quarantine = true'),
    ('HeaderContainsMessageHeader = "X-Mailer"\nHeaderContainsWords = ["BulkMailer"]', 'DeleteMessage = true'),
    ('HeaderMatchesMessageHeader = "X-Campaign"\nHeaderMatchesPatterns = ["^promo-"]',
     'SetHeaderName = "X-B"\nSetHeaderValue = "1"'),
    ('MessageSizeOver = "20 MB"', 'Quarantine = true'),
    ('SenderIpRanges = ["203.0.113.0/24"]', 'RejectMessageReasonText = "Blocked network"'),
    ('SCLOver = 7', 'Quarantine = true'),
    ('From = ["ceo@bench.test"]', 'SetHeaderName = "Importance"\nSetHeaderValue = "High"'),
    ('FromAddressMatchesPatterns = ["^noreply@"]', 'SetHeaderName = "X-Auto"\nSetHeaderValue = "1"'),
    ('RecipientAddressContainsWords = ["legal"]', 'CopyTo = "legal-archive@bench.test"'),
    ('AnyOfToHeader = ["board@bench.test"]', 'BlindCopyTo = "secretary@bench.test"'),
    ('ReceivedOnConnector = ["partners"]', 'SetHeaderName = "X-Partner"\nSetHeaderValue = "1"'),
    ('MessageTypeMatches = "OOF"\nSentToScope = "NotInOrganization"', 'DeleteMessage = true'),
    ('WithImportance = "Low"', 'SetHeaderName = "X-Low"\nSetHeaderValue = "1"'),
    ('SenderIsAuthenticated = true\nSentToScope = "NotInOrganization"', 'LogEventText = "outbound"'),
    ('SentToScope = "InOrganization"\nFromScope = "InOrganization"',
     'SetHeaderName = "X-Internal"\nSetHeaderValue = "1"'),
    ('RecipientDomainIs = ["gov.example"]', 'RouteMessageOutboundRequireTls = true'),
    ('FromAddressContainsWords = ["marketing"]', 'SetHeaderName = "X-Marketing"\nSetHeaderValue = "1"'),
    ('HasNoRecipientInOrganization = true\nSubjectContainsWords = ["confidential"]',
     'GenerateIncidentReport = "dlp@bench.test"'),
    ('AttachmentExtensionMatchesWords = ["exe", "scr", "js", "vbs"]', 'RemoveAttachments = true'),
    ('FromScope = "InOrganization"\nSentToScope = "NotInOrganization"',
     'ApplyHtmlDisclaimerText = "<p>Bench Corp: this message is confidential.</p>"'),
]
assert len(TYPICAL) == 25


def rules_text() -> str:
    return "".join(RULE.format(name=f"rule {i}", cond=c, action=a) for i, (c, a) in enumerate(TYPICAL))


def message(size: int, seq: int) -> bytes:
    head = (f"From: Alice <alice@bench.test>\r\nTo: Bob <bob@dest.example>\r\n"
            f"Subject: quarterly report #{seq}\r\nMessage-ID: <{seq}.{os.getpid()}@bench.test>\r\n"
            f"Date: Mon, 07 Dec 2026 08:00:00 +0000\r\nMIME-Version: 1.0\r\n")
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    if size <= 16 * 1024:
        body = line * max(1, (size - len(head) - 60) // len(line))
        return head.encode() + b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + body
    pdf = b"%PDF-1.4\n" + os.urandom(90 * 1024 * 3 // 4 - 9)
    att = base64.encodebytes(pdf).replace(b"\n", b"\r\n")
    text = line * max(1, (size - len(att) - len(head) - 400) // len(line))
    return (head.encode() + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + text +
            b"--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=\"r.pdf\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + att + b"--b--\r\n")


def make_factory(rules_path: str | None) -> tuple[ESMTPServerFactory, MemoryStore]:
    clock = Clock()
    config = Config(hostname="mx.bench.test", accepted_domains=(AcceptedDomain("bench.test"),))
    rc = ReceiveConnectorConfig(name="default", hostname="mx.bench.test", relay_networks=("127.0.0.0/8",),
                                max_message_size=10_000_000)
    store = MemoryStore(clock)
    factory = ESMTPServerFactory(rc, DefaultReceivePolicy(config.accepted_domain, rc.relay_networks),
                                 FilterChain([], clock), store, clock,
                                 local_domain=lambda d: config.accepted_domain(d) is not None)
    if rules_path:
        rules = TransportRules(rules_path, clock, internal_domain=lambda d: config.accepted_domain(d) is not None,
                               store=store, send_connector_known=None)
        factory.transport_rules = ConnectorRules(rules, factory)
    return factory, store


def receive_loop(factory: ESMTPServerFactory, store: MemoryStore, size: int, n: int,
                 limit: float) -> tuple[int, float, float]:
    addr = IPv4Address("TCP", "127.0.0.1", 40000)
    msgs = [message(size, i) + b".\r\n" for i in range(16)]
    wall0, cpu0 = time.perf_counter(), time.process_time()
    done = 0
    while done < n and time.perf_counter() - wall0 < limit:
        proto = factory.buildProtocol(addr)
        t = StringTransport(peerAddress=addr)
        proto.makeConnection(t)
        proto.dataReceived(b"EHLO c.bench.test\r\nMAIL FROM:<alice@bench.test>\r\n"
                           b"RCPT TO:<bob@dest.example>\r\nDATA\r\n")
        proto.dataReceived(msgs[done % 16])
        if b"250 2.0.0 Ok: queued" not in t.value():
            raise SystemExit(f"not queued: {t.value()[-200:]!r}")
        proto.dataReceived(b"QUIT\r\n")
        done += 1
        if done % 256 == 0:
            store._messages.clear() if hasattr(store, "_messages") else None
    return done, time.perf_counter() - wall0, time.process_time() - cpu0


def rules_only_loop(path: str, size: int, n: int, limit: float) -> tuple[int, float]:
    clock = Clock()
    rules = TransportRules(path, clock, internal_domain=lambda d: d == "bench.test")
    msgs = [message(size, i) for i in range(16)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    done = 0
    while done < n and time.perf_counter() - wall0 < limit:
        ruleset = rules.current()
        d = rules._evaluate(ruleset, msgs[done % 16], {
            "sender": "alice@bench.test", "recipients": ("bob@dest.example",), "trusted": True,
            "connector": "default", "client_ip": "127.0.0.1"})
        if d.content_changed:
            d.apply_to(msgs[done % 16])
        done += 1
    return done, time.process_time() - cpu0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=2000, help="messages per loop (bound)")
    ap.add_argument("-t", type=float, default=20.0, help="seconds per loop (bound)")
    ap.add_argument("--sizes", default="4096,102400")
    ap.add_argument("--relay-ms", default="4096:1.70,102400:2.34",
                    help="exmta relay CPU ms per message by size (PERFORMANCE.rst: worker + main)")
    args = ap.parse_args()
    keys = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rules.toml")
        with open(path, "w") as f:
            f.write(rules_text())
        for size in (int(s) for s in args.sizes.split(",")):
            tag = f"{size // 1024}k"
            f0, s0 = make_factory(None)
            n0, wall0, cpu0 = receive_loop(f0, s0, size, args.n, args.t)
            f1, s1 = make_factory(path)
            n1, wall1, cpu1 = receive_loop(f1, s1, size, args.n, args.t)
            n2, cpu2 = rules_only_loop(path, size, args.n, args.t)
            base_ms, with_ms, rules_ms = cpu0 / n0 * 1e3, cpu1 / n1 * 1e3, cpu2 / n2 * 1e3
            added = with_ms - base_ms
            relay = dict((int(k), float(v)) for k, v in (x.split(":") for x in args.relay_ms.split(",")))
            relay_ms = relay.get(size, max(relay.values()))
            pct = 100.0 * added / (relay_ms + added)
            print(f"{tag}: receive without rules {n0 / wall0:8.1f} msgs/s ({base_ms:.3f} ms CPU/msg); "
                  f"with 25 rules {n1 / wall1:8.1f} msgs/s ({with_ms:.3f} ms CPU/msg); "
                  f"rules alone {rules_ms:.3f} ms CPU/msg; added {added:.3f} ms/msg = {pct:.1f}% of relay "
                  f"throughput at {relay_ms} ms/msg", file=sys.stderr)
            keys += [f"receive_{tag}_msgs_per_s={n0 / wall0:.1f}", f"receive_rules_{tag}_msgs_per_s={n1 / wall1:.1f}",
                     f"rules_{tag}_cpu_ms={rules_ms:.3f}", f"rules_added_{tag}_cpu_ms={added:.3f}",
                     f"rules_cost_{tag}_pct={pct:.1f}"]
    print(" ".join(keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
