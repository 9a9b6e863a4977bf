"""``exmta diagnose HOST[:PORT]``: an SMTP server seen from outside, and its certificate chain.

Connect, banner, EHLO, STARTTLS, then the chain the server sends: order,
completeness (a missing intermediate), trust (the system roots or a CA
file), expiry (and expiry within ``warn_days``), and the names against the
one we would check (the host, or a send connector's ``tls_domain``); the
TLS versions it accepts, and the AUTH mechanisms it offers before and after
TLS.  Everything here blocks (a command-line tool, one host at a time),
bounded by ``timeout`` per step.
"""
from __future__ import annotations

import datetime
import ipaddress
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL, crypto

from exmta.diagnose.findings import Findings
from exmta.tlspolicy.verify import TLSARecord, check_dane, check_names, is_ca, make_store

__all__ = ["ProbeOptions", "ProbeResult", "probe_host"]

_VERSIONS = (("TLS 1.0", SSL.TLS1_VERSION), ("TLS 1.1", SSL.TLS1_1_VERSION), ("TLS 1.2", SSL.TLS1_2_VERSION),
             ("TLS 1.3", SSL.TLS1_3_VERSION))


@dataclass
class ProbeOptions:
    host: str                           # the name we would connect to
    port: int = 25
    address: str | None = None          # connect here instead of resolving ``host``
    name: str | None = None             # the name the certificate must carry (default ``host``)
    ca_file: str | None = None          # roots to validate against (default: the system store)
    helo: str = "diagnose.exmta.invalid"
    timeout: float = 10.0
    warn_days: int = 30
    client_certificate: str | None = None
    client_key: str | None = None
    require_tls: bool = False           # STARTTLS missing is an error, not a warning
    check_versions: bool = True
    tlsa: tuple[TLSARecord, ...] = ()   # DANE records to match against the live chain
    label: str = ""                     # prefix for check names ("mx1.example.net: ")


@dataclass
class ProbeResult:
    findings: Findings
    reachable: bool = False
    tls: bool = False
    chain: list[crypto.X509] = field(default_factory=list)
    capabilities: dict[str, str] = field(default_factory=dict)


