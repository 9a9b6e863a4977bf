"""Operator queue decisions that must survive a restart: suspended destinations and the redirect.

An operator who suspends a queue during an incident (``exmta queue suspend
relay``) or drains the server (``exmta queue redirect HOST``) expects the
decision to hold until they undo it, not until the next restart (issue 10
item 6). :class:`OperatorStateFile` keeps both in one small JSON file in the
spool directory, written atomically (temp file, fsync, rename, directory
fsync) on every change; the scheduler reads it back when the service is
built. Operator actions are rare, so the write is done on the caller's
thread.

The redirect's connector cannot be stored: the file keeps its target
(``host:port``) and :func:`redirect_connector_factory` builds the same kind
of connector the admin API builds (SMTP, opportunistic TLS).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

from twisted.logger import Logger

__all__ = ["OperatorStateFile", "redirect_connector_factory"]

log = Logger()

FILE_NAME = "operator.json"
VERSION = 1


class OperatorStateFile:
    """``<queue dir>/operator.json``: ``{"suspended": [...], "redirect": {...} | null}``."""

    def __init__(self, queue_dir: str) -> None:
        self.path = os.path.join(queue_dir, FILE_NAME)

    def load(self) -> tuple[dict[tuple[str, str | None], str], tuple[str, str] | None]:
        """-> (suspended destinations with their reasons, (connector name, target) of the redirect or None).

        A missing file is an empty state; an unreadable one is logged and treated as empty.
        """
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read())
            suspended = {(str(s["connector"]), s.get("nexthop")): str(s.get("reason", "suspended by an operator"))
                         for s in data.get("suspended", [])}
            redirect = data.get("redirect")
            return suspended, ((str(redirect["name"]), str(redirect["target"])) if redirect else None)
        except FileNotFoundError:
            return {}, None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.error("cannot read the operator state {path}: {error}; no suspension or redirect restored",
                      path=self.path, error=e)
            return {}, None

    def save(self, suspended: dict[tuple[str, str | None], str], redirect: tuple[str, str | None] | None) -> None:
        """Replace the file atomically (blocking: a few small writes and two fsyncs)."""
        data = {
            "version": VERSION,
            "suspended": [{"connector": c, "nexthop": n, "reason": r} for (c, n), r in sorted(
                suspended.items(), key=lambda item: (item[0][0], item[0][1] or ""))],
            "redirect": {"name": redirect[0], "target": redirect[1]} if redirect is not None else None,
        }
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(data, indent=1).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def redirect_connector_factory(config: Any, reactor: Any, connectors: dict[str, Any]) -> Callable[[str, int], Any]:
    """What the admin API's redirect builds: an SMTP connector to host:port (opportunistic TLS)."""
    from exmta.config.schema import SendConnectorConfig, SmartHost
    from exmta.send import build_wire_connector

    def make(host: str, port: int) -> Any:
        name = "redirect"
        while name in {s.name for s in config.send}:
            name += "_"  # never replaces a configured send connector
        sc = SendConnectorConfig(name=name, kind="smtp", smarthosts=(SmartHost(host, port),), tls="opportunistic")
        connector = build_wire_connector(sc, reactor, reactor, None, config.hostname)
        connectors[name] = connector  # closed (QUIT) with the other send connectors at stop
        return connector

    return make
