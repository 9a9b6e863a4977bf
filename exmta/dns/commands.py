"""``exmta dkim keygen``, ``exmta dns check DOMAIN`` and ``exmta psl refresh``.

``dns check`` reads a domain's published SPF, DKIM selector and DMARC
records (and MX) through the same code the filters use, and prints one
line per finding: ``OK``, ``WARN`` (works, but should be fixed) or
``ERROR`` (receivers will fail it); the exit status is 1 when there is an
error, 0 otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, TextIO

from exmta.filemodes import replace_file

__all__ = ["add_commands", "check_domain"]


def add_commands(sub: Any) -> None:
    """Register the subcommands on the ``exmta`` parser's subparsers object."""
    dkim = sub.add_parser("dkim", help="DKIM signing keys")
    dsub = dkim.add_subparsers(dest="dkim_command", metavar="ACTION", required=True)
    keygen = dsub.add_parser("keygen", help="generate a key pair and print the TXT record to publish")
    keygen.add_argument("--domain", required=True, help="the signing domain (d=)")
    keygen.add_argument("--selector", required=True, help="the selector (s=), e.g. s2026")
    keygen.add_argument("--algorithm", default="rsa-sha256", choices=("rsa-sha256", "ed25519-sha256"))
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument("--out", help="private key file (default ./DOMAIN.SELECTOR.pem or .key); mode 0600")
    keygen.add_argument("--data", help="the server's data_dir: write DATA/dkim/SELECTOR.pem (or .key), where "
                        "key_file = \"dkim/SELECTOR.pem\" finds it")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key file")
    keygen.set_defaults(func=_keygen)

    dns = sub.add_parser("dns", help="check published DNS records")
    nsub = dns.add_subparsers(dest="dns_command", metavar="ACTION", required=True)
    check = nsub.add_parser("check", help="check a domain's SPF, DKIM selector(s), DMARC and MX records")
    check.add_argument("domain")
    check.add_argument("--selector", action="append", default=[], help="DKIM selector to check (repeatable)")
    check.add_argument("--dns-server", action="append", default=[], metavar="IP[:PORT]",
                       help="ask this server (repeatable; default: /etc/resolv.conf)")
    check.add_argument("--ip", help="also evaluate SPF for mail from this client address")
    check.add_argument("--timeout", type=float, default=5.0)
    check.set_defaults(func=_dns_check)

    psl = sub.add_parser("psl", help="the public suffix list used for DMARC organisational domains")
    psub = psl.add_subparsers(dest="psl_command", metavar="ACTION", required=True)
    refresh = psub.add_parser("refresh", help="download a fresh list into the data directory (only when asked)")
    refresh.add_argument("--data", required=True, help="the server's data_dir")
    refresh.add_argument("--url", default=None)
    refresh.set_defaults(func=_psl_refresh)


# ---------------------------------------------------------------- keygen


