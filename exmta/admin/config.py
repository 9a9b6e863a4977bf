"""Config keys of operations: ``[logs]``, ``[admin]`` and each connector's ``protocol_log``.

The section readers of these keys (with :mod:`exmta.config.reader`), for :mod:`exmta.config.load`.
"""
from __future__ import annotations

from typing import Any

from exmta.config.reader import config_path, endpoints, parse_duration, parse_size
from exmta.config.reader import Reader as _Reader
from exmta.config.reader import boolean as _bool
from exmta.config.reader import choice as _choice
from exmta.config.reader import cidr as _cidr
from exmta.config.reader import list_of as _list_of
from exmta.config.schema import AdminConfig, LogsConfig

PROTOCOL_LOG_LEVELS = ("off", "verbose")


def connector_kwargs(r: _Reader, default: Any) -> dict[str, Any]:
    """``protocol_log`` of a [receive.NAME] or [send.NAME] section."""
    return {"protocol_log": r.get("protocol_log", default.protocol_log, _choice(*PROTOCOL_LOG_LEVELS))}


def read_logs(r: _Reader) -> LogsConfig:
    d = LogsConfig()
    logs = LogsConfig(
        protocol_dir=r.get("protocol_dir", d.protocol_dir, config_path),
        rotate_size=r.get("rotate_size", d.rotate_size, parse_size),
        rotate_age=r.get("rotate_age", d.rotate_age, parse_duration),
        keep_age=r.get("keep_age", d.keep_age, parse_duration),
        keep_size=r.get("keep_size", d.keep_size, parse_size),
    )
    if logs.rotate_size and logs.rotate_size < 4096:
        r.error("rotate_size", "must be 0 (never by size) or at least 4096 octets")
    if logs.rotate_age and logs.rotate_age < 60:
        r.error("rotate_age", "must be 0 (never by age) or at least 60 seconds")
    if logs.keep_size and logs.rotate_size and logs.keep_size < logs.rotate_size:
        r.error("keep_size", "must be 0 (no cap) or at least rotate_size, else every rotated file is deleted")
    r.finish()
    return logs


def read_admin(r: _Reader) -> AdminConfig:
    d = AdminConfig()
    admin = AdminConfig(
        enabled=r.get("enabled", d.enabled, _bool),
        listen=r.get("listen", d.listen, endpoints),
        token_file=r.get("token_file", d.token_file, config_path),
        allowed_networks=r.get("allowed_networks", d.allowed_networks, _list_of(_cidr)),
        quarantine_expiry=r.get("quarantine_expiry", d.quarantine_expiry, parse_duration),
    )
    if admin.enabled and not admin.listen:
        r.error("listen", "needs at least one endpoint, e.g. \"tcp:8025:interface=127.0.0.1\" or "
                "\"unix:/run/exmta/admin.sock\" (or enabled = false)")
    for ep in admin.listen:
        if ep.split(":", 1)[0] not in ("tcp", "tcp6", "unix"):
            r.error("listen", f"{ep!r}: the admin API listens on tcp, tcp6 or unix endpoints only")
    r.finish()
    return admin


def rotation_kwargs(logs: LogsConfig) -> dict[str, Any]:
    """RotatingLog keyword arguments for a LogsConfig."""
    return {"max_size": logs.rotate_size, "max_age": logs.rotate_age, "keep_age": logs.keep_age,
            "keep_size": logs.keep_size}
