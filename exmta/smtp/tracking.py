"""Message tracking events of an SMTP session (Exchange's message tracking log, exmta.observe.tracking).

RECEIVE for a queued message, with an AGENTINFO per filter that edited or quarantined it; REJECT or
DROP for a message or recipient refused or discarded; AGENTINFO for a filter's verdict at any phase.
Each call is a no-op without a tracker and never raises: a tracker failure is logged, the mail goes on.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from exmta.model import Action, Address, Envelope, Reply, TrackingEvent, TrackingEventId, Transaction, Verdict
from exmta.smtp.replies import default_reply

if TYPE_CHECKING:
    from exmta.smtp.server import ESMTPServer

__all__ = ["clean_header_value", "qualified", "track_agent", "track_received", "track_refusal"]


def clean_header_value(value: Any) -> str | None:
    """A header value as valid text: raw 8-bit octets (surrogate escapes) become UTF-8 or U+FFFD."""
    if value is None:
        return None
    text = re.sub(r"\r?\n(?=[ \t])", "", str(value)).strip()  # RFC 5322 unfolding
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def qualified(server: ESMTPServer, rcpt: Address) -> str:
    """The envelope form of a recipient; a bare ``<postmaster>`` gets the postmaster domain."""
    if rcpt.domain:
        return str(rcpt)
    return f"{rcpt.local}@{server.factory.postmaster_domain or server.config.hostname}"


def track_refusal(server: ESMTPServer, event_id: TrackingEventId, txn: Transaction, writer: Any,
                  reply: Reply | None, why: str, rcpt: Address | None = None, filter_name: str | None = None) -> None:
    """A REJECT (or DROP, for DISCARD) tracking event for a message, or one recipient ``rcpt``, not queued."""
    tracker = server.factory.tracker
    if tracker is None:
        return
    details = {"session_id": server._sid, "reason": why}
    if server.session is not None and server.session.auth_identity:
        details["auth_user"] = server.session.auth_identity
    if filter_name:
        details["filter"] = filter_name
    try:
        tracker.track(TrackingEvent(
            event_id, getattr(writer, "queue_id", ""), server.clock.seconds(),
            sender=str(txn.sender),
            recipients=(qualified(server, rcpt),) if rcpt is not None else
            tuple(qualified(server, a) for a, _ in txn.recipients),
            size=getattr(writer, "size", None), connector=server.config.name, source="SMTP",
            remote_host=server.session.peer_ip if server.session else None,
            reply=str(reply) if reply is not None else None,
            details=details,
        ))
    except Exception:
        server.log.failure("tracker failed for a refused message")


def track_agent(server: ESMTPServer, phase: str, verdict: Verdict, sender: str = "", rcpt: Address | None = None,
                txn: Transaction | None = None, writer: Any = None, view: Any = None) -> None:
    """An AGENTINFO event for a filter's verdict other than CONTINUE: which filter, phase, verdict, reply."""
    tracker = server.factory.tracker
    if tracker is None or not verdict.filter_name or verdict.action in (Action.CONTINUE, Action.ACCEPT):
        return
    try:
        if rcpt is not None:
            recipients: tuple[str, ...] = (qualified(server, rcpt),)
        else:
            recipients = tuple(qualified(server, a) for a, _ in txn.recipients) if txn is not None else ()
        tracker.track(TrackingEvent(
            TrackingEventId.AGENTINFO, getattr(writer, "queue_id", ""), server.clock.seconds(),
            sender=sender, recipients=recipients,
            message_id=clean_header_value(next(iter(view.field_values("Message-ID")), None)) if view else None,
            size=getattr(writer, "size", None), connector=server.config.name, source="AGENT",
            remote_host=server.session.peer_ip if server.session else None,
            reply=None if verdict.action is Action.DISCARD else str(default_reply(verdict)),
            details={"session_id": server._sid, "filter": verdict.filter_name, "phase": phase,
                     "verdict": verdict.action.value},
        ))
    except Exception:
        server.log.failure("tracker failed for a filter verdict")


def track_received(server: ESMTPServer, queue_id: str, envelope: Envelope,
                   agents: list[tuple[str, int, str | None]] | None = None,
                   agent_details: dict[str, dict[str, str]] | None = None) -> None:
    """RECEIVE, then an AGENTINFO per filter that edited headers or quarantined (``view.agent_notes``)."""
    tracker = server.factory.tracker
    if tracker is None:
        return
    try:
        tracker.track(TrackingEvent(
            TrackingEventId.RECEIVE, queue_id, envelope.received_at,
            sender=envelope.sender,
            recipients=tuple(r.address for r in envelope.recipients),
            message_id=envelope.message_id, size=envelope.size,
            connector=server.config.name, source="SMTP",
            remote_host=envelope.client_ip,
            tls=(f"{server.session.tls.version} {server.session.tls.cipher}"
                 if server.session and server.session.tls else None),
            details={"session_id": server._sid, "client_helo": envelope.client_helo or "",
                     **({"auth_user": envelope.auth_identity} if envelope.auth_identity else {})},
        ))
        notes = list(agents or ())
        if envelope.held_reason and not any(reason for _, _, reason in notes):
            notes.append(("", 0, envelope.held_reason))  # quarantined outside the chain
        for name, edits, reason in notes:  # Exchange's AGENTINFO: the filter acted but let the message in
            details: dict[str, Any] = {"session_id": server._sid, "phase": "data",
                                       "verdict": "quarantine" if reason else "continue"}
            if name:
                details["filter"] = name
            if edits:
                details["header_edits"] = edits
            if reason:
                details["reason"] = reason
            details.update((agent_details or {}).get(name, {}))  # e.g. the check that decided
            tracker.track(TrackingEvent(
                TrackingEventId.AGENTINFO, queue_id, envelope.received_at, sender=envelope.sender,
                recipients=tuple(r.address for r in envelope.recipients), message_id=envelope.message_id,
                size=envelope.size, connector=server.config.name, source="AGENT", details=details,
            ))
    except Exception:
        server.log.failure("tracker failed for {queue_id}", queue_id=queue_id)
