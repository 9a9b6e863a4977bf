"""The client's deadlines in an SMTP session: one timer per session, rarely moved.

A command line must be complete ``command_timeout`` after its first octet (Postfix's
smtpd_per_request_deadline); DATA, or one BDAT chunk, ``data_timeout`` after it began, plus one
second per ``min_data_rate`` octets when that is set. No deadline runs while a command is pending
(policy, filters, the commit); when it runs out the session answers 421 4.4.2 and closes
(``ESMTPServer._timed_out``). The deadline state lives on the session (``_deadline``,
``_line_started``, ``_data_deadline``, ``_timer``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from exmta.smtp.wire import Mode

if TYPE_CHECKING:
    from exmta.smtp.server import ESMTPServer

__all__ = ["arm_timer", "cancel_timer", "timer_fired"]


def arm_timer(server: ESMTPServer) -> None:
    """The client has until ``server._deadline``. The timer is not moved on each command
    (that was a reactor reschedule per line): it fires at its old time, sees the later
    deadline and sleeps again for the rest, unless the deadline came nearer.

    A command line must be complete ``command_timeout`` after its first octet, however
    slowly it drips in (Postfix's smtpd_per_request_deadline); DATA (or one BDAT chunk)
    must be complete ``data_timeout`` + octets / ``min_data_rate`` after it began."""
    if server._closing or server._busy:
        return
    now = server.clock.seconds()
    if server.parser.mode is Mode.COMMAND:
        server._data_deadline = None
        if server.parser.buffered():
            if server._line_started is None:
                server._line_started = now
            server._deadline = server._line_started + server.config.command_timeout
        else:
            server._line_started = None
            server._deadline = now + server.config.command_timeout
    else:
        if server._data_deadline is None:
            server._data_deadline = now + server.config.data_timeout
        server._deadline = now + server.config.data_timeout
        if server.config.min_data_rate:
            server._deadline = min(server._deadline, server._data_deadline)
    delay = max(0.0, server._deadline - now)
    timer = server._timer
    if timer is None or not timer.active():
        server._timer = server.clock.callLater(delay, timer_fired, server)
    elif timer.getTime() > server._deadline:
        timer.reset(delay)


def cancel_timer(server: ESMTPServer) -> None:
    """No deadline while a command is pending or once the session closes."""
    if server._timer is not None and server._timer.active():
        server._timer.cancel()
    server._timer = None


def timer_fired(server: ESMTPServer) -> None:
    """Sleep again if the deadline moved later; else the session has timed out."""
    left = server._deadline - server.clock.seconds()
    if left > 0:
        server._timer = server.clock.callLater(left, timer_fired, server)
        return
    server._timed_out()