class _Lines:
    """Reads SMTP replies from a socket or an OpenSSL connection."""

    def __init__(self, sock: Any, raw: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.raw = raw
        self.timeout = timeout
        self.buffer = b""

    def _recv(self) -> bytes:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                data = self.sock.recv(65536)
            except SSL.WantReadError:
                data = None
            except (BlockingIOError, socket.timeout):
                data = None
            if data is not None:
                if not data:
                    raise ConnectionError("connection closed")
                return data
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply")
            select.select([self.raw], [], [], left)

    def reply(self) -> tuple[int, list[str]]:
        lines: list[str] = []
        while True:
            while b"\n" not in self.buffer:
                self.buffer += self._recv()
                if len(self.buffer) > 65536:
                    raise ValueError("reply too long")
            line, _, self.buffer = self.buffer.partition(b"\n")
            text = line.rstrip(b"\r").decode("utf-8", "replace")
            if len(text) < 3 or not text[:3].isdigit():
                raise ValueError(f"not an SMTP reply: {text[:80]!r}")
            lines.append(text[4:])
            if len(text) == 3 or text[3] == " ":
                return int(text[:3]), lines

    def send(self, line: str) -> None:
        data = line.encode() + b"\r\n"
        while data:
            try:
                n = self.sock.send(data)
            except SSL.WantWriteError:
                select.select([], [self.raw], [], self.timeout)
                continue
            data = data[n:]

    def command(self, line: str) -> tuple[int, list[str]]:
        self.send(line)
        return self.reply()


def _capabilities(lines: list[str]) -> dict[str, str]:
    caps = {}
    for line in lines[1:]:
        key, _, value = line.strip().partition(" ")
        caps[key.upper()] = value
    return caps


def _connect(opts: ProbeOptions) -> socket.socket:
    target = opts.address or opts.host
    return socket.create_connection((target, opts.port), timeout=opts.timeout)


def _tls_context(opts: ProbeOptions, version: int | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)  # the chain is checked afterwards, with reasons
    if version is not None:
        ctx.set_min_proto_version(version)
        ctx.set_max_proto_version(version)
        ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")  # probe old versions even where the system forbids them
    if opts.client_certificate:
        ctx.use_certificate_chain_file(opts.client_certificate)
        ctx.use_privatekey_file(opts.client_key or opts.client_certificate)
    return ctx


def _starttls(opts: ProbeOptions, version: int | None = None) -> tuple[SSL.Connection, socket.socket, _Lines]:
    """A new connection up to a finished handshake (greeting, EHLO, STARTTLS)."""
    raw = _connect(opts)
    try:
        return _starttls_on(opts, raw, version)
    except BaseException:
        raw.close()
        raise


def _starttls_on(opts: ProbeOptions, raw: socket.socket,
                 version: int | None) -> tuple[SSL.Connection, socket.socket, _Lines]:
    lines = _Lines(raw, raw, opts.timeout)
    lines.reply()
    lines.command(f"EHLO {opts.helo}")
    code, text = lines.command("STARTTLS")
    if code != 220:
        raise ConnectionError(f"STARTTLS refused: {code} {' '.join(text)}")
    raw.setblocking(False)
    conn = SSL.Connection(_tls_context(opts, version), raw)
    if not _is_ip(opts.name or opts.host):
        conn.set_tlsext_host_name((opts.name or opts.host).encode("idna"))
    conn.set_connect_state()
    deadline = time.monotonic() + opts.timeout
    while True:
        try:
            conn.do_handshake()
            break
        except SSL.WantReadError:
            select.select([raw], [], [], max(0.0, deadline - time.monotonic()))
        except SSL.WantWriteError:
            select.select([], [raw], [], max(0.0, deadline - time.monotonic()))
        if time.monotonic() > deadline:
            raise TimeoutError("TLS handshake timed out")
    return conn, raw, _Lines(conn, raw, opts.timeout)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


class _Chain:
    """What check_dane needs from a connection: the chain the server sent."""

    def __init__(self, chain: list[crypto.X509]) -> None:
        self.chain = chain

    def get_peer_cert_chain(self) -> list[crypto.X509]:
        return self.chain


def probe_host(opts: ProbeOptions) -> ProbeResult:
    """Run every check against one server; see the module docstring."""
    where = f"{opts.host}:{opts.port}" + (f" [{opts.address}]" if opts.address else "")
    f = Findings(where)
    result = ProbeResult(f)
    p = opts.label
    try:
        raw = _connect(opts)
    except ConnectionRefusedError:
        f.error(f"{p}connect", f"connection refused: port {opts.port} is closed",
                "start the SMTP service, or open the port in the firewall", code="port-closed")
        return result
    except (socket.timeout, TimeoutError):
        f.error(f"{p}connect", f"no answer within {opts.timeout:g}s (filtered by a firewall?)",
                "allow TCP port {opts.port} from the Internet".replace("{opts.port}", str(opts.port)),
                code="port-filtered")
        return result
    except OSError as exc:
        f.error(f"{p}connect", f"cannot connect: {exc}", code="connect-failed")
        return result
    result.reachable = True
    lines = _Lines(raw, raw, opts.timeout)
    try:
        code, text = lines.reply()
        if code != 220:
            f.error(f"{p}banner", f"{code} {' '.join(text)}", "the server refuses sessions", code="banner-refused")
            return result
        f.ok(f"{p}banner", f"{code} {text[0]}")
        code, text = lines.command(f"EHLO {opts.helo}")
        if code != 250:
            f.error(f"{p}EHLO", f"{code} {' '.join(text)}", code="ehlo-refused")
            return result
        caps = result.capabilities = _capabilities(text)
        f.ok(f"{p}EHLO", ", ".join(sorted(caps)) or "no extensions")
        if "AUTH" in caps:
            f.warning(f"{p}AUTH", f"AUTH {caps['AUTH']} offered before TLS",
                      "offer AUTH only after STARTTLS (passwords in clear)", code="auth-before-tls")
        if "STARTTLS" not in caps:
            (f.error if opts.require_tls else f.warning)(
                f"{p}STARTTLS", "not offered: mail to this host travels in clear",
                "enable STARTTLS with a certificate for " + (opts.name or opts.host), code="no-starttls")
            lines.command("QUIT")
            return result
    except (OSError, ValueError, ConnectionError, TimeoutError) as exc:
        f.error(f"{p}SMTP", f"session failed: {exc}", code="smtp-failed")
        return result
    finally:
        raw.close()
    try:
        conn, raw, tls_lines = _starttls(opts)
    except (OSError, SSL.Error, ConnectionError, TimeoutError, ValueError) as exc:
        f.error(f"{p}STARTTLS", f"TLS handshake failed: {exc}", code="tls-handshake")
        return result
    result.tls = True
    try:
        f.ok(f"{p}TLS", f"{conn.get_protocol_version_name()} {conn.get_cipher_name()}")
        result.chain = list(conn.get_peer_cert_chain() or [])
        try:
            code, text = tls_lines.command(f"EHLO {opts.helo}")
            after = _capabilities(text) if code == 250 else {}
            if "AUTH" in after:
                f.ok(f"{p}AUTH", f"after TLS: {after['AUTH']}")
            tls_lines.command("QUIT")
        except (OSError, ValueError, ConnectionError, TimeoutError, SSL.Error):
            pass
    finally:
        raw.close()
    _check_chain(opts, result.chain, f)
    if opts.tlsa:
        problem = check_dane(_Chain(result.chain), opts.tlsa, [opts.name or opts.host])
        if problem is None:
            f.ok(f"{p}DANE", f"the certificate matches the TLSA records ({len(opts.tlsa)})")
        else:
            f.error(f"{p}DANE", problem.text, "publish a TLSA record for the current key (3 1 1 "
                    "<sha256 of the SubjectPublicKeyInfo>), keeping the old one during a rollover",
                    code="tlsa-mismatch")
    if opts.check_versions:
        _check_versions(opts, f)
    return result


def _check_chain(opts: ProbeOptions, chain: list[crypto.X509], f: Findings) -> None:
    p = opts.label
    if not chain:
        f.error(f"{p}certificate", "the server sent no certificate", code="no-certificate")
        return
    certs = [c.to_cryptography() for c in chain]
    leaf = certs[0]
    now = datetime.datetime.now(datetime.timezone.utc)
    name = opts.name or opts.host
    # order: each certificate is issued by the next one
    for i in range(len(certs) - 1):
        if certs[i].issuer != certs[i + 1].subject:
            f.warning(f"{p}chain order", f"certificate {i + 1} ({certs[i].subject.rfc4514_string()}) is not "
                      f"issued by certificate {i + 2} ({certs[i + 1].subject.rfc4514_string()})",
                      "send the leaf first, then each issuer in order", code="chain-order")
            break
    # dates
    if leaf.not_valid_after_utc < now:
        f.error(f"{p}expiry", f"expired on {leaf.not_valid_after_utc:%Y-%m-%d}", "renew the certificate",
                code="cert-expired")
    elif leaf.not_valid_before_utc > now:
        f.error(f"{p}expiry", f"not valid before {leaf.not_valid_before_utc:%Y-%m-%d}", code="cert-not-yet-valid")
    else:
        days = (leaf.not_valid_after_utc - now).days
        if days < opts.warn_days:
            f.warning(f"{p}expiry", f"expires in {days} day(s) ({leaf.not_valid_after_utc:%Y-%m-%d})",
                      "renew the certificate now", code="cert-expiring")
        else:
            f.ok(f"{p}expiry", f"valid until {leaf.not_valid_after_utc:%Y-%m-%d} ({days} days)")
    # trust: the chain as sent, against the roots
    store = make_store(opts.ca_file)
    try:
        crypto.X509StoreContext(store, chain[0], chain=chain[1:]).verify_certificate()
        f.ok(f"{p}chain", f"trusted ({len(chain)} certificate(s) sent)")
    except crypto.X509StoreContextError as exc:
        text = str(exc.args[0] if exc.args else exc)
        last = certs[-1]
        if "expired" in text.lower() and leaf.not_valid_after_utc < now:
            pass  # reported above
        elif "local issuer" in text and not is_ca(last):
            f.error(f"{p}chain", f"incomplete: the server sends {len(chain)} certificate(s) and not the issuer "
                    f"of {last.subject.rfc4514_string()} ({last.issuer.rfc4514_string()})",
                    "configure the certificate file with the intermediate certificate(s) after the leaf",
                    code="missing-intermediate")
        else:
            f.error(f"{p}chain", f"not trusted: {text}",
                    "use a certificate from a CA the senders trust", code="untrusted")
    problem = check_names(chain[0], [name])
    if problem is None:
        f.ok(f"{p}name", f"the certificate covers {name}")
    else:
        f.error(f"{p}name", problem.text, f"add {name} to the certificate's subjectAltName", code="san-mismatch")


def _check_versions(opts: ProbeOptions, f: Findings) -> None:
    p = opts.label
    accepted = []
    for label, version in _VERSIONS:
        try:
            conn, raw, _ = _starttls(opts, version)
            raw.close()
            accepted.append(label)
        except (OSError, SSL.Error, ConnectionError, TimeoutError, ValueError):
            continue
    if not accepted:
        return
    old = [v for v in accepted if v in ("TLS 1.0", "TLS 1.1")]
    if old:
        f.warning(f"{p}TLS versions", f"accepts {', '.join(accepted)}",
                  f"turn off {' and '.join(old)} (RFC 8996)", code="old-tls")
    elif not any(v in ("TLS 1.2", "TLS 1.3") for v in accepted):
        f.error(f"{p}TLS versions", f"accepts only {', '.join(accepted)}", code="no-modern-tls")
    else:
        f.ok(f"{p}TLS versions", ", ".join(accepted))
