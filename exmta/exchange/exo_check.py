"""``exmta exo check``: will Exchange Online attribute our mail to the right tenant?

Exchange Online is multi-tenant. Mail that arrives through an inbound
connector of type OnPremises is attributed to a tenant by, in this order,
the domain of the TLS certificate the sender presents, the P1 MAIL FROM
domain, then the P1 RCPT TO domain (MC1226222, 2026-02-04). A certificate
whose subject/SAN is not an accepted domain of the tenant, or one
certificate shared by the connectors of several tenants, makes the
attribution wrong or unstable ("a misconfigured connector that works today
may unexpectedly stop working"), and mail is then rejected with
``5.7.64 TenantAttribution`` or treated as external.

For every send connector with a smart host under
``*.mail.protection.outlook.com`` this checks, from the configuration
file and the certificate files alone (no network):

``certificate``  a client certificate is configured (``tls_certificate``);
``validity``     it is within its validity period (warning ``warn_days`` before expiry) and matches its key;
``chain``        it chains to the system's public roots or a CA given with ``--ca-file``;
``domain``       its subject CN or a SAN DNS name is an accepted domain (or a host under one);
``tls``          ``tls = "mandatory"`` with ``tls_auth_level = "domain"`` and
                 ``tls_domain = "mail.protection.outlook.com"``: no plaintext fallback that
                 would send the mail without a certificate, no unauthenticated next hop;
``shared``       one certificate is not used toward two tenants, and one connector does not
                 serve two tenants (the tenant is the smart host's label before
                 ``.mail.protection.outlook.com``, e.g. ``contoso-com``).

Each finding says what to change and cites the Microsoft reference. Exit
status, as monitoring plugins use it: 0 all good, 1 warnings only, 2 at
least one error, 3 the file could not be read.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import ssl
import tomllib
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["EXO_SUFFIX", "Finding", "Report", "check_config_file", "main"]

EXO_SUFFIX = ".mail.protection.outlook.com"
EXO_TLS_DOMAINS = ("mail.protection.outlook.com", "*.mail.protection.outlook.com")
MC_ATTRIBUTION = "MC1226222"
#: where the TLS requirements come from (the Hybrid Configuration Wizard's outbound connector)
HYBRID_TLS = "MC1226222; Exchange hybrid send connector: RequireTLS, TlsAuthLevel DomainValidation, " \
             "TlsDomain mail.protection.outlook.com"

OK, WARNING, ERROR = "ok", "warning", "error"
EXIT = {OK: 0, WARNING: 1, ERROR: 2}
UNKNOWN = 3


@dataclass(frozen=True)
class Finding:
    """One result for one send connector: what is wrong (or fine), what to change, and the source."""

    connector: str
    check: str
    severity: str
    message: str
    fix: str = ""
    reference: str = ""


@dataclass
class Report:
    source: str
    connectors: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def status(self) -> int:
        return max((EXIT[f.severity] for f in self.findings), default=0)

    def add(self, *args: Any, **kw: Any) -> None:
        self.findings.append(Finding(*args, **kw))

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "status": self.status, "connectors": self.connectors,
                "findings": [asdict(f) for f in self.findings]}

    def text(self) -> str:
        if not self.connectors:
            return (f"{self.source}: no send connector has a smart host under *{EXO_SUFFIX}; "
                    "nothing to check\n")
        lines = []
        for f in self.findings:
            label = {OK: "OK", WARNING: "WARNING", ERROR: "ERROR"}[f.severity]
            line = f"{label:7} send.{f.connector} [{f.check}] {f.message}"
            if f.fix:
                line += f"\n        fix: {f.fix}"
            if f.reference:
                line += f"\n        see: {f.reference}"
            lines.append(line)
        counts = {s: sum(1 for f in self.findings if f.severity == s) for s in (ERROR, WARNING)}
        lines.append(f"{self.source}: {len(self.connectors)} connector(s) toward Exchange Online, "
                     f"{counts[ERROR]} error(s), {counts[WARNING]} warning(s)")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- helpers


def _smarthost_names(value: Any) -> list[str]:
    """Host names of a ``smarthosts`` list ("host", "host:port", "[host]:port")."""
    out = []
    for item in value if isinstance(value, list) else []:
        s = str(item).strip()
        if s.startswith("["):
            s = s[1:].partition("]")[0]
        elif s.count(":") == 1:
            s = s.partition(":")[0]
        out.append(s.lower().rstrip("."))
    return out


def tenant_of(host: str) -> str | None:
    """``contoso-com`` for ``contoso-com.mail.protection.outlook.com``; None for other hosts."""
    if not host.endswith(EXO_SUFFIX):
        return None
    label = host[: -len(EXO_SUFFIX)]
    return label or None


def accepted(name: str, domains: list[str]) -> str | None:
    """The accepted domain that covers certificate name ``name`` (itself or a host under it)."""
    base = name[2:] if name.startswith("*.") else name
    for d in domains:
        root = d[2:] if d.startswith("*.") else d
        if base == root or base.endswith("." + root):
            return d
    return None


def _load_pem_certs(path: str) -> list[Any]:
    from cryptography import x509

    with open(path, "rb") as f:
        data = f.read()
    return x509.load_pem_x509_certificates(data) if b"-----BEGIN CERTIFICATE-----" in data else []


def _key_matches(leaf: Any, key_path: str) -> bool | None:
    """Does the key file hold the leaf's key? None when no key can be read there."""
    from cryptography.hazmat.primitives import serialization

    try:
        with open(key_path, "rb") as f:
            data = f.read()
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError):
        return None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == leaf.public_key().public_bytes(der, spki)


