"""``exmta diagnose DOMAIN``: what senders and receivers will find when they look a domain up.

MX (and null MX), the MX hosts' addresses; reverse DNS of our sending
addresses (forward-confirmed); SPF (syntax, the 10-lookup limit, whether
our addresses pass), DKIM (each selector; for the keys in our config, that
the published key is ours), DMARC (policy, rua authorisation, RFC 7489
7.1); MTA-STS (TXT, the policy fetched as a sender would, each MX against
its patterns); TLS-RPT; and each MX host as ``exmta diagnose HOST`` sees
it, with DANE (TLSA against the live certificate) when a validating
resolver is given.  The SPF, DKIM and DMARC record checks are those of
``exmta dns check`` (exmta.dns.commands).  Blocking, like the rest of the
command line.
"""
from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

from exmta.diagnose.findings import Findings
from exmta.diagnose.host import ProbeOptions, probe_host
from exmta.tlspolicy.mtasts import PolicyError, STSPolicy, parse_policy, parse_txt

__all__ = ["DomainOptions", "diagnose_domain"]


@dataclass
class DomainOptions:
    domain: str
    dns: Any                                   # exmta.dns.AuthDNS (blocking lookups)
    selectors: list[str] = field(default_factory=list)
    sending_ips: list[str] = field(default_factory=list)
    dkim_keys: tuple[Any, ...] = ()            # DKIMKeyConfig of our config: compared with DNS
    smtp_port: int = 25
    https_port: int = 443
    ca_file: str | None = None
    dane_resolver: Any = None                  # exmta.tlspolicy.dane.ValidatingResolver, or None
    helo: str = "diagnose.exmta.invalid"
    timeout: float = 10.0
    warn_days: int = 30
    probe_mx: bool = True
    check_versions: bool = False


def diagnose_domain(opts: DomainOptions) -> Findings:
    domain = opts.domain.lower().rstrip(".")
    f = Findings(domain)
    _record_checks(opts, domain, f)
    mx_hosts = _mx(opts, domain, f)
    _reverse_dns(opts, f)
    _dkim_keys(opts, domain, f)
    _dmarc_rua(opts, domain, f)
    sts = _mta_sts(opts, domain, mx_hosts, f)
    _tls_rpt(opts, domain, f)
    if opts.probe_mx:
        for host, addresses in mx_hosts:
            _probe_mx(opts, host, addresses, sts, f)
    return f


# ---------------------------------------------------------------- SPF, DKIM, DMARC (exmta dns check)

_FIX = {
    "SPF": "publish one v=spf1 record that lists our sending addresses and ends in -all or ~all",
    "DMARC": "publish _dmarc.<domain> TXT \"v=DMARC1; p=quarantine; rua=mailto:...\"",
}


def _record_checks(opts: DomainOptions, domain: str, f: Findings) -> None:
    from exmta.dns.commands import check_domain

    out = io.StringIO()
    check_domain(opts.dns, domain, opts.selectors, opts.sending_ips[0] if opts.sending_ips else None, out)
    for line in out.getvalue().splitlines():
        m = re.match(r"(OK|WARN|ERROR)\s+([^:]+): (.*)$", line)
        if not m or m.group(2) == "MX":
            continue  # MX is diagnosed below, with addresses
        level, check, detail = m.groups()
        code = ""
        if check == "SPF" and re.search(r"lookup", detail, re.I) and level == "ERROR":
            code = "spf-lookup-limit"
        elif check == "SPF":
            code = "spf"
        elif check.startswith("DKIM"):
            code = "dkim"
        elif check == "DMARC":
            code = "dmarc"
        fix = _FIX.get(check.split()[0], "")
        if code == "spf-lookup-limit":
            fix = "flatten includes: at most 10 DNS-querying terms (include, a, mx, ptr, exists, redirect)"
        if level == "OK":
            f.ok(check, detail, code)
        elif level == "WARN":
            f.warning(check, detail, fix, code)
        else:
            f.error(check, detail, fix, code)
    for ip in opts.sending_ips[1:]:
        from exmta.filters.spf import check_spf

        res = check_spf(opts.dns, ip, f"postmaster@{domain}", domain)
        (f.ok if res.result == "pass" else f.error)("SPF", f"mail from {ip}: {res.result}", code="spf-ip")


