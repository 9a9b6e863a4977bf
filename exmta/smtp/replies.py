"""Reply constants for the ESMTP server, each with its RFC 3463 enhanced status code.

Keeping them in one place keeps the wire consistent (and greppable) and
lets tests compare against the same objects the server sends. Replies
whose text depends on the session are small functions.
"""
from __future__ import annotations

from exmta.model import Action, Reply, Verdict

R = Reply.make

# -- positive
OK = R(250, "2.0.0", "Ok")
SENDER_OK = R(250, "2.1.0", "Ok")
RCPT_OK = R(250, "2.1.5", "Ok")
START_DATA = R(354, None, "End data with <CR><LF>.<CR><LF>")
VRFY_CANNOT = R(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = R(214, "2.0.0", "See RFC 5321 and https://www.rfc-editor.org/rfc/rfc5321")
STARTTLS_GO = R(220, "2.0.0", "Ready to start TLS")

# -- sequence, syntax, unknown
BAD_SEQUENCE = R(503, "5.5.1", "Error: bad sequence of commands")
NEED_HELO = R(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_MAIL = R(503, "5.5.1", "Error: need MAIL command")
NESTED_MAIL = R(503, "5.5.1", "Error: nested MAIL command")
NEED_RCPT = R(503, "5.5.1", "Error: need RCPT command")
NO_VALID_RECIPIENTS = R(554, "5.5.1", "Error: no valid recipients")
DATA_AFTER_BDAT = R(503, "5.5.1", "Error: DATA not allowed after BDAT in one transaction")
BINARYMIME_NEEDS_BDAT = R(503, "5.5.1", "Error: BODY=BINARYMIME requires BDAT")
TLS_ACTIVE = R(503, "5.5.1", "Error: TLS already active")
SYNTAX_ERROR = R(501, "5.5.2", "Syntax error in parameters or arguments")
UNKNOWN_COMMAND = R(500, "5.5.2", "Error: command not recognized")
NOT_IMPLEMENTED = R(502, "5.5.1", "Error: command not implemented")
LINE_TOO_LONG = R(500, "5.5.6", "Error: line too long")
BAD_CHARACTERS = R(500, "5.5.2", "Error: bad characters in command line")
BARE_NEWLINE_COMMAND = R(500, "5.5.2", "Error: bare <CR> or <LF> in command line")
EHLO_SYNTAX = R(501, "5.5.4", "Syntax: EHLO hostname")
HELO_SYNTAX = R(501, "5.5.4", "Syntax: HELO hostname")
MAIL_SYNTAX = R(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = R(501, "5.5.4", "Syntax: RCPT TO:<address>")
BDAT_SYNTAX = R(501, "5.5.4", "Syntax: BDAT count [LAST]")
NO_ARGUMENTS = R(501, "5.5.4", "Syntax error: no arguments allowed")

# -- parameters (RFC 1870, 3461, 6152, 6531)
UNKNOWN_PARAMETER = R(555, "5.5.4", "Error: unsupported parameter")
DUPLICATE_PARAMETER = R(501, "5.5.4", "Error: duplicate parameter")
BAD_SENDER_SYNTAX = R(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = R(501, "5.1.3", "Bad recipient address syntax")
NEED_SMTPUTF8 = R(553, "5.6.7", "Error: SMTPUTF8 is required for non-ASCII addresses")

# -- limits and content
SIZE_EXCEEDED = R(552, "5.3.4", "Error: message file too big")
TOO_MANY_RECIPIENTS = R(452, "4.5.3", "Error: too many recipients")
BARE_NEWLINE_DATA = R(550, "5.6.11", "Error: bare <LF> or <CR> not allowed in message content")
TOO_MANY_HOPS = R(554, "5.4.6", "Error: too many hops (mail forwarding loop)")
TEXT_LINE_TOO_LONG = R(550, "5.6.0", "Error: message has a line longer than allowed")

# -- policy defaults
RELAY_DENIED = R(554, "5.7.1", "Relay access denied")

# -- transient, internal
INTERNAL_ERROR = R(451, "4.3.0", "Error: internal error, try again later")
QUEUE_UNAVAILABLE = R(451, "4.3.0", "Queue temporarily unavailable, try again later")
INSUFFICIENT_STORAGE = R(452, "4.3.1", "Insufficient system storage, try again later")  # ENOSPC, EDQUOT
TLS_NOT_AVAILABLE = R(454, "4.7.0", "TLS not available due to temporary reason")  # for issue 4 (TLS)


def greeting(hostname: str, banner: str | None) -> Reply:
    """220 greeting: the hostname, then the configured banner text (RFC 2034: no enhanced code here)."""
    return R(220, None, f"{hostname} {banner or 'ESMTP exmta'}")


def closing(hostname: str) -> Reply:
    return R(221, "2.0.0", f"{hostname} closing connection")


def queued(queue_id: str) -> Reply:
    return R(250, "2.0.0", f"Ok: queued as {queue_id}")


def too_many_errors(hostname: str) -> Reply:
    return R(421, "4.7.0", f"{hostname} Error: too many errors")


def timeout(hostname: str) -> Reply:
    return R(421, "4.4.2", f"{hostname} Error: timeout exceeded")


def shutting_down(hostname: str) -> Reply:
    return R(421, "4.3.2", f"{hostname} Service shutting down")


def size_declared_too_big(limit: int) -> Reply:
    return R(552, "5.3.4", f"Error: message size exceeds fixed limit of {limit} octets")


def helo_ok(hostname: str) -> Reply:
    """250 to HELO: RFC 2034 forbids an enhanced code in HELO/EHLO replies."""
    return R(250, None, hostname)


def ehlo_ok(hostname: str, extensions: list[str]) -> Reply:
    return R(250, None, hostname, *extensions)


def non_smtp_command() -> Reply:
    """Sent before closing on HTTP-style commands (cross-protocol attacks)."""
    return R(221, "2.7.0", "Error: non-SMTP command, goodbye")


def default_reply(verdict: Verdict) -> Reply:
    """The reply for a refusing verdict that names none."""
    if verdict.reply is not None:
        return verdict.reply
    if verdict.action is Action.REJECT:
        return Reply.make(550, "5.7.1", "Rejected")
    if verdict.action is Action.DISCONNECT:
        return Reply.make(421, "4.7.0", "Closing connection")
    return Reply.make(451, "4.7.1", "Try again later")
