"""Reading the abuse limits of a ``[receive.NAME]`` table; called from :mod:`exmta.config.load`.

Header size limits (552 5.3.4 over them) and the refused-recipient limit
with its tarpit (421 4.7.0 past it). Defaults and meaning: docs/limits.rst.
"""
from __future__ import annotations

from typing import Any

from exmta.config import reader
from exmta.config.schema import ReceiveConnectorConfig
from exmta.filters.base import MAX_HEADER_BLOCK

__all__ = ["SERVER_KEYS", "directory_problems", "receive_abuse_kwargs", "server_abuse_kwargs"]

#: the [server] keys read here
SERVER_KEYS = ("filter_threads", "filter_checks_in_flight", "filter_checks_per_client",
               "recipient_directory", "recipient_cache_ttl")


def receive_abuse_kwargs(r: Any, d: ReceiveConnectorConfig) -> dict[str, Any]:
    """The abuse-limit fields of one ``[receive.NAME]`` table."""
    out = {
        "max_header_size": r.get("max_header_size", d.max_header_size, reader.parse_size),
        "max_header_field": r.get("max_header_field", d.max_header_field, reader.parse_size),
        "max_refused_recipients": r.get("max_refused_recipients", d.max_refused_recipients, reader.integer(0)),
        "refused_recipients_tarpit_after": r.get(
            "refused_recipients_tarpit_after", d.refused_recipients_tarpit_after, reader.integer(0)),
        "refused_recipients_tarpit": r.get(
            "refused_recipients_tarpit", d.refused_recipients_tarpit, reader.parse_duration),
        "proxy_header_timeout": r.get("proxy_header_timeout", d.proxy_header_timeout, reader.parse_duration),
        "trusted_proxies": r.get("trusted_proxies", d.trusted_proxies, reader.list_of(reader.cidr)),
    }
    if not 1024 <= out["max_header_size"] <= MAX_HEADER_BLOCK:
        r.error("max_header_size", f"must be between 1KiB and {MAX_HEADER_BLOCK // 1024}KiB "
                "(the part of a message filters see)")
    if not 998 <= out["max_header_field"] <= out["max_header_size"]:
        r.error("max_header_field", "must be at least 998 octets and at most max_header_size")
    if out["proxy_header_timeout"] <= 0:
        r.error("proxy_header_timeout", "must be more than 0")
    if out["refused_recipients_tarpit"] < 0:
        r.error("refused_recipients_tarpit", "must not be negative")
    return out


def server_abuse_kwargs(r: Any, base: Any) -> dict[str, Any]:
    """The filter pool and in-flight bounds of ``[server]``."""
    return {
        "filter_threads": r.get("filter_threads", base.filter_threads, reader.integer(1, 256)),
        "filter_checks_in_flight": r.get("filter_checks_in_flight", base.filter_checks_in_flight, reader.integer(0)),
        "filter_checks_per_client": r.get("filter_checks_per_client", base.filter_checks_per_client, reader.integer(0)),
        "recipient_directory": r.get("recipient_directory", base.recipient_directory, reader.nonempty_string),
        "recipient_cache_ttl": r.get("recipient_cache_ttl", base.recipient_cache_ttl, reader.parse_duration),
    }


def directory_problems(name: str | None, backends: Any) -> list[str]:
    """``[server] recipient_directory`` must name an ``[auth.NAME]`` section of kind ldap."""
    if not name:
        return []
    backend = next((b for b in backends if b.name == name), None)
    if backend is None or backend.kind != "ldap":
        return [f"server.recipient_directory: {name!r} is not an [auth.NAME] section of kind \"ldap\""]
    return []
