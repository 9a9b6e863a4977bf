"""A service that sends aggregate reports once a day, a minute after UTC midnight.

DMARC aggregate reports (exmta.filters.dmarc_reports) and TLS-RPT reports
(exmta.tlspolicy.report) both record results in a JSON-lines file through
the day; at the report time the file is moved aside (``results-<time>.jsonl
.sending``, so that recording goes on in a new file) and every file still
waiting is reported, then deleted. A subclass says how to report.
"""
from __future__ import annotations

import glob
import os
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

__all__ = ["DAY", "DailyReportService"]

DAY = 86400.0
log = Logger()


class DailyReportService(Service):
    """Calls :meth:`send_reports` once a day; :meth:`take_files` hands it the files to report."""

    #: names the reports in the failure log line
    what = "reports"

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._call: Any = None

    def startService(self) -> None:
        super().startService()
        self._schedule()

    def stopService(self) -> Any:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self) -> None:
        now = self.clock.seconds()
        self._call = self.clock.callLater(DAY - (now % DAY) + 60, self._tick)  # a minute after UTC midnight

    def _tick(self) -> None:
        d = Deferred.fromCoroutine(self.send_reports())
        d.addErrback(lambda f: log.failure("{what} failed", f, what=self.what))
        d.addBoth(lambda _: self._schedule() if self.running else None)

    async def send_reports(self) -> int:
        raise NotImplementedError  # the subclass's job: how its reports are built and sent

    @staticmethod
    def take_files(results_path: str, now: float) -> list[str]:
        """Move the current results aside (renamed with the time) and list every file to report."""
        directory = os.path.dirname(results_path)
        if os.path.exists(results_path):
            os.replace(results_path, os.path.join(directory, f"results-{int(now)}.jsonl.sending"))
        return sorted(glob.glob(os.path.join(directory, "results-*.jsonl.sending")))
