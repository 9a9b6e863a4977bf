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
from datetime import datetime, timezone
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

__all__ = ["DAY", "DailyReportService", "report_headers"]

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


def report_headers(domain: str, org: str, sender: str, to: list[str], report_id: str, now: float) -> EmailMessage:
    """The header block aggregate reports share (DMARC, RFC 7489 7.2.1.1; TLS-RPT, RFC 8460 5.3)."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = f"Report Domain: {domain} Submitter: {org} Report-ID: <{report_id}>"
    msg["Date"] = format_datetime(datetime.fromtimestamp(now, timezone.utc))
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    return msg