# ---------------------------------------------------------------- MX and addresses


def _mx(opts: DomainOptions, domain: str, f: Findings) -> list[tuple[str, list[str]]]:
    dns = opts.dns
    try:
        records = dns.lookup(domain, "MX")
    except Exception as exc:
        f.error("MX", f"lookup failed: {exc}", code="mx-lookup")
        return []
    if not records:
        addresses = _addresses(dns, domain)
        if addresses:
            f.warning("MX", f"no MX record: mail goes to {domain} itself ({', '.join(addresses)})",
                      f"publish \"{domain}. MX 10 <mail host>\"", code="no-mx")
            return [(domain, addresses)]
        f.error("MX", "no MX and no address: the domain receives no mail", code="no-mx")
        return []
    hosts = sorted((int(r.preference), r.exchange.to_text(omit_final_dot=True)) for r in records)
    if all(h in ("", ".") for _, h in hosts):
        f.ok("MX", "null MX (RFC 7505): the domain accepts no mail", code="null-mx")
        return []
    f.ok("MX", ", ".join(f"{p} {h}" for p, h in hosts))
    out = []
    for _, host in hosts:
        addresses = _addresses(dns, host)
        if not addresses:
            f.error("MX address", f"{host} has no A or AAAA record", f"publish an address for {host}",
                    code="mx-no-address")
            continue
        bad = [a for a in addresses if not ipaddress.ip_address(a).is_global
               and not ipaddress.ip_address(a).is_loopback]
        if bad:
            f.warning("MX address", f"{host}: {', '.join(bad)} is not a public address", code="mx-private")
        else:
            f.ok("MX address", f"{host}: {', '.join(addresses)}")
        out.append((host, addresses))
    return out


def _addresses(dns: Any, host: str) -> list[str]:
    found = []
    for rdtype in ("A", "AAAA"):
        try:
            found += [r.address for r in dns.lookup(host, rdtype) or ()]
        except Exception:
            continue
    return found


def _reverse_dns(opts: DomainOptions, f: Findings) -> None:
    import dns.reversename

    for ip in opts.sending_ips:
        try:
            ptrs = opts.dns.lookup(dns.reversename.from_address(ip).to_text(omit_final_dot=True), "PTR") or []
        except Exception as exc:
            f.error("reverse DNS", f"{ip}: PTR lookup failed: {exc}", code="ptr")
            continue
        names = [p.target.to_text(omit_final_dot=True) for p in ptrs]
        if not names:
            f.error("reverse DNS", f"{ip} has no PTR record", "ask the owner of the address block for a PTR "
                    "naming this server", code="ptr-missing")
            continue
        confirmed = [n for n in names if ip in _addresses(opts.dns, n)]
        if confirmed:
            f.ok("reverse DNS", f"{ip} -> {confirmed[0]} -> {ip} (forward-confirmed)")
        else:
            f.error("reverse DNS", f"{ip} -> {', '.join(names)}, which does not resolve back to {ip}",
                    "make the PTR name's A/AAAA record point to the address", code="ptr-not-confirmed")


# ---------------------------------------------------------------- DKIM keys of our config


def _our_public_key(key: Any) -> str:
    with open(key.key_file, "rb") as fh:
        private = fh.read()
    if key.algorithm.startswith("rsa"):
        from cryptography.hazmat.primitives import serialization

        pk = serialization.load_pem_private_key(private, password=None)
        der = pk.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(der).decode()
    import nacl.encoding
    import nacl.signing

    signing = nacl.signing.SigningKey(private.strip(), encoder=nacl.encoding.Base64Encoder)
    return signing.verify_key.encode(nacl.encoding.Base64Encoder).decode()


