"""``exmta diagnose``: argument parsing and output (the checks are in domain/host/configcheck).

``exmta diagnose DOMAIN``, ``exmta diagnose HOST:PORT`` (or an address, or
``--host NAME``), ``exmta diagnose --config FILE``.  Output is a table or
``--json``; the exit status follows the monitoring-plugin convention: 0 all
ok, 1 warnings, 2 errors, 3 the diagnosis could not run.
"""
from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

from exmta.diagnose.findings import EXIT, Findings

__all__ = ["add_diagnose_parser"]


def add_diagnose_parser(sub: Any) -> None:
    p = sub.add_parser("diagnose", help="check a domain, an SMTP host or our configuration from the outside",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", help="DOMAIN, or HOST:PORT / an IP address (a host); omit with --config")
    p.add_argument("--config", metavar="FILE", help="our configuration (alone: diagnose it; with a DOMAIN: "
                   "compare our DKIM keys; with --from-connector: that connector's TLS settings)")
    p.add_argument("--host", action="store_true", help="TARGET is an SMTP host even without :PORT")
    p.add_argument("--from-connector", metavar="NAME", help="use exactly this send connector's TLS settings")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--dns-server", action="append", default=[], metavar="IP[:PORT]",
                   help="ask this DNS server (repeatable; default: the config's, else /etc/resolv.conf)")
    p.add_argument("--ip", action="append", default=[], metavar="ADDRESS",
                   help="one of our sending addresses: SPF and reverse DNS are checked for it (repeatable)")
    p.add_argument("--selector", action="append", default=[], help="DKIM selector to check (repeatable)")
    p.add_argument("--ca-file", metavar="PEM", help="validate certificates against these roots (default: system)")
    p.add_argument("--port", type=int, default=None, help="SMTP port (default 25, or the one in TARGET)")
    p.add_argument("--https-port", type=int, default=443, help=argparse.SUPPRESS)  # tests only
    p.add_argument("--dane-resolver", metavar="IP[:PORT]", help="a validating resolver: check TLSA (DANE)")
    p.add_argument("--name", help="the name the certificate must carry (default: the host)")
    p.add_argument("--helo", default="diagnose.exmta.invalid", help="EHLO name to send")
    p.add_argument("--warn-days", type=int, default=30, help="warn when a certificate expires sooner (default 30)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per step (default 10)")
    p.add_argument("--no-versions", action="store_true", help="do not probe each TLS version")
    p.set_defaults(func=_diagnose)


def _fail(text: str) -> int:
    print(f"exmta diagnose: {text}", file=sys.stderr)
    return EXIT["unknown"]


def _split_host(target: str, default_port: int) -> tuple[str, int, bool]:
    """"host:port", "[v6]:port", "192.0.2.1" -> (host, port, clearly a host)."""
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port, True
    if target.count(":") == 1:
        host, _, port = target.partition(":")
        return host, int(port), True
    try:
        ipaddress.ip_address(target)
        return target, default_port, True
    except ValueError:
        return target, default_port, False


def _diagnose(args: argparse.Namespace) -> int:
    config = None
    if args.config:
        from exmta.config.load import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            return EXIT["unknown"]
    try:
        findings = _run(args, config)
    except ValueError as exc:
        return _fail(str(exc))
    if isinstance(findings, int):
        return findings
    if args.json and len(findings) > 1:
        import json

        print(json.dumps([one.to_json() for one in findings], indent=2))
    else:
        for one in findings:
            one.write(sys.stdout, args.json)
    return max(one.exit_status for one in findings)


def _run(args: argparse.Namespace, config: Any) -> list[Findings] | int:
    if args.target is None:
        if args.from_connector:
            return _connector_hosts(args, config)
        if config is None:
            return _fail("give a DOMAIN, a HOST:PORT, or --config FILE")
        from exmta.diagnose.configcheck import diagnose_config

        return [diagnose_config(config, ca_file=args.ca_file, warn_days=args.warn_days, timeout=args.timeout)]
    host, port, is_host = _split_host(args.target, args.port or 25)
    if args.port:
        port = args.port
    if is_host or args.host or args.from_connector:
        return [_host(args, config, host, port)]
    return [_domain(args, config, host)]


