"""``[transport_rules]`` of the main configuration, checked with the rules file it names.

A rules file that does not load is a configuration problem at start (and in
``exmta check-config``), each problem prefixed with ``transport_rules.file``;
once running, a bad edit keeps the old rules instead (exmta.rules.hook).
"""
from __future__ import annotations

import os
from typing import Any

from exmta.config.reader import ConfigError, parse_duration
from exmta.config.schema import TransportRulesConfig
from exmta.message import Limits

__all__ = ["read_transport_rules", "rules_path"]


def rules_path(file: str, source: str) -> str:
    """``file`` as an absolute path: relative paths are relative to the configuration file's directory."""
    if os.path.isabs(file):
        return file
    base = os.path.dirname(os.path.abspath(source)) if source and not source.startswith("<") else os.getcwd()
    return os.path.join(base, file)


def read_transport_rules(r: Any, source: str, send_names: set[str],
                         auth_backends: dict[str, str] | None = None) -> TransportRulesConfig:
    d = TransportRulesConfig()
    directory = r.get("directory", None, lambda v: v if isinstance(v, str) and v else _bad("must be a name"))
    if directory is not None and (auth_backends or {}).get(directory) != "ldap":
        r.error("directory", f"no [auth.{directory}] section with kind = \"ldap\" (the directory for "
                             "FromMemberOf / SentToMemberOf)")
    file = r.get("file", None, lambda v: v if isinstance(v, str) and v.strip() else _bad("must be a file name"))
    reload_interval = r.get("reload_interval", d.reload_interval, parse_duration)
    threads = r.get("threads", d.threads,
                    lambda v: v if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64
                    else _bad("must be an integer from 1 to 64"))
    limits_table = r.get("limits", {}, lambda v: v if isinstance(v, dict) else _bad("must be a table"))
    limits = Limits()
    try:
        limits = Limits.from_mapping(limits_table)
    except (ValueError, TypeError) as e:
        r.error("limits", str(e))
    r.finish()
    path = None
    if file is not None:
        path = rules_path(file, source)
        from exmta.rules.plugins import discover
        from exmta.rules.ruleset import load_rules
        plugins, plugin_problems = discover()
        for problem in plugin_problems:
            r.error("file", problem)
        try:
            load_rules(path, send_connector_known=lambda name: name in send_names, plugins=plugins, limits=limits)
        except ConfigError as e:
            for problem in e.problems:
                r.error("file", f"{path}: {problem}")
    return TransportRulesConfig(file=path, reload_interval=reload_interval, threads=threads,
                                limits=tuple(sorted(limits_table.items())), directory=directory)


def _bad(message: str) -> Any:
    raise ValueError(message)