def _dkim_keys(opts: DomainOptions, domain: str, f: Findings) -> None:
    for key in opts.dkim_keys:
        if key.domain != domain:
            continue
        what = f"DKIM {key.selector}"
        try:
            ours = _our_public_key(key)
        except Exception as exc:
            f.error(what, f"our key file {key.key_file} is unusable: {exc}", code="dkim-key-file")
            continue
        records = opts.dns.txt(f"{key.selector}._domainkey.{domain}") or []
        published = None
        for rec in records:
            m = re.search(r"(?:^|;)\s*p\s*=\s*([^;]*)", rec.decode("ascii", "replace"))
            if m:
                published = re.sub(r"\s+", "", m.group(1))
        if published is None:
            f.error(what, f"our key for selector {key.selector} is not published",
                    "publish the record `exmta dkim keygen` printed", code="dkim-key-missing")
        elif published == ours:
            f.ok(what, "the published key is our signing key")
        else:
            f.error(what, "the published key does not match our private key: every signature fails",
                    "publish the public key of " + key.key_file + " (or sign with the key that is published)",
                    code="dkim-key-mismatch")


def _dmarc_rua(opts: DomainOptions, domain: str, f: Findings) -> None:
    """RFC 7489 7.1: a rua outside the domain's organisational domain must be authorised."""
    from exmta.filters.dmarc import lookup_record
    from exmta.filters.psl import org_domain

    try:
        record, _where, problem = lookup_record(opts.dns, domain)
    except Exception:
        return
    if record is None or problem or "rua" not in record:
        return
    ours = org_domain(domain)
    for uri in record["rua"].split(","):
        m = re.match(r"\s*mailto:[^@]+@([^!\s]+)", uri.strip(), re.I)
        if not m:
            continue
        target = m.group(1).lower().rstrip(".")
        if org_domain(target) == ours:
            continue
        name = f"{domain}._report._dmarc.{target}"
        texts = [t.decode("ascii", "replace") for t in (opts.dns.txt(name) or ())]
        if any(t.startswith("v=DMARC1") for t in texts):
            f.ok("DMARC rua", f"{target} accepts reports for {domain} ({name})")
        else:
            f.error("DMARC rua", f"reports go to {target}, which does not authorise them: no v=DMARC1 at {name}",
                    f"ask {target} to publish {name} TXT \"v=DMARC1\"", code="dmarc-rua-unauthorised")


# ---------------------------------------------------------------- MTA-STS and TLS-RPT


