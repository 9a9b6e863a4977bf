"""The TLS keys of receive and send connectors, read for :mod:`exmta.config.load`.

``[receive.NAME.tls]`` (with ``[[receive.NAME.tls.sni]]`` entries) and
``require_tls`` on the connector; ``tls_auth_level``, ``tls_domain``,
``tls_ca_file``, ``tls_certificate`` and ``tls_key`` on send connectors.
Certificate files are read and checked here, so ``exmta check-config``
refuses an expired, not yet valid or key-mismatched certificate with a
message that names the key and the file.
"""
from __future__ import annotations

import datetime
from typing import Any

from exmta.config.reader import config_path, parse_duration, relative_paths_note
from exmta.config.reader import Reader as _Reader
from exmta.config.reader import boolean as _bool
from exmta.config.reader import choice as _choice
from exmta.config.reader import cidr as _cidr
from exmta.config.reader import domain as _domain
from exmta.config.reader import list_of as _list_of
from exmta.config.reader import nonempty_string as _nonempty_str
from exmta.config.schema import ReceiveTLSConfig, SendConnectorConfig, TLSCertificateConfig
from exmta.tls.certs import CertificateError, load_certificate

__all__ = ["check_send_tls", "read_receive_tls", "read_require_tls", "read_send_tls", "receive_tls_kwargs"]

AUTH_LEVELS = ("encryption_only", "certificate", "domain")


def _ciphers(v: Any) -> str:
    from OpenSSL import SSL

    s = _nonempty_str(v)
    try:
        SSL.Context(SSL.TLS_METHOD).set_cipher_list(s.encode())
    except SSL.Error:
        raise ValueError(f"{s!r} is not an OpenSSL cipher list that selects any cipher") from None
    return s


def _check_ca_file(r: _Reader, name: str, path: str | None) -> None:
    if path is None:
        return
    from cryptography import x509

    try:
        with open(path, "rb") as f:
            data = f.read()
        if not x509.load_pem_x509_certificates(data):
            raise ValueError("no certificate in the file")
    except FileNotFoundError:
        r.error(name, f"{path}: the CA file does not exist{relative_paths_note()}")
    except OSError as e:
        r.error(name, f"{path}: the CA file cannot be read: {e.strerror}")
    except ValueError as e:
        r.error(name, f"{path}: not a PEM CA bundle: {e}")


def _check_certificate(r: _Reader, name: str, cert: TLSCertificateConfig,
                       now: datetime.datetime | None) -> None:
    try:
        load_certificate(cert.cert, cert.key, cert.chain, now=now)
    except CertificateError as e:
        missing = "file does not exist" in str(e) or "file cannot be read" in str(e)
        r.error(name, str(e) + (relative_paths_note() if missing else ""))


def _read_certificate(r: _Reader, now: datetime.datetime | None, sni: bool) -> TLSCertificateConfig | None:
    cert = r.get("cert", None, config_path)
    key = r.get("key", None, config_path)
    chain = r.get("chain", None, config_path)
    names: tuple[str, ...] = ()
    if sni:
        names = r.get("names", (), _list_of(_domain))
    if cert is None:
        r.error("cert", "is required: a PEM file with the certificate (and its chain)")
        return None
    c = TLSCertificateConfig(cert=cert, key=key, chain=chain, names=names)
    _check_certificate(r, "cert", c, now)
    return c


