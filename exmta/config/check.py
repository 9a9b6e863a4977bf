"""Everything ``exmta check-config`` and ``twistd exmta`` verify beyond the schema, in one place.

:func:`check_file` is what both commands run: the schema (exmta.config.load),
then the filter plugins loaded and verified as at start (exmta.plugins), so
that the check refuses whatever start would refuse. :func:`config_warnings`
lists what is valid but probably not meant (an open relay behind a NAT, no
accepted domains, no routes, metrics without their library): the check
prints them and ``twistd`` logs them at start.
"""
from __future__ import annotations

import importlib.util
import ipaddress
import re

from exmta.config.load import ConfigError, embedded_default, load_config
from exmta.config.schema import Config, ReceiveConnectorConfig

__all__ = ["check_file", "config_warnings", "verify_plugins"]

# addresses a NAT, a load balancer or a local proxy can make every internet client look like
_HIDDEN_CLIENT_RANGES = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "::1/128", "fc00::/7", "fe80::/10"))
_LOOPBACK_INTERFACE = re.compile(r"(?:^|:)interface=(?:127\.[\d.]+|\\?:\\?:1|localhost)(?::|$)")


def verify_plugins(config: Config) -> None:
    """Load and verify the filter plugins ``config`` names; raise ConfigError as start would."""
    from exmta.plugins import check_filters

    problems = check_filters(config.filters, config.hostname, config.data_dir)
    if problems:
        raise ConfigError(config.source, problems)


def check_file(path: str | None, data_dir: str | None = None) -> tuple[Config, list[str]]:
    """-> (config, warnings) for ``path`` (None: the embedded default); ConfigError lists every problem."""
    config = load_config(path, data_dir=data_dir) if path else embedded_default(data_dir or "./exmta-data")
    verify_plugins(config)
    return config, config_warnings(config)


def _internet_facing(rc: ReceiveConnectorConfig) -> bool:
    """Admits every address and listens beyond loopback."""
    if not any(ipaddress.ip_network(r).prefixlen == 0 for r in rc.remote_ranges):
        return False
    return any(not ep.startswith("unix:") and not _LOOPBACK_INTERFACE.search(ep) for ep in rc.listen)


def config_warnings(config: Config) -> list[str]:
    """What is valid but unsafe or useless as written; each names the key."""
    out = []
    for rc in config.receive:
        if not _internet_facing(rc):
            continue
        risky = [n for n in rc.relay_networks
                 if any(ipaddress.ip_network(n).overlaps(h) for h in _HIDDEN_CLIENT_RANGES
                        if h.version == ipaddress.ip_network(n).version)]
        if risky:
            out.append(f"receive.{rc.name}.relay_networks: {', '.join(risky)} may relay through a connector "
                       f"open to the whole internet (remote_ranges {', '.join(rc.remote_ranges)}); behind a NAT, "
                       "a load balancer or a local proxy every client has such an address and this is an open "
                       "relay. Give relay rights on a separate connector whose remote_ranges are only those "
                       "networks")
    if not config.accepted_domains:
        out.append("accepted_domains: none configured: no mail is accepted for any domain of yours, and "
                   "clients without relay rights get 554 5.7.1 for every recipient")
    if not config.routes:
        out.append("route: none configured: no recipient has a send connector and every recipient fails "
                   "with 550 5.4.4 Unable to route (add [[route]] domains = [\"*\"] for the rest of the world)")
    if config.metrics.enabled and importlib.util.find_spec("prometheus_client") is None:
        out.append("metrics.enabled: is true but prometheus-client is not installed, so there are no metrics "
                   "(install it: .venv/bin/pip install 'exmta[metrics]', or set enabled = false)")
    return out