def _keygen(args: argparse.Namespace) -> int:
    from exmta.send.dkim_sign import generate_key, txt_record

    domain = args.domain.lower().rstrip(".")
    if not re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)+", domain) or not re.fullmatch(r"[A-Za-z0-9-]+", args.selector):
        print("exmta dkim keygen: --domain must be a domain name and --selector a DNS label", file=sys.stderr)
        return 2
    suffix = "pem" if args.algorithm.startswith("rsa") else "key"
    key_file = None  # what [dkim] keys should say, when not the absolute path
    if args.out:
        out = args.out
    elif args.data:
        key_file = f"dkim/{args.selector}.{suffix}"  # relative to data_dir
        out = os.path.join(args.data, key_file)
    else:
        out = f"{domain}.{args.selector}.{suffix}"
    if os.path.exists(out) and not args.force:
        print(f"exmta dkim keygen: {out} exists (use --force to replace it)", file=sys.stderr)
        return 1
    try:
        private, public = generate_key(args.algorithm, args.bits)
    except ValueError as e:
        print(f"exmta dkim keygen: {e}", file=sys.stderr)
        return 2
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), mode=0o700, exist_ok=True)
    try:
        write_private_file(out, private)
    except OSError as e:
        print(f"exmta dkim keygen: cannot write {out}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"; private key written to {out} (keep it secret; mode 0600)")
    print(f'; config: {{ domain = "{domain}", selector = "{args.selector}", '
          f'algorithm = "{args.algorithm}", key_file = "{key_file or os.path.abspath(out)}" }}')
    print(txt_record(args.selector, domain, args.algorithm, public))
    return 0


def write_private_file(path: str, data: bytes) -> None:
    """Write ``data`` to a new 0600 file beside ``path``, fsync it and rename it over ``path``.

    Never rewrites an existing file in place: whoever held the old file open
    (it may have been readable by others) keeps the old bytes, and a crash
    leaves the old key or the new one, never half of one.
    """
    replace_file(path, data, 0o600)


# ---------------------------------------------------------------- dns check


class Report:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.errors = 0
        self.warnings = 0

    def ok(self, what: str, text: str) -> None:
        print(f"OK    {what}: {text}", file=self.out)

    def warn(self, what: str, text: str) -> None:
        self.warnings += 1
        print(f"WARN  {what}: {text}", file=self.out)

    def error(self, what: str, text: str) -> None:
        self.errors += 1
        print(f"ERROR {what}: {text}", file=self.out)


def check_domain(dns: Any, domain: str, selectors: list[str], ip: str | None, out: TextIO) -> Report:
    """Check the records of ``domain`` (blocking); findings go to ``out``."""
    from exmta.dns import OversizeAnswer, TempDNSError

    domain = domain.lower().rstrip(".")
    r = Report(out)
    for name, check in (("MX", _check_mx), ("SPF", _check_spf), ("DMARC", _check_dmarc)):
        try:
            check(dns, domain, r, ip) if name == "SPF" else check(dns, domain, r)
        except TempDNSError as e:
            r.error(name, f"DNS lookup failed (temperror at receivers): {e}")
        except OversizeAnswer as e:
            r.error(name, str(e))
    for selector in selectors:
        try:
            _check_dkim(dns, domain, selector, r)
        except TempDNSError as e:
            r.error(f"DKIM {selector}", f"DNS lookup failed (temperror at receivers): {e}")
        except OversizeAnswer as e:
            r.error(f"DKIM {selector}", str(e))
    if not selectors:
        r.warn("DKIM", "no --selector given: DKIM keys not checked")
    return r


def _check_mx(dns: Any, domain: str, r: Report) -> None:
    records = dns.lookup(domain, "MX")
    if not records:
        if dns.lookup(domain, "A") or dns.lookup(domain, "AAAA"):
            r.warn("MX", f"no MX record; mail goes to the address of {domain} (implicit MX)")
        else:
            r.warn("MX", "no MX and no address: the domain receives no mail (bounces cannot reach it)")
        return
    hosts = sorted((int(x.preference), x.exchange.to_text(omit_final_dot=True)) for x in records)
    if hosts == [(0, "")] or all(h in ("", ".") for _, h in hosts):
        r.ok("MX", "null MX (RFC 7505): the domain accepts no mail")
        return
    r.ok("MX", ", ".join(f"{p} {h}" for p, h in hosts))


def _check_spf(dns: Any, domain: str, r: Report, ip: str | None) -> None:
    import spf

    from exmta.dns import using_spf_dns
    from exmta.filters.spf import check_spf

    texts = [t.decode("utf-8", "replace") for t in dns.txt(domain) or ()]
    records = [t for t in texts if re.match(r"v=spf1(\s|$)", t, re.IGNORECASE)]
    if not records:
        r.error("SPF", f"no SPF record at {domain} (receivers get spf=none; DMARC then needs DKIM)")
        return
    if len(records) > 1:
        r.error("SPF", f"{len(records)} SPF records at {domain}: receivers give permerror (publish one)")
        return
    record = records[0]
    # evaluate against an address that matches nothing: walks every include/redirect and counts lookups
    q = spf.query(i="192.0.2.255", s=f"postmaster@{domain}", h=domain, timeout=dns.timeout, querytime=20)
    with using_spf_dns(dns):
        try:
            result, _, explanation = q.check()
        except (spf.TempError, spf.PermError) as e:
            result, explanation = ("temperror" if isinstance(e, spf.TempError) else "permerror"), str(e)
    if result == "permerror":
        r.error("SPF", f"{record!r} is broken: {explanation}")
    elif result == "temperror":
        r.error("SPF", f"{record!r}: lookups failed: {explanation}")
    else:
        lookups = getattr(q, "lookups", 0)
        r.ok("SPF", f"{record!r} ({lookups} of 10 DNS lookups)")
        if lookups > 8:
            r.warn("SPF", f"{lookups} DNS-querying terms: close to the limit of 10")
        if re.search(r"(^|\s)\+?all(\s|$)", record):
            r.error("SPF", "ends with +all: every host on the Internet may send as this domain")
        elif re.search(r"(^|\s)\?all(\s|$)", record) or not re.search(r"[-~?+]?all(\s|$)|redirect=", record):
            r.warn("SPF", "no -all or ~all: mail from other hosts is only neutral")
        if re.search(r"(^|\s)[-~?+]?ptr[:\s]|(^|\s)[-~?+]?ptr$", record):
            r.warn("SPF", "uses ptr (RFC 7208 5.5: do not use)")
    if ip:
        res = check_spf(dns, ip, f"postmaster@{domain}", domain)
        line = f"mail from {ip}: {res.result} ({res.explanation})"
        (r.ok if res.result == "pass" else r.warn)("SPF", line)


def _check_dkim(dns: Any, domain: str, selector: str, r: Report) -> None:
    import dkim

    name = f"{selector}._domainkey.{domain}"
    what = f"DKIM {selector}"
    records = dns.txt(name)
    if not records:
        r.error(what, f"no TXT record at {name}")
        return
    if len(records) > 1:
        r.error(what, f"{len(records)} TXT records at {name} (verifiers use one at random)")
        return
    try:
        _pk, keysize, ktag, _ = dkim.evaluate_pk(name.encode(), records[0])
    except Exception as e:  # dkimpy raises KeyFormatError, binascii.Error, ValueError...
        r.error(what, f"key record unusable: {e}")
        return
    kind = ktag.decode() if isinstance(ktag, bytes) else str(ktag)
    if kind == "rsa" and keysize < 1024:
        r.error(what, f"RSA key of {keysize} bits: verifiers refuse keys under 1024 bits (RFC 8301)")
    elif kind == "rsa" and keysize < 2048:
        r.warn(what, f"RSA key of {keysize} bits: use 2048")
    else:
        r.ok(what, f"{kind} key" + (f" of {keysize} bits" if kind == "rsa" else ""))
    text = records[0].decode("ascii", "replace")
    if re.search(r"(^|;)\s*t\s*=\s*[^;]*y", text):
        r.warn(what, "t=y: testing mode, verifiers may treat signatures as unsigned")


def _check_dmarc(dns: Any, domain: str, r: Report) -> None:
    from exmta.filters.dmarc import lookup_record
    from exmta.filters.psl import org_domain

    record, where, problem = lookup_record(dns, domain)
    if problem:
        r.error("DMARC", problem)
        return
    if record is None:
        r.error("DMARC", f"no DMARC record at _dmarc.{domain}" + (
            f" or _dmarc.{org_domain(domain)}" if org_domain(domain) != domain else "")
            + " (spoofed mail gets no policy)")
        return
    policy = record.sp if where != domain else record.p
    source = f"_dmarc.{where}" + (" (organisational domain)" if where != domain else "")
    r.ok("DMARC", f"{source}: p={record.p}" + (f" sp={record['sp']}" if "sp" in record else "")
         + f" pct={record.pct} adkim={record.adkim} aspf={record.aspf}")
    if policy == "none":
        r.warn("DMARC", "policy none: failing mail is only reported, not refused or quarantined")
    if record.pct < 100:
        r.warn("DMARC", f"pct={record.pct}: the policy applies to {record.pct}% of failing mail")
    if "rua" not in record:
        r.warn("DMARC", "no rua=: you receive no aggregate reports")
    else:
        for uri in record["rua"].split(","):
            if not uri.strip().lower().startswith("mailto:"):
                r.error("DMARC", f"rua {uri.strip()!r} is not a mailto: URI")


def _dns_check(args: argparse.Namespace) -> int:
    from types import SimpleNamespace

    from exmta.dns import auth_dns_from_config

    try:
        dns = auth_dns_from_config({"dns_servers": args.dns_server, "dns_timeout": args.timeout},
                                   SimpleNamespace(reactor=None, threadpool=None))
    except ValueError as e:
        print(f"exmta dns check: {e}", file=sys.stderr)
        return 2
    report = check_domain(dns, args.domain, args.selector, args.ip, sys.stdout)
    print(f"{report.errors} error(s), {report.warnings} warning(s)")
    return 1 if report.errors else 0


def _psl_refresh(args: argparse.Namespace) -> int:
    from exmta.filters import psl

    try:
        path = psl.refresh(args.data, args.url or psl.PSL_URL)
    except (OSError, ValueError) as e:
        print(f"exmta psl refresh: {e}", file=sys.stderr)
        return 1
    print(f"public suffix list written to {path}; restart exmta to use it")
    return 0
