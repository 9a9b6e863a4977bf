"""``twistd exmta``: command-line options and the service it runs."""
from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from exmta.config.load import ConfigError, embedded_default, load_config
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

    def postOptions(self) -> None:
        try:
            if self["config"]:
                self.config = load_config(self["config"], data_dir=self["data"])
            else:
                self.config = embedded_default(self["data"] or "./exmta-data")
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["check"]:
            print(f"{self.config.source}: configuration OK")
            sys.exit(0)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from exmta.filemodes import tighten_umask
    from exmta.service import build_service

    tighten_umask()  # at least 027: nothing the server creates is readable by other users

    return build_service(options.config, reactor)
