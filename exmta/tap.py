"""``twistd exmta``: command-line options and the service it runs."""
from __future__ import annotations

import os
import sys

from twisted.application.service import IService
from twisted.python import usage

from exmta.config.reader import ConfigError
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


def _dropping_to(options: Options) -> tuple[int, int] | None:
    """(uid, gid) twistd will switch to after binding (``--uid``/``--gid`` run as root), else None."""
    import pwd

    parent = getattr(options, "parent", None)
    uid = parent.get("uid") if parent is not None else None
    if uid is None or uid == 0 or os.geteuid() != 0:
        return None
    gid = parent.get("gid")
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = uid
    return uid, gid


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from twisted.logger import Logger

    from exmta.filemodes import tighten_umask
    from exmta.service import build_service

    tighten_umask()  # at least 027: nothing the server creates is readable by other users
    for w in getattr(options, "warnings", ()):
        Logger(namespace="exmta.config").warn("{source}: warning: {warning}", source=options.config.source,
                                              warning=w)
    service = build_service(options.config, reactor)
    drop = _dropping_to(options)
    if drop is not None:  # what was created as root now belongs to the user the server will run as
        from exmta.filemodes import hand_over
        from exmta.service import data_paths

        paths = data_paths(options.config)
        hand_over([paths["data"], paths["pickup"]], [paths["queue"], os.path.dirname(paths["tracking"])], *drop)
    return service
