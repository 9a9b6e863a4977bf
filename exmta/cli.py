"""The ``exmta`` administration command."""
from __future__ import annotations

import argparse
import sys

from exmta.config.reader import ConfigError


def _is_rules_file(path: str) -> bool:
    """A transport rules file (only ``[[rule]]`` tables), such as etc/rules.toml, rather than a configuration."""
    import os
    import tomllib

    if not os.path.isfile(path):  # /dev/stdin or a pipe: read once, by the configuration check
        return False
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return False  # the configuration check says what is wrong with it
    return bool(raw) and set(raw) == {"rule"}


def _check_config(args: argparse.Namespace) -> int:
    from exmta.config.check import check_file  # the schema, then the filter plugins, as twistd loads them

    if _is_rules_file(args.file):  # checked as `exmta rules check` does, so that any exmta file can be checked
        from exmta.rules.cli import check_rules_file
        return check_rules_file(args.file)
    try:
        config, warnings = check_file(args.file)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    for w in warnings:
        print(f"{args.file}: warning: {w}", file=sys.stderr)
    print(f"{args.file}: configuration OK "
          f"({len(config.receive)} receive connector(s), {len(config.send)} send connector(s), "
          f"{len(config.routes)} route(s), {len(warnings)} warning(s))")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exmta", description="Administer an exmta mail server.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = sub.add_parser("check-config", help="validate a configuration file without starting anything")
    check.add_argument("file", help="path to the TOML configuration")
    check.set_defaults(func=_check_config)
    from exmta.admin.client import add_queue_parser
    from exmta.admin.track import add_track_parser
    add_track_parser(sub)  # exmta track (message tracking log search)
    add_queue_parser(sub)  # exmta queue list|messages|show|retry|suspend|resume|remove|export|redirect
    from exmta.admin.quarantine_cli import add_quarantine_parser
    add_quarantine_parser(sub)  # exmta quarantine list|show|release|delete|export (issue 15)
    from exmta.auth.users_cli import add_users_parser
    add_users_parser(sub)  # exmta users add|remove|passwd|grant|revoke|rehash|list
    from exmta.auth.lockout_cli import add_lockouts_parser
    add_lockouts_parser(sub)  # exmta lockouts list|clear
    from exmta.dns.commands import add_commands as add_mail_auth_commands
    add_mail_auth_commands(sub)  # exmta dkim keygen, exmta dns check, exmta psl refresh
    from exmta.exchange.commands import add_commands as add_exchange_commands
    add_exchange_commands(sub)  # exmta exo check, exmta import exchange
    from exmta.receive.which import add_connector_parser
    add_connector_parser(sub)  # exmta connector which ADDRESS: the receive connector and its rights
    from exmta.diagnose.cli import add_commands as add_diagnose_commands
    add_diagnose_commands(sub)  # exmta explain, exmta diagnose
    from exmta.queue.cluster_cli import add_commands as add_cluster_commands
    add_cluster_commands(sub)  # exmta db init|migrate|status, exmta cluster status|drain|undrain
    from exmta.rules.cli import add_rules_parser
    add_rules_parser(sub)  # exmta rules check|test|import
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
