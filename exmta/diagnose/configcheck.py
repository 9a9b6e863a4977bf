"""``exmta diagnose --config``: our own side, from the configuration file.

Each receive connector's certificate(s): the chain in the file complete
and trusted (system roots or ``ca_file``), the names covering the
connector's FQDN, the expiry; each receive connector's listen ports (does
something answer there?); each send connector's smart hosts (reachable,
greeting 220).  Connectors that deliver by MX are diagnosed per domain
(``exmta diagnose DOMAIN``).
"""
from __future__ import annotations

import datetime
import socket
from typing import Any

from cryptography import x509
from OpenSSL import crypto

from exmta.diagnose.findings import Findings
from exmta.tlspolicy.verify import check_names, is_ca, make_store

__all__ = ["diagnose_config"]


def diagnose_config(config: Any, *, ca_file: str | None = None, warn_days: int = 30,
                    timeout: float = 5.0) -> Findings:
    f = Findings(config.source)
    for rc in config.receive:
        if rc.tls is not None:
            for cert in (rc.tls.certificate, *rc.tls.sni):
                names = list(cert.names) or [rc.hostname]
                _certificate(f, f"receive.{rc.name}", cert, names, ca_file, warn_days)
        for listen in rc.listen:
            _listening(f, f"receive.{rc.name}", listen, timeout)
    for sc in config.send:
        if sc.kind != "smtp":
            continue
        if not sc.smarthosts:
            f.ok(f"send.{sc.name}", "delivers by MX: check destinations with `exmta diagnose DOMAIN`")
        for sh in sc.smarthosts:
            _reachable(f, f"send.{sc.name}", sh.host, sh.port, timeout)
    return f


def _certificate(f: Findings, where: str, cert: Any, names: list[str], ca_file: str | None, warn_days: int) -> None:
    check = f"{where} certificate"
    try:
        with open(cert.cert, "rb") as fh:
            data = fh.read()
        if cert.chain:
            with open(cert.chain, "rb") as fh:
                data += b"\n" + fh.read()
        certs = x509.load_pem_x509_certificates(data)
    except (OSError, ValueError) as exc:
        f.error(check, f"{cert.cert}: {exc}", code="cert-file")
        return
    chain = [crypto.X509.from_cryptography(c) for c in certs]
    leaf = certs[0]
    now = datetime.datetime.now(datetime.timezone.utc)
    days = (leaf.not_valid_after_utc - now).days
    if leaf.not_valid_after_utc < now:
        f.error(check, f"{cert.cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d}", "renew it", code="cert-expired")
    elif days < warn_days:
        f.warning(check, f"{cert.cert} expires in {days} day(s)", "renew it now", code="cert-expiring")
    else:
        f.ok(check, f"{cert.cert} valid until {leaf.not_valid_after_utc:%Y-%m-%d}")
    try:
        crypto.X509StoreContext(make_store(ca_file), chain[0], chain=chain[1:]).verify_certificate()
        f.ok(check, f"chain complete and trusted ({len(chain)} certificate(s))")
    except crypto.X509StoreContextError as exc:
        text = str(exc.args[0] if exc.args else exc)
        last = certs[-1]
        if "expired" in text.lower() and leaf.not_valid_after_utc < now:
            pass
        elif "local issuer" in text and not is_ca(last):
            f.error(check, f"{cert.cert}: chain incomplete: the issuer of {last.subject.rfc4514_string()} "
                    f"({last.issuer.rfc4514_string()}) is missing", "append the intermediate certificate(s) to "
                    "the file, or name them in chain =", code="missing-intermediate")
        else:
            f.error(check, f"{cert.cert}: not trusted: {text}", code="untrusted")
    problem = check_names(chain[0], names)
    if problem is None:
        f.ok(check, f"covers {', '.join(names)}")
    else:
        f.error(check, problem.text, f"get a certificate for {names[0]}, or set the connector's hostname",
                code="san-mismatch")


def _endpoint(listen: str) -> tuple[str, int] | None:
    parts = listen.split(":")
    if parts and parts[0] == "haproxy":
        parts = parts[1:]
    if not parts or parts[0] not in ("tcp", "tcp6", "ssl") or len(parts) < 2 or not parts[1].isdigit():
        return None
    host = "::1" if parts[0] == "tcp6" else "127.0.0.1"
    for p in parts[2:]:
        if p.startswith("interface="):
            host = p.split("=", 1)[1] or host
            if host in ("0.0.0.0", ""):
                host = "127.0.0.1"
            elif host == "::":
                host = "::1"
    return host, int(parts[1])


def _listening(f: Findings, where: str, listen: str, timeout: float) -> None:
    ep = _endpoint(listen)
    if ep is None:
        f.ok(f"{where} listen", f"{listen}: not a TCP endpoint, not probed")
        return
    try:
        with socket.create_connection(ep, timeout=timeout):
            pass
        f.ok(f"{where} listen", f"{listen}: something accepts connections on {ep[0]}:{ep[1]}")
    except OSError as exc:
        f.warning(f"{where} listen", f"{listen}: nothing accepts connections on {ep[0]}:{ep[1]} ({exc})",
                  "start exmta (twistd exmta), or check that no firewall blocks the port", code="port-closed")


def _reachable(f: Findings, where: str, host: str, port: int, timeout: float) -> None:
    check = f"{where} next hop"
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            banner = s.recv(512).decode("utf-8", "replace").strip()
    except OSError as exc:
        f.error(check, f"{host}:{port} unreachable: {exc}", "check the smart host's address, port and firewall",
                code="next-hop-unreachable")
        return
    if banner.startswith("220"):
        f.ok(check, f"{host}:{port}: {banner.splitlines()[0]}")
    else:
        f.error(check, f"{host}:{port} greets with {banner[:80]!r}", code="next-hop-refuses")
