"""``exmta exo check`` and ``exmta import exchange``: argument parsing only."""
from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_commands"]


def _exo_check(args: argparse.Namespace) -> int:
    from exmta.exchange.exo_check import main

    return main(args)


def _import_exchange(args: argparse.Namespace) -> int:
    from exmta.exchange.importer import main

    return main(args)


def add_commands(sub: Any) -> None:
    """Register ``exo check`` and ``import exchange`` on the ``exmta`` subparsers."""
    exo = sub.add_parser("exo", help="Exchange Online checks").add_subparsers(dest="exo_command", metavar="COMMAND")
    check = exo.add_parser(
        "check", help="will Exchange Online attribute mail from each connector to the right tenant (MC1226222)?",
        description="Check every send connector with a smart host under *.mail.protection.outlook.com: client "
                    "certificate, validity, chain, subject/SAN against the accepted domains, mandatory TLS with "
                    "domain validation, no certificate shared between tenants. Exit 0 ok, 1 warnings, "
                    "2 errors, 3 unreadable file.")
    check.add_argument("file", help="path to the TOML configuration")
    check.add_argument("--ca-file", action="append", metavar="PEM",
                       help="also trust this CA (a private CA in a lab); repeatable")
    check.add_argument("--accepted-domain", action="append", metavar="DOMAIN",
                       help="an accepted domain of the tenant not listed in [accepted_domains]; repeatable")
    check.add_argument("--warn-days", type=int, default=30, metavar="N",
                       help="warn when the certificate expires within N days (default 30)")
    check.add_argument("--json", action="store_true", help="print the findings as JSON")
    check.set_defaults(func=_exo_check)

    imp = sub.add_parser("import", help="import configuration from another mail server").add_subparsers(
        dest="import_command", metavar="SOURCE")
    ex = imp.add_parser(
        "exchange", help="write an exmta config from Get-ReceiveConnector/Get-SendConnector/Get-AcceptedDomain JSON",
        description="Read the JSON that `Get-ReceiveConnector | ConvertTo-Json`, `Get-SendConnector | "
                    "ConvertTo-Json` and `Get-AcceptedDomain | ConvertTo-Json` print, or their Export-Clixml "
                    "files (any order, one or more) and write an exmta TOML configuration. Every property that "
                    "cannot be mapped is "
                    "listed with the reason, in the output as comments and on standard error.")
    ex.add_argument("files", nargs="+", metavar="FILE", help="JSON (ConvertTo-Json) or CLIXML (Export-Clixml) files")
    ex.add_argument("-o", "--output", metavar="TOML", help="write the configuration here (default: stdout)")
    ex.add_argument("--hostname", help="[server] hostname (default: the first receive connector's Fqdn)")
    ex.add_argument("--data-dir", default="/var/lib/exmta", help="[server] data_dir (default /var/lib/exmta)")
    ex.add_argument("--tls-cert", metavar="PEM", help="the certificate TlsCertificateName names, exported to PEM "
                    "(STARTTLS on receive connectors with AuthMechanism Tls; the client certificate of send "
                    "connectors with TlsCertificateName)")
    ex.add_argument("--tls-key", metavar="PEM", help="its private key (default: in --tls-cert)")
    ex.add_argument("--auth-backend", metavar="USERS-FILE|NAME",
                    help="where connectors with BasicAuth check passwords: a users file or an [auth.NAME]")
    ex.add_argument("--relay-connector", action="append", metavar="NAME",
                    help="a receive connector that has the anonymous relay permission (Add-ADPermission "
                         "Ms-Exch-SMTP-Accept-Any-Recipient, not visible in Get-ReceiveConnector); repeatable")
    ex.add_argument("--mailbox-host", metavar="HOST[:PORT]",
                    help="the Exchange server that receives mail for the accepted domains")
    ex.add_argument("--server", metavar="NAME",
                    help="import the receive connectors of this Exchange server only (default: the first, "
                         "when the export has several)")
    ex.set_defaults(func=_import_exchange)
