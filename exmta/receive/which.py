"""``exmta connector which ADDRESS``: the receive connector a client address reaches, and its rights.

Exchange administrators ask "which receive connector will this printer hit,
and may it relay?" (Get-ReceiveConnector and its RemoteIPRanges, by hand).
This answers it from the configuration file, with the same code the server
uses: the dispatcher's most-specific-range choice (exmta.receive.ranges) and
the receive policy's rights (exmta.receive.policy). Nothing is started.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from exmta.config.schema import Config, ReceiveConnectorConfig

__all__ = ["Reach", "add_connector_parser", "which"]


@dataclass(frozen=True)
class Reach:
    """Where one address lands on one listen endpoint."""

    endpoint: str
    connector: ReceiveConnectorConfig | None   # None: no connector admits it (554 5.7.1 at connect)
    rights: frozenset[str] = frozenset()       # without AUTH
    rights_after_auth: frozenset[str] = frozenset()

    def describe(self, address: str) -> list[str]:
        from exmta.receive.policy import ORG_HEADERS, RELAY, SUBMIT

        if self.connector is None:
            return [f"{self.endpoint}: no receive connector admits {address}: "
                    "554 5.7.1 at connect (and a REJECT in the tracking log)"]
        rc = self.connector
        if RELAY in self.rights:
            may = "may relay to any domain" + (" (relay_networks)" if _in(address, rc.relay_networks)
                                               else " (permission groups)")
        elif SUBMIT in self.rights:
            may = "may send to the accepted domains only (554 5.7.1 Relay access denied for others)"
        else:
            may = "may not send before AUTH (530 5.7.0 Authentication required)"
        lines = [f"{self.endpoint}: receive.{rc.name} (remote_ranges {', '.join(rc.remote_ranges)})", f"  {may}"]
        if rc.auth and RELAY in self.rights_after_auth - self.rights:
            lines.append(f"  after AUTH ({', '.join(rc.auth)}, backend {rc.auth_backend}): may relay to any domain")
        if ORG_HEADERS in self.rights:
            lines.append("  X-MS-Exchange-Organization-* headers kept (exchange_servers)")
        if rc.tls is None:
            lines.append("  no STARTTLS offered")
        elif rc.require_tls and not _in(address, rc.tls.plaintext_networks):
            lines.append("  STARTTLS required before MAIL (require_tls)")
        else:
            lines.append("  STARTTLS offered" + (", not required for this address (plaintext_networks)"
                                                  if rc.require_tls else ""))
        lines.append(f"  max_text_line {rc.max_text_line or 'unlimited'}, max_message_size {rc.max_message_size}, "
                     f"max_connections_per_ip {rc.max_connections_per_ip or 'unlimited'}")
        return lines


def _in(address: str, networks: tuple[str, ...]) -> bool:
    from exmta.receive.ranges import ip_in, parse_ranges

    return ip_in(address, parse_ranges(networks))


def which(config: Config, address: str) -> list[Reach]:
    """One Reach per listen endpoint of ``config``, for a client at ``address``."""
    from twisted.internet.task import Clock

    from exmta.receive.policy import DefaultReceivePolicy
    from exmta.receive.ranges import select_connector
    from exmta.receive.wiring import make_dispatchers

    out = []
    for endpoint, dispatcher in make_dispatchers(config.receive, [object()] * len(config.receive)):
        entry = select_connector(dispatcher.entries, address)
        if entry is None:
            out.append(Reach(endpoint, None))
            continue
        rc = next(rc for rc in config.receive if rc.name == entry.name)
        policy = DefaultReceivePolicy.for_connector(config, rc, Clock())
        session = SimpleNamespace(peer_ip=address, auth_identity=None, tls=None, session_id="-")
        authenticated = SimpleNamespace(peer_ip=address, auth_identity="user", tls=None, session_id="-")
        out.append(Reach(endpoint, rc, policy.rights(session), policy.rights(authenticated)))
    return out


def _run(args: argparse.Namespace) -> int:
    from exmta.config.load import ConfigError, load_config
    from exmta.receive.ranges import parse_ip

    if parse_ip(args.address) is None:
        print(f"exmta connector which: {args.address!r} is not an IP address", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    reaches = which(config, args.address)
    for reach in reaches:
        print("\n".join(reach.describe(args.address)))
    return 0 if any(r.connector is not None for r in reaches) else 1


def add_connector_parser(sub: Any) -> None:
    """``exmta connector which -c FILE ADDRESS``."""
    p = sub.add_parser("connector", help="receive connectors: which one a client address reaches, with which rights")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    w = actions.add_parser("which", help="the receive connector (per listen endpoint) a client address reaches, "
                                         "and what it may do there. Exit codes: 0 admitted, 1 refused, 2 error.")
    w.add_argument("-c", "--config", required=True, metavar="FILE", help="the server's TOML configuration")
    w.add_argument("address", help="the client's IP address")
    w.set_defaults(func=_run)
