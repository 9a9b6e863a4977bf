"""Reading and checking the SMTP AUTH settings; called from :mod:`exmta.config.load`.

Per receive connector: ``auth`` (mechanisms), ``auth_backend``,
``auth_before_tls_networks``, the tarpit and lockout settings and
``accept_any_sender``. Top level: ``[auth.NAME]`` back ends of kind
``users`` (a users file) or ``ldap``. Every problem names its key.
"""
from __future__ import annotations

import ipaddress
import os
from typing import Any
from urllib.parse import urlsplit

from exmta.auth.sasl import MECHANISMS
from exmta.config import reader
from exmta.config.schema import AuthBackendConfig, ReceiveConnectorConfig

__all__ = ["read_auth_backends", "receive_auth_kwargs", "resolve_references"]

_ATTRIBUTE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"


def _mechanism(v: Any) -> str:
    s = reader.nonempty_string(v).upper()
    if s not in MECHANISMS:
        raise ValueError(f"{v!r} is not a supported mechanism ({', '.join(MECHANISMS)})")
    return s


def _attribute(v: Any) -> str:
    s = reader.nonempty_string(v)
    if not s[0].isalpha() or any(c not in _ATTRIBUTE for c in s):
        raise ValueError(f"{s!r} is not an LDAP attribute name")
    return s


def _base(source: str) -> str:
    return os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else os.getcwd()


def _path(value: str, source: str) -> str:
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(_base(source), value))


def receive_auth_kwargs(r: Any, d: ReceiveConnectorConfig) -> dict[str, Any]:
    """The AUTH fields of one ``[receive.NAME]`` table."""
    out = {
        "auth": r.get("auth", d.auth, reader.list_of(_mechanism)),
        "auth_backend": r.get("auth_backend", d.auth_backend, reader.nonempty_string),
        "auth_before_tls_networks": r.get("auth_before_tls_networks", d.auth_before_tls_networks,
                                          reader.list_of(reader.cidr)),
        "auth_tarpit": r.get("auth_tarpit", d.auth_tarpit, reader.parse_duration),
        "auth_lockout_source_failures": r.get("auth_lockout_source_failures", d.auth_lockout_source_failures,
                                              reader.integer(0)),
        "auth_lockout_user_failures": r.get("auth_lockout_user_failures", d.auth_lockout_user_failures,
                                            reader.integer(0)),
        "auth_lockout_window": r.get("auth_lockout_window", d.auth_lockout_window, reader.parse_duration),
        "auth_lockout_duration": r.get("auth_lockout_duration", d.auth_lockout_duration, reader.parse_duration),
        "accept_any_sender": r.get("accept_any_sender", d.accept_any_sender, reader.boolean),
    }
    if len(set(out["auth"])) != len(out["auth"]):
        r.error("auth", "lists a mechanism twice")
    if out["auth"] and not out["auth_backend"]:
        r.error("auth_backend", "is required when auth is set: an [auth.NAME] section or a users file path")
    if out["auth_backend"] and not out["auth"] and not r.table.get("auth"):
        r.error("auth", "is empty although auth_backend is set: list the mechanisms, e.g. [\"PLAIN\", \"LOGIN\"]")
    if out["auth_tarpit"] > 60:
        r.error("auth_tarpit", "more than 60s would hold sessions past client timeouts")
    for key in ("auth_lockout_window", "auth_lockout_duration"):
        if out[key] <= 0:
            r.error(key, "must be positive")
    for net in out["auth_before_tls_networks"]:
        if ipaddress.ip_network(net).prefixlen == 0:
            r.error("auth_before_tls_networks", f"{net} would send every password in clear text; "
                    "list only pinned networks")
    return out


def _read_backend(r: Any, name: str, source: str) -> AuthBackendConfig:
    d = AuthBackendConfig(name=name)
    kind = r.get("kind", "", reader.choice("users", "ldap"))
    if "kind" not in r.table:
        r.error("kind", "is required: \"users\" or \"ldap\"")
    path = r.get("path", None, reader.nonempty_string)
    b = AuthBackendConfig(
        name=name, kind=kind or "users",
        path=_path(path, source) if path else None,
        uri=r.get("uri", None, reader.nonempty_string),
        tls=r.get("tls", d.tls, reader.choice("starttls", "ldaps", "none")),
        ca_file=r.get("ca_file", None, reader.config_path),
        base_dn=r.get("base_dn", d.base_dn, reader.string),
        bind_dn=r.get("bind_dn", None, reader.nonempty_string),
        bind_password=r.get("bind_password", None, reader.string),
        login_attributes=r.get("login_attributes", d.login_attributes, reader.list_of(_attribute)),
        user_filter=r.get("user_filter", d.user_filter, reader.string),
        identity_attributes=r.get("identity_attributes", d.identity_attributes, reader.list_of(_attribute)),
        timeout=r.get("timeout", d.timeout, reader.parse_duration),
    )
    if b.kind == "users":
        if not b.path:
            r.error("path", "is required for kind = \"users\" (create the file with `exmta users add FILE USER`)")
        else:
            _check_users_file(r, b.path)
        for key in ("uri", "base_dn", "bind_dn", "bind_password", "ca_file"):
            if key in r.table:
                r.error(key, "is an LDAP setting; this back end is kind = \"users\"")
    elif b.kind == "ldap":
        _check_ldap(r, b)
    r.finish()
    return b