def read_receive_tls(r: _Reader, now: datetime.datetime | None = None) -> ReceiveTLSConfig | None:
    """``[receive.NAME.tls]`` or None when the connector has no TLS."""
    r.used.add("tls")
    if "tls" not in r.table:
        return None
    t = r.sub("tls")
    d = ReceiveTLSConfig(certificate=TLSCertificateConfig(cert=""))
    certificate = _read_certificate(t, now, sni=False)
    sni: list[TLSCertificateConfig] = []
    t.used.add("sni")
    entries = t.table.get("sni", [])
    if not isinstance(entries, list):
        t.error("sni", "must be an array of tables ([[receive.NAME.tls.sni]])")
        entries = []
    for i, entry in enumerate(entries):
        s = _Reader(t.problems, f"{t.key('sni')}[{i + 1}]", entry)
        c = _read_certificate(s, now, sni=True)
        s.finish()
        if c is not None:
            sni.append(c)
    cfg = ReceiveTLSConfig(
        certificate=certificate or d.certificate,
        sni=tuple(sni),
        implicit=t.get("implicit", d.implicit, _bool),
        min_version=t.get("min_version", d.min_version, _choice("1.2", "1.3")),
        ciphers=t.get("ciphers", d.ciphers, _ciphers),
        legacy_networks=t.get("legacy_networks", d.legacy_networks, _list_of(_cidr)),
        plaintext_networks=t.get("plaintext_networks", d.plaintext_networks, _list_of(_cidr)),
        client_certificate=t.get("client_certificate", d.client_certificate,
                                 _choice("none", "request", "require")),
        client_ca=t.get("client_ca", d.client_ca, config_path),
        client_names=t.get("client_names", d.client_names, _list_of(_domain)),
        reload_interval=t.get("reload_interval", d.reload_interval, parse_duration),
    )
    _check_ca_file(t, "client_ca", cfg.client_ca)
    if cfg.client_certificate != "none" and not cfg.client_names and not cfg.client_ca:
        t.error("client_names", f"client_certificate = \"{cfg.client_certificate}\" needs client_names or a "
                "private client_ca (any publicly trusted certificate would pass otherwise)")
    if cfg.client_certificate == "none" and (cfg.client_names or cfg.client_ca):
        t.error("client_certificate", "is \"none\": client_names and client_ca need \"request\" or \"require\"")
    t.finish()
    return cfg


def read_require_tls(r: _Reader, tls: ReceiveTLSConfig | None) -> bool:
    """``require_tls`` of a receive connector (needs a ``[receive.NAME.tls]`` table)."""
    require = r.get("require_tls", False, _bool)
    if require and tls is None and "tls" not in r.table:
        r.error("require_tls", "needs a [receive.NAME.tls] section with a certificate")
    return require


def read_send_tls(r: _Reader) -> dict[str, Any]:
    """The TLS keyword arguments of a SendConnectorConfig."""
    d = SendConnectorConfig(name="")
    return {
        "tls_auth_level": r.get("tls_auth_level", d.tls_auth_level, _choice(*AUTH_LEVELS)),
        "tls_domain": r.get("tls_domain", d.tls_domain, _domain),
        "tls_ca_file": r.get("tls_ca_file", d.tls_ca_file, config_path),
        "tls_certificate": r.get("tls_certificate", d.tls_certificate, config_path),
        "tls_key": r.get("tls_key", d.tls_key, config_path),
    }


def check_send_tls(r: _Reader, c: SendConnectorConfig, now: datetime.datetime | None = None) -> None:
    """Cross-checks of a send connector's TLS settings; problems go to ``r``."""
    if c.tls_auth_level != "encryption_only" and c.tls != "mandatory":
        r.error("tls_auth_level", f"{c.tls_auth_level!r} needs tls = \"mandatory\" (a validation that can "
                "fall back to plaintext protects nothing; Exchange: TlsAuthLevel needs RequireTLS)")
    if c.tls_domain and c.tls_auth_level != "domain":
        r.error("tls_domain", "is only used with tls_auth_level = \"domain\"")
    if c.tls == "none" and (c.tls_certificate or c.tls_ca_file):
        r.error("tls", "is \"none\": tls_certificate and tls_ca_file would never be used")
    if c.tls_key and not c.tls_certificate:
        r.error("tls_key", "needs tls_certificate")
    _check_ca_file(r, "tls_ca_file", c.tls_ca_file)
    if c.tls_certificate:
        try:
            load_certificate(c.tls_certificate, c.tls_key, now=now)
        except CertificateError as e:
            r.error("tls_certificate", str(e))


def receive_tls_kwargs(r: _Reader) -> dict[str, Any]:
    """``tls`` and ``require_tls`` of a ReceiveConnectorConfig."""
    tls = read_receive_tls(r)
    return {"tls": tls, "require_tls": read_require_tls(r, tls)}
