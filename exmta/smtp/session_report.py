"""What an SMTP session tells the operator: log lines, the metrics observer, the protocol log.

The TLS a session negotiated (recorded in ``session.tls`` for the Received header and tracking,
counted, logged once), the metrics events (exmta.observe.metrics: session_opened,
session_timed_out, tls_started, auth_failed), the protocol log's view of each parser event, and
the one log line at the end of a session (no line at its start: the end line names the peer).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from exmta.model import TLSInfo
from exmta.smtp.wire import ChunkEnd, Command, DataEnd, InvalidLine

if TYPE_CHECKING:
    from exmta.smtp.server import ESMTPServer

__all__ = ["fill_tls_info", "log_event", "log_session_end", "observe"]


def fill_tls_info(server: ESMTPServer) -> None:
    """Record the negotiated TLS version and cipher once the handshake is done (first command over TLS)."""
    assert server.session is not None
    get_handle = getattr(server.transport, "getHandle", None)
    try:
        conn: Any = get_handle() if get_handle is not None else None  # (Any: not None once version is set)
        version = conn.get_protocol_version_name() if conn is not None else None
        cipher = conn.get_cipher_name() if conn is not None else None
    except Exception:
        version = cipher = None
    if not version or not cipher:
        return
    subject = None
    try:
        cert = conn.get_peer_certificate()
        if cert is not None:
            subject = cert.to_cryptography().subject.rfc4514_string()  # X509.get_subject is deprecated
    except Exception:
        subject = None
    server.session.tls = TLSInfo(version, cipher, subject)
    observe(server, "tls_started", version)
    if server._plog is not None:
        server._plog.tls(version, cipher, subject)
    server.log.info("session {session_id}: TLS {tls_version} {tls_cipher}", session_id=server._sid,
                    tls_version=version, tls_cipher=cipher)


def observe(server: ESMTPServer, event: str, *args: Any) -> None:
    """Tell the factory's session observer (metrics) ``event``(connector, *args); never raises."""
    observer = server.factory.session_observer
    if observer is not None:
        try:
            getattr(observer, event)(server.config.name, *args)
        except Exception:
            server.log.failure("session observer failed on {event}", event=event)


def log_event(server: ESMTPServer, event: Any) -> None:
    """One parser event in the protocol log (the content itself is not logged)."""
    if isinstance(event, Command):
        server._plog.command(event.raw)
    elif isinstance(event, (DataEnd, ChunkEnd)):
        server._plog.data(event.size, "DATA" if isinstance(event, DataEnd) else "BDAT")
    elif isinstance(event, InvalidLine):
        server._plog.command(event.raw, invalid=event.reason)


def log_session_end(server: ESMTPServer) -> None:
    """The one log line of a session, at its end: peer, duration, messages and queue ids, errors, commands."""
    if server.session is not None:
        queued = " ".join(server._queued_ids)
        if server.messages > len(server._queued_ids):
            queued += f" +{server.messages - len(server._queued_ids)} more"
        fields = dict(
            session_id=server._sid, duration=server.clock.seconds() - server.session.started,
            messages=server.messages, queued=f" queued ({queued})" if queued else "", errors=server.errors,
            peer_ip=server.session.peer_ip, peer_port=server.session.peer_port, connector=server.config.name,
            commands=" ".join(f"{verb.lower()}={n}" for verb, n in server._verbs.items()) or "no commands",
        )
        # rendered here (an f-string) rather than by the log observer's str.Formatter, which cost
        # more than the rest of the session's teardown; the fields stay in the event
        text = (f"session {fields['session_id']} end after {fields['duration']:.3f}s: "
                f"{fields['peer_ip']}:{fields['peer_port']} on {fields['connector']}, "
                f"{fields['messages']} message(s){fields['queued']}, {fields['errors']} error(s), "
                f"{fields['commands']}")
        if server._refused_rcpts.count:  # one summary instead of a line per refusal (issue 11 item 7)
            fields["refused_recipients"] = server._refused_rcpts.count
            text += f", {server._refused_rcpts.count} refused recipient(s)"
        server.log.info(text.replace("{", "{{").replace("}", "}}"), session_end=True, **fields)