def fetch_policy(opts: DomainOptions, domain: str) -> str:
    """The policy text, fetched as a sender does (blocking); PolicyError says why not."""
    host = f"mta-sts.{domain}"
    addresses = _addresses(opts.dns, host)
    if not addresses:
        raise PolicyError(f"{host} has no address", "sts-policy-fetch-error")
    ctx = ssl.create_default_context(cafile=opts.ca_file) if opts.ca_file else ssl.create_default_context()
    try:
        sock = socket.create_connection((addresses[0], opts.https_port), timeout=opts.timeout)
    except OSError as exc:
        raise PolicyError(f"cannot connect to {host}:{opts.https_port}: {exc}", "sts-policy-fetch-error") from None
    try:
        tls = ctx.wrap_socket(sock, server_hostname=host)
    except ssl.SSLError as exc:
        sock.close()
        raise PolicyError(f"TLS with {host} failed: {exc}", "sts-webpki-invalid") from None
    conn = http.client.HTTPConnection(host, opts.https_port, timeout=opts.timeout)
    conn.sock = tls
    try:
        conn.request("GET", "/.well-known/mta-sts.txt", headers={"Host": host, "User-Agent": "exmta diagnose"})
        resp = conn.getresponse()
        body = resp.read(64 * 1024 + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise PolicyError(f"HTTPS request to {host} failed: {exc}", "sts-policy-fetch-error") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise PolicyError(f"{host} answered HTTP {resp.status}", "sts-policy-fetch-error")
    if not (resp.getheader("content-type") or "").lower().startswith("text/plain"):
        raise PolicyError(f"{host} serves the policy as {resp.getheader('content-type')}, not text/plain")
    if len(body) > 64 * 1024:
        raise PolicyError("the policy is larger than 64 KiB")
    return body.decode("utf-8", "replace")


def _mta_sts(opts: DomainOptions, domain: str, mx_hosts: list[tuple[str, list[str]]],
             f: Findings) -> STSPolicy | None:
    texts = [t.decode("utf-8", "replace") for t in (opts.dns.txt(f"_mta-sts.{domain}") or ())]
    try:
        policy_id = parse_txt(texts)
    except PolicyError as exc:
        f.error("MTA-STS", f"_mta-sts.{domain}: {exc}", "publish one \"v=STSv1; id=<new id>\" record",
                code="sts-txt")
        return None
    if policy_id is None:
        f.warning("MTA-STS", "no policy (_mta-sts TXT): senders cannot require TLS to this domain",
                  "publish an MTA-STS policy (RFC 8461), or DANE", code="sts-none")
        return None
    try:
        policy = parse_policy(fetch_policy(opts, domain), domain, policy_id, 0.0)
    except PolicyError as exc:
        f.error("MTA-STS", f"TXT id {policy_id}, but the policy cannot be used: {exc}",
                f"serve https://mta-sts.{domain}/.well-known/mta-sts.txt with a valid certificate", code=exc.kind)
        return None
    f.ok("MTA-STS", f"mode {policy.mode}, mx {', '.join(policy.mx) or '-'}, max_age {policy.max_age}")
    if policy.mode != "none":
        for host, _ in mx_hosts:
            if policy.matches(host):
                f.ok("MTA-STS MX", f"{host} matches the policy")
            else:
                (f.error if policy.mode == "enforce" else f.warning)(
                    "MTA-STS MX", f"{host} matches none of mx: {', '.join(policy.mx)}: senders that enforce "
                    "the policy will not deliver to it", f"add \"mx: {host}\" to the policy and change the TXT id",
                    code="sts-mx-mismatch")
    return policy


def _tls_rpt(opts: DomainOptions, domain: str, f: Findings) -> None:
    texts = [t.decode("utf-8", "replace") for t in (opts.dns.txt(f"_smtp._tls.{domain}") or ())]
    records = [t for t in texts if t.startswith("v=TLSRPTv1")]
    if not records:
        f.warning("TLS-RPT", "no _smtp._tls record: you get no reports of failed TLS to your domain",
                  f"publish _smtp._tls.{domain} TXT \"v=TLSRPTv1; rua=mailto:tlsrpt@{domain}\"", code="tlsrpt-none")
    elif len(records) > 1:
        f.error("TLS-RPT", "more than one v=TLSRPTv1 record (RFC 8460 3: ignored)", code="tlsrpt-many")
    elif not re.search(r"rua=(mailto:|https:)", records[0]):
        f.error("TLS-RPT", f"no usable rua= in {records[0]!r}", code="tlsrpt-rua")
    else:
        f.ok("TLS-RPT", records[0])


def _probe_mx(opts: DomainOptions, host: str, addresses: list[str], sts: STSPolicy | None, f: Findings) -> None:
    tlsa = ()
    if opts.dane_resolver is not None:
        from exmta.tlspolicy.dane import tlsa_name

        answer = opts.dane_resolver.query_blocking(tlsa_name(host), "TLSA")
        if answer.status == "bogus":
            f.error(f"{host}: DANE", f"TLSA lookup failed DNSSEC validation: {answer.text}",
                    "re-sign the zone; senders using DANE will not deliver", code="tlsa-bogus")
        elif answer.status == "secure" and answer.records:
            tlsa = answer.tlsa
        elif answer.records:
            f.warning(f"{host}: DANE", "TLSA records are not DNSSEC-signed: senders ignore them", code="tlsa-insecure")
    require = bool(tlsa) or (sts is not None and sts.mode == "enforce")
    probe = probe_host(ProbeOptions(host, opts.smtp_port, address=addresses[0], ca_file=opts.ca_file,
                                    helo=opts.helo, timeout=opts.timeout, warn_days=opts.warn_days,
                                    require_tls=require, check_versions=opts.check_versions, tlsa=tuple(tlsa),
                                    label=f"{host}: "))
    f.extend(probe.findings)
