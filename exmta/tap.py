"""``twistd exmta``: command-line options and the service it runs."""
from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from exmta.config.load import ConfigError
from exmta.config.schema import Config


class Options(usage.Options):
    synopsis = "[-c FILE] [--data DIR] [--check]"
    longdesc = (
        "Run the exmta mail transport server. Without --config it runs the embedded "
        "default: SMTP on 127.0.0.1:2525 accepting mail for example.test and localhost, "
        "delivered to Maildir folders under the data directory."
    )
    optParameters = [
        ["config", "c", None, "Path to the TOML configuration (default: the embedded default)."],
        ["data", "d", None, "Data directory: spool, mail and logs (default ./exmta-data, or [server] data_dir)."],
    ]
    optFlags = [["check", None, "Validate the configuration, print the result and exit."]]

    config: Config
    warnings: list[str]

    def postOptions(self) -> None:
        from exmta.config.check import check_file  # the same checks as `exmta check-config`

        try:
            self.config, self.warnings = check_file(self["config"], data_dir=self["data"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["check"]:
            for w in self.warnings:
                print(f"{self.config.source}: warning: {w}", file=sys.stderr)
            print(f"{self.config.source}: configuration OK ({len(self.warnings)} warning(s))")
            sys.exit(0)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from twisted.logger import Logger

    from exmta.service import build_service

    for w in getattr(options, "warnings", ()):
        Logger(namespace="exmta.config").warn("{source}: warning: {warning}", source=options.config.source,
                                              warning=w)
    return build_service(options.config, reactor)