def _check_users_file(r: Any, path: str) -> None:
    from exmta.auth.users import UsersFile, UsersFileError

    if not os.path.exists(path):
        r.error("path", f"{path!r} does not exist (create it with `exmta users add {path} USER`; relative "
                f"paths are relative to the configuration file's directory)")
        return
    try:
        UsersFile(path).read()
    except UsersFileError as e:
        r.error("path", str(e))


def _check_ldap(r: Any, b: AuthBackendConfig) -> None:
    if not b.uri:
        r.error("uri", "is required for kind = \"ldap\" (ldap://host:389 or ldaps://host:636)")
        return
    parts = urlsplit(b.uri)
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
        r.error("uri", f"{b.uri!r} is not an ldap:// or ldaps:// URL with a host")
        return
    try:
        _ = parts.port  # urlsplit checks the port only when asked
    except ValueError:
        r.error("uri", f"{b.uri!r} has an invalid port")
    if (parts.scheme == "ldaps") != (b.tls == "ldaps"):
        if "tls" in r.table or parts.scheme == "ldaps":
            r.error("tls", "must be \"ldaps\" exactly when the uri is ldaps:// (StartTLS needs ldap://)")
    if b.tls == "none":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = parts.hostname == "localhost"
        if not loopback:
            r.error("tls", "\"none\" would send passwords to the directory in clear text; "
                    "it is allowed only for a directory on loopback")
    if not b.base_dn:
        r.error("base_dn", "is required for kind = \"ldap\" (e.g. \"dc=example,dc=com\")")
    if (b.bind_dn is None) != (b.bind_password is None):
        r.error("bind_dn", "bind_dn and bind_password go together (neither: anonymous lookup)")
    if b.ca_file and not os.path.isfile(b.ca_file):
        r.error("ca_file", f"{b.ca_file!r} does not exist{reader.relative_paths_note()}")
    if not b.login_attributes:
        r.error("login_attributes", "needs at least one attribute")
    if b.user_filter and not (b.user_filter.startswith("(") and b.user_filter.endswith(")")):
        r.error("user_filter", "must be an LDAP filter in parentheses, e.g. \"(objectClass=user)\"")
    if b.timeout <= 0:
        r.error("timeout", "must be positive")


def read_auth_backends(r: Any, source: str) -> tuple[AuthBackendConfig, ...]:
    """Every ``[auth.NAME]`` section."""
    out = []
    for name in list(r.table):
        r.used.add(name)
        out.append(_read_backend(r.sub(name), name, source))
    return tuple(out)


def resolve_references(receive: list[ReceiveConnectorConfig], backends: tuple[AuthBackendConfig, ...],
                       source: str) -> tuple[list[ReceiveConnectorConfig], list[str]]:
    """Check each ``auth_backend``: an [auth.NAME] section, or an existing valid users file.

    Returns the connectors with users file paths made absolute (against the
    configuration file's directory) and the problems found.
    """
    from dataclasses import replace

    from exmta.auth.users import UsersFile, UsersFileError

    names = {b.name for b in backends}
    problems = []
    out = []
    for rc in receive:
        ref = rc.auth_backend
        if not ref or ref in names:
            out.append(rc)
            continue
        path = _path(ref, source)
        out.append(replace(rc, auth_backend=path))
        where = f"receive.{rc.name}.auth_backend"
        if not os.path.exists(path):
            problems.append(f"{where}: no [auth.{ref}] section and no users file {path!r} (relative to the "
                            "configuration file's directory) "
                            f"(sections: {', '.join(sorted(names)) or 'none'}; create a file with "
                            f"`exmta users add {path} USER`)")
            continue
        try:
            UsersFile(path).read()
        except UsersFileError as e:
            problems.append(f"{where}: {e}")
    return out, problems