def chain_problem(leaf: Any, intermediates: list[Any], ca_files: list[str], use_system: bool = True) -> str | None:
    """Why ``leaf`` does not chain to a trusted root (None when it does).

    Checked at the middle of the leaf's validity period, so an expired
    certificate is reported once, by the validity check, not twice."""
    from OpenSSL import crypto

    store = crypto.X509Store()
    if use_system:
        paths = ssl.get_default_verify_paths()
        cafile = paths.cafile if paths.cafile and os.path.exists(paths.cafile) else None
        capath = paths.capath if paths.capath and os.path.isdir(paths.capath) else None
        if cafile or capath:
            store.load_locations(cafile, capath)
    for path in ca_files:
        for ca in _load_pem_certs(path):
            store.add_cert(crypto.X509.from_cryptography(ca))
    middle = leaf.not_valid_before_utc + (leaf.not_valid_after_utc - leaf.not_valid_before_utc) / 2
    store.set_time(middle.replace(tzinfo=None))
    chain = [crypto.X509.from_cryptography(c) for c in intermediates]
    try:
        crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf), chain).verify_certificate()
    except crypto.X509StoreContextError as e:
        return str(e)
    return None


def fingerprint(leaf: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    return hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()


# ---------------------------------------------------------------- the checks


def _check_connector(report: Report, name: str, table: dict[str, Any], base_dir: str, domains: list[str],
                     ca_files: list[str], use_system: bool, now: datetime.datetime, warn_days: int,
                     certs_seen: dict[str, list[tuple[str, str]]], tenant: str) -> None:
    from exmta.tls.certs import certificate_names

    # --- TLS to Exchange Online
    tls = table.get("tls", "opportunistic")
    level = table.get("tls_auth_level", "encryption_only")
    tls_domain = str(table.get("tls_domain", "") or "").lower()
    tls_ok = True
    if tls != "mandatory":
        tls_ok = False
        report.add(name, "tls", ERROR,
                   f"tls = {tls!r}: the mail can leave without TLS, and then without the client certificate, "
                   "so Exchange Online attributes it by MAIL FROM/RCPT TO domain or rejects it (5.7.64)",
                   'set tls = "mandatory"', HYBRID_TLS)
    if level != "domain" or tls_domain not in EXO_TLS_DOMAINS:
        tls_ok = False
        report.add(name, "tls", ERROR,
                   f"tls_auth_level = {level!r}, tls_domain = {tls_domain or None!r}: the next hop is not "
                   "authenticated as Exchange Online, so the message and the certificate go to whoever answers",
                   'set tls_auth_level = "domain" and tls_domain = "mail.protection.outlook.com"', HYBRID_TLS)
    if tls_ok:
        report.add(name, "tls", OK, "TLS mandatory, Exchange Online's certificate validated as "
                   "mail.protection.outlook.com")

    # --- the client certificate
    cert_path = table.get("tls_certificate")
    if not cert_path:
        report.add(name, "certificate", ERROR,
                   "no client certificate (tls_certificate): Exchange Online cannot attribute the mail by "
                   "certificate and falls back to the MAIL FROM and RCPT TO domains",
                   "set tls_certificate (and tls_key) to a publicly trusted certificate whose subject or SAN "
                   "is one of your accepted domains, and name it in the inbound connector's "
                   "TlsSenderCertificateName", MC_ATTRIBUTION)
        return
    cert_path = str(cert_path)
    key_path = str(table.get("tls_key") or cert_path)
    if not os.path.isabs(cert_path):
        cert_path = os.path.join(base_dir, cert_path)
    if not os.path.isabs(key_path):
        key_path = os.path.join(base_dir, key_path)
    try:
        certs = _load_pem_certs(cert_path)
    except (OSError, ValueError) as e:
        report.add(name, "certificate", ERROR, f"{cert_path}: cannot be read as a PEM certificate: {e}",
                   "point tls_certificate at the PEM certificate (followed by its intermediates)", MC_ATTRIBUTION)
        return
    if not certs:
        report.add(name, "certificate", ERROR, f"{cert_path}: no PEM certificate in the file",
                   "point tls_certificate at the PEM certificate (followed by its intermediates)", MC_ATTRIBUTION)
        return
    leaf, intermediates = certs[0], certs[1:]
    subject = leaf.subject.rfc4514_string()
    report.add(name, "certificate", OK, f"client certificate {subject} ({cert_path})")

    # --- validity and key
    after, before = leaf.not_valid_after_utc, leaf.not_valid_before_utc
    if now > after:
        report.add(name, "validity", ERROR, f"{subject} expired on {after:%Y-%m-%d %H:%M} UTC: Exchange Online "
                   "refuses it, and the mail loses its attribution", "renew the certificate and replace the "
                   "files named by tls_certificate/tls_key (exmta picks them up on reload)", MC_ATTRIBUTION)
    elif now < before:
        report.add(name, "validity", ERROR, f"{subject} is not valid before {before:%Y-%m-%d %H:%M} UTC",
                   "use a certificate that is valid now", MC_ATTRIBUTION)
    elif after - now < datetime.timedelta(days=warn_days):
        days = (after - now).days
        report.add(name, "validity", WARNING, f"{subject} expires in {days} day(s), on {after:%Y-%m-%d} UTC",
                   "renew it before then, with the same subject/SAN (the inbound connector's "
                   "TlsSenderCertificateName keeps matching)", MC_ATTRIBUTION)
    else:
        report.add(name, "validity", OK, f"valid until {after:%Y-%m-%d} UTC")
    matches = _key_matches(leaf, key_path)
    if matches is False:
        report.add(name, "validity", ERROR, f"{key_path} holds a key that does not belong to {subject}",
                   "set tls_key to the certificate's own private key", MC_ATTRIBUTION)
    elif matches is None:
        report.add(name, "validity", ERROR, f"{key_path}: no readable unencrypted PEM private key",
                   "set tls_key to the certificate's private key (PEM, unencrypted, mode 0600)", MC_ATTRIBUTION)

    # --- chain
    problem = chain_problem(leaf, intermediates, ca_files, use_system)
    if problem:
        self_signed = leaf.issuer == leaf.subject
        what = "is self-signed and" if self_signed else "does not chain to a trusted root:"
        report.add(name, "chain", ERROR,
                   f"{subject} {what} {problem}; Exchange Online only accepts certificates from a public CA",
                   "use a certificate from a public certification authority (append its intermediates to the "
                   "tls_certificate file)" + ("" if ca_files else " (in a lab that trusts a private CA: "
                                               "exmta exo check --ca-file CA.pem)"),
                   MC_ATTRIBUTION)
    else:
        report.add(name, "chain", OK, "chains to a trusted root")

    # --- subject/SAN against the accepted domains
    names = list(certificate_names(leaf))
    if not domains:
        report.add(name, "domain", ERROR, "no accepted domains are configured, so the certificate's names "
                   f"({', '.join(names) or 'none'}) cannot be checked",
                   "list the tenant's accepted domains in [accepted_domains] (or give --accepted-domain)",
                   MC_ATTRIBUTION)
    else:
        covered = {n: accepted(n, domains) for n in names}
        good = [n for n, d in covered.items() if d]
        if not good:
            report.add(name, "domain", ERROR,
                       f"none of the certificate's names ({', '.join(names) or 'none'}) is an accepted domain "
                       f"({', '.join(domains)}): Exchange Online attributes the mail by this domain first and "
                       "will not find your tenant",
                       "use a certificate whose subject or SAN is one of your accepted domains (e.g. "
                       f"mail.{domains[0].lstrip('*.')}) and set it as TlsSenderCertificateName on the "
                       "inbound connector", MC_ATTRIBUTION)
        else:
            report.add(name, "domain", OK, f"certificate name {good[0]} is under accepted domain {covered[good[0]]}")
    certs_seen.setdefault(fingerprint(leaf), []).append((name, tenant))


def check_config_file(path: str, *, ca_files: tuple[str, ...] = (), extra_domains: tuple[str, ...] = (),
                      now: datetime.datetime | None = None, warn_days: int = 30,
                      use_system_roots: bool = True) -> Report:
    """Check ``path``; raise OSError / tomllib.TOMLDecodeError when it cannot be read."""
    from exmta.config.load import ConfigError, load_config

    now = now or datetime.datetime.now(datetime.timezone.utc)
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    report = Report(source=path)
    send = raw.get("send", {}) if isinstance(raw.get("send"), dict) else {}
    domains = [str(d).lower().rstrip(".") for d in raw.get("accepted_domains", {}) or {}]
    domains += [d.lower().rstrip(".") for d in extra_domains]
    base_dir = os.getcwd()  # exmta resolves certificate paths from where it is started
    certs_seen: dict[str, list[tuple[str, str]]] = {}
    for name, table in send.items():
        if not isinstance(table, dict):
            continue
        tenants = sorted({t for h in _smarthost_names(table.get("smarthosts")) if (t := tenant_of(h))})
        if not tenants:
            continue
        report.connectors.append(name)
        if len(tenants) > 1:
            report.add(name, "shared", ERROR, f"one connector sends to several tenants ({', '.join(tenants)})",
                       "make one send connector, with its own certificate, per tenant", MC_ATTRIBUTION)
        _check_connector(report, name, table, base_dir, domains, list(ca_files), use_system_roots, now,
                         warn_days, certs_seen, tenants[0])
    for users in certs_seen.values():
        tenants = sorted({t for _, t in users})
        if len(tenants) > 1:
            for connector, _ in users:
                others = ", ".join(f"send.{c}" for c, _ in users if c != connector)
                report.add(connector, "shared", ERROR,
                           f"the same certificate is used toward tenants {', '.join(tenants)} (also by {others})",
                           "give each tenant its own certificate, named in that tenant's inbound connector",
                           MC_ATTRIBUTION)
    if report.connectors:
        try:
            load_config(path)
        except ConfigError as e:
            report.add("*", "config", ERROR, f"check-config refuses the file: {'; '.join(e.problems)}",
                       "fix the configuration (exmta check-config lists every problem)")
    return report


def main(args: Any) -> int:
    """``exmta exo check FILE``: print the report; the exit status is for monitoring."""
    import sys

    try:
        report = check_config_file(args.file, ca_files=tuple(args.ca_file or ()),
                                   extra_domains=tuple(args.accepted_domain or ()), warn_days=args.warn_days)
    except (OSError, tomllib.TOMLDecodeError) as e:
        print(f"UNKNOWN {args.file}: cannot be read: {e}", file=sys.stderr)
        return UNKNOWN
    sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n" if args.json else report.text())
    return report.status