def _connector(args: argparse.Namespace, config: Any) -> Any:
    if config is None:
        raise ValueError("--from-connector needs --config FILE")
    try:
        return config.send_connector(args.from_connector)
    except KeyError:
        names = ", ".join(s.name for s in config.send) or "none"
        raise ValueError(f"no send connector {args.from_connector!r} in {config.source} (defined: {names})") from None


def _connector_hosts(args: argparse.Namespace, config: Any) -> list[Findings]:
    sc = _connector(args, config)
    if not sc.smarthosts:
        raise ValueError(f"send.{sc.name} delivers by MX: give the DOMAIN or HOST to diagnose")
    return [_host(args, config, sh.host, args.port or sh.port) for sh in sc.smarthosts]


def _host(args: argparse.Namespace, config: Any, host: str, port: int) -> Findings:
    from exmta.diagnose.host import ProbeOptions, probe_host

    opts = ProbeOptions(host, port, name=args.name, ca_file=args.ca_file, helo=args.helo, timeout=args.timeout,
                        warn_days=args.warn_days, check_versions=not args.no_versions)
    if args.from_connector:
        sc = _connector(args, config)
        opts.ca_file = args.ca_file or sc.tls_ca_file
        opts.name = args.name or sc.tls_domain or host
        opts.client_certificate, opts.client_key = sc.tls_certificate, sc.tls_key
        opts.require_tls = sc.tls == "mandatory"
        opts.helo = sc.helo_name or (config.hostname if config else opts.helo)
    address = _resolve(args, config, host)
    if address is not None:
        opts.address = address
    return probe_host(opts).findings


def _dns(args: argparse.Namespace, config: Any) -> Any:
    from types import SimpleNamespace

    from exmta.dns import auth_dns_from_config

    servers = list(args.dns_server)
    if not servers and config is not None:
        servers = next((list(s.dns_servers) for s in config.send if s.dns_servers), [])
    return auth_dns_from_config({"dns_servers": servers, "dns_timeout": min(args.timeout, 60.0)},
                                SimpleNamespace(reactor=None, threadpool=None))


def _resolve(args: argparse.Namespace, config: Any, host: str) -> str | None:
    """The host's address through our DNS settings (None: leave it to the system resolver)."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not args.dns_server and not (config is not None and any(s.dns_servers for s in config.send)):
        return None
    dns = _dns(args, config)
    for rdtype in ("A", "AAAA"):
        records = dns.lookup(host, rdtype)
        if records:
            return str(records[0].address)
    return None


def _domain(args: argparse.Namespace, config: Any, domain: str) -> Findings:
    from exmta.diagnose.domain import DomainOptions, diagnose_domain

    dane = None
    tp = config.tls_policy if config is not None else None
    # without options, what our send side uses: [tls_policy] dane_resolvers and ca_file
    resolvers = [args.dane_resolver] if args.dane_resolver else list(tp.dane_resolvers) if tp and tp.dane else []
    if resolvers:
        from exmta.routing.dns import parse_nameservers
        from exmta.tlspolicy.dane import ValidatingResolver

        dane = ValidatingResolver(None, None, parse_nameservers(resolvers), timeout=args.timeout)
    opts = DomainOptions(domain, _dns(args, config), selectors=list(args.selector), sending_ips=list(args.ip),
                         dkim_keys=tuple(config.dkim_keys) if config is not None else (),
                         smtp_port=args.port or 25, https_port=args.https_port,
                         ca_file=args.ca_file or (tp.ca_file if tp else None),
                         dane_resolver=dane, helo=args.helo, timeout=args.timeout, warn_days=args.warn_days,
                         check_versions=not args.no_versions)
    if config is not None and not args.selector:
        opts.selectors = [k.selector for k in config.dkim_keys if k.domain == domain.lower().rstrip(".")]
    return diagnose_domain(opts)
