"""The XOAUTH2 keys of a send connector, read for :mod:`exmta.config.load`.

``auth = "xoauth2"`` on ``[send.NAME]`` and the ``[send.NAME.oauth2]`` table
(:class:`~exmta.config.schema.OAuth2Config`).  ``check-config`` refuses what
would put a token at risk or could never log in: XOAUTH2 without mandatory,
certificate-validated STARTTLS, a token endpoint over plain http to anything
but loopback, no (or two) client credentials, a certificate whose key does
not match, ``send_as`` without the mailbox it needs.
"""
from __future__ import annotations

import os
from typing import Any

from exmta.config.reader import parse_duration
from exmta.config.reader import Reader as _Reader
from exmta.config.reader import choice as _choice
from exmta.config.reader import nonempty_string as _nonempty_str
from exmta.config.schema import OAuth2Config, SendConnectorConfig

__all__ = ["check_send_auth", "read_send_auth"]


def _mailbox(v: Any) -> str:
    s = _nonempty_str(v)
    local, at, domain = s.rpartition("@")
    if not at or not local or not domain or any(c.isspace() or c in "<>\x01" for c in s):
        raise ValueError(f"{s!r} is not a mailbox address such as relay@contoso.com")
    return s


def _path(value: str | None, source: str) -> str | None:
    """A file name relative to the configuration file's directory (as auth_backend)."""
    if value is None or os.path.isabs(value):
        return value
    base = os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else os.getcwd()
    return os.path.normpath(os.path.join(base, value))


def _read_oauth2(r: _Reader, source: str) -> OAuth2Config:
    from exmta.send.oauth2 import entra_token_endpoint

    d = OAuth2Config(token_endpoint="", client_id="")
    tenant = r.get("tenant", None, _nonempty_str)
    endpoint = r.get("token_endpoint", None, _nonempty_str)
    client_id = r.get("client_id", None, _nonempty_str)
    if client_id is None:
        r.error("client_id", "is required: the application (client) id of the app registration")
    if endpoint is None and tenant is None:
        r.error("token_endpoint", "give token_endpoint or tenant (Entra ID: "
                "https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token)")
    o = OAuth2Config(
        token_endpoint=endpoint or (entra_token_endpoint(tenant) if tenant else ""),
        client_id=client_id or "",
        tenant=tenant,
        scope=r.get("scope", d.scope, _nonempty_str),
        client_secret=r.get("client_secret", None, _nonempty_str),
        client_secret_file=_path(r.get("client_secret_file", None, _nonempty_str), source),
        certificate=_path(r.get("certificate", None, _nonempty_str), source),
        private_key=_path(r.get("private_key", None, _nonempty_str), source),
        send_as=r.get("send_as", d.send_as, _choice("mailbox", "sender")),
        mailbox=r.get("mailbox", None, _mailbox),
        timeout=r.get("timeout", d.timeout, parse_duration),
        refresh_before=r.get("refresh_before", d.refresh_before, parse_duration),
    )
    r.finish()
    return o


def read_send_auth(r: _Reader, source: str = "<string>") -> dict[str, Any]:
    """``auth`` and ``oauth2`` of a SendConnectorConfig; files are relative to the config file ``source``."""
    auth = r.get("auth", None, _choice("xoauth2"))
    oauth2 = _read_oauth2(r.sub("oauth2"), source) if "oauth2" in r.table else None
    return {"auth": auth, "oauth2": oauth2}


def check_send_auth(r: _Reader, c: SendConnectorConfig) -> None:
    """Cross-checks of a send connector's XOAUTH2 settings; problems go to ``r``."""
    from exmta.send.oauth2 import endpoint_problem, load_credential

    if c.oauth2 is not None and c.auth != "xoauth2":
        r.error("oauth2", "is only used with auth = \"xoauth2\"")
    if c.auth != "xoauth2":
        return
    if c.kind != "smtp":
        r.error("auth", "\"xoauth2\" is for type = \"smtp\" connectors")
    if c.oauth2 is None:
        r.error("auth", f"\"xoauth2\" needs a [send.{c.name}.oauth2] table (token_endpoint or tenant, "
                "client_id, and a client secret or certificate)")
        return
    if c.auth_username is not None or c.auth_password is not None:
        r.error("auth_username", "cannot be used with auth = \"xoauth2\" (the token is the credential)")
    # the token is a password for the mailbox: only over a TLS session whose certificate was checked
    if c.tls != "mandatory" or c.tls_auth_level not in ("certificate", "domain"):
        r.error("auth", "\"xoauth2\" needs tls = \"mandatory\" and tls_auth_level = \"domain\" (or "
                f"\"certificate\"): the token must never be sent in clear or to an unverified server "
                f"(now tls = {c.tls!r}, tls_auth_level = {c.tls_auth_level!r})")
    o = c.oauth2
    where = "oauth2.token_endpoint" if o.token_endpoint and "login.microsoftonline.com" not in o.token_endpoint \
        else "oauth2.tenant"
    if o.token_endpoint:
        problem = endpoint_problem(o.token_endpoint)
        if problem:
            r.error(where, problem)
    given = [k for k in ("client_secret", "client_secret_file", "certificate") if getattr(o, k) is not None]
    if len(given) != 1:
        r.error("oauth2", "give exactly one of client_secret, client_secret_file or certificate "
                f"(given: {', '.join(given) or 'none'})")
    elif o.client_id:
        try:
            load_credential(o)
        except ValueError as e:
            r.error(f"oauth2.{given[0]}", str(e))
    if o.private_key is not None and o.certificate is None:
        r.error("oauth2.private_key", "needs certificate")
    if o.mailbox is None:
        r.error("oauth2.mailbox", "is required: the mailbox to send as"
                + (" (used for the null sender of DSNs)" if o.send_as == "sender" else ""))
    if o.timeout <= 0:
        r.error("oauth2.timeout", "must be more than 0")
