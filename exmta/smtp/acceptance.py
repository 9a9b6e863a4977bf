"""End-of-data acceptance: from the last octet of DATA (or BDAT LAST) to the ``250 queued as`` reply.

In order: the wire's verdict (bare newline, over-long line, a failed spool write), the header
block's size, the mail loop (Received count), Exchange's header firewall for untrusted sessions,
send-as on From:, the on_data filters, a filter's body edit, DISCARD, the transport rules, the
header edits, the envelope (no DSN to a forged sender) and ``store.commit``; then the tracking
events and the reply. 250 only once the commit fired; an internal error is 451, never 5xx.

The session (:class:`exmta.smtp.server.ESMTPServer`) calls :func:`finish_message` with the
transaction it has just ended; everything here reads the session, and writes to it only through
its reply and the queued-message count.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from exmta.filters.base import MessageView
from exmta.model import Action, Envelope, Recipient, Reply, TrackingEventId, Transaction
from exmta.smtp import replies
from exmta.smtp.backscatter import anonymous, forged_sender
from exmta.smtp.header_checks import mail_loop, strip_firewalled_headers
from exmta.smtp.limits import HEADER_TOO_BIG, header_refusal
from exmta.smtp.tracking import clean_header_value, qualified, track_agent, track_received, track_refusal

if TYPE_CHECKING:
    from exmta.smtp.server import ESMTPServer

__all__ = ["finish_message", "refuse_message", "refuse_oversize"]


async def finish_message(server: ESMTPServer, size: int, bare_newline: bool, line_too_long: bool) -> None:
    """End of data: check, run on_data filters, apply header edits, commit, then answer."""
    assert server.session is not None
    writer, txn = server._writer, server.txn
    discard, write_failed = server._txn_discard, server._write_failed
    server._writer = None
    server._reset_transaction()
    if writer is None or txn is None:
        server._reply(replies.INTERNAL_ERROR)
        return
    try:
        if bare_newline:
            refuse_message(server, writer, txn, replies.BARE_NEWLINE_DATA, "bare newline")
            return
        if line_too_long:
            refuse_message(server, writer, txn, replies.TEXT_LINE_TOO_LONG, "line too long")
            return
        if write_failed:
            refuse_message(server, writer, txn, write_failed if isinstance(write_failed, Reply) else
                           replies.INTERNAL_ERROR, "write failed")
            return
        view = MessageView(writer.open_read, size=writer.size, head=getattr(writer, "head", None))
        too_big = header_refusal(view, server.config.max_header_size, server.config.max_header_field)
        if too_big is not None:  # before anything parses the block (issue 11 items 1 and 12)
            refuse_message(server, writer, txn, HEADER_TOO_BIG, too_big)
            return
        loop = mail_loop(view, server.factory.max_hops)
        if loop is not None:
            refuse_message(server, writer, txn, replies.TOO_MANY_HOPS, loop)
            return
        if not server.factory.trusted(server.session):
            strip_firewalled_headers(view, server.factory.firewalled_header_prefixes)
        if server.factory.authenticator is not None:  # send-as on From: (exmta.auth.smtp)
            refusal = server.factory.authenticator.check_message(server, view)
            if refusal is not None:
                refuse_message(server, writer, txn, refusal, "send-as: From: not granted")
                return
        verdict = await server.factory.filters.on_data(server.session, txn.view(), view)
        track_agent(server, "data", verdict, sender=str(txn.sender), txn=txn, writer=writer, view=view)
        if server._closing:  # the client left, or we closed (timeout, shutdown): it cannot get a 250
            writer.abort()
            return
        if verdict.action in (Action.REJECT, Action.TEMPFAIL, Action.DISCONNECT):
            writer.abort()
            track_refusal(server, TrackingEventId.REJECT, txn, writer, replies.default_reply(verdict), "filter",
                          filter_name=verdict.filter_name)
            server._refused(verdict)
            return
        new_body = getattr(view, "new_body", None)
        if new_body is not None:  # a filter's body edit (exmta.malware: strip)
            writer.replace_headers(writer.size, view.raw_headers + b"\r\n" + new_body)
        if discard or verdict.action is Action.DISCARD:
            writer.abort()
            server.log.info("session {session_id}: message {queue_id} discarded",
                            session_id=server._sid, queue_id=writer.queue_id)
            by_filter = verdict.filter_name if verdict.action is Action.DISCARD else None
            track_refusal(server, TrackingEventId.DROP, txn, writer, None,
                          "filter" if by_filter else "discarded by policy", filter_name=by_filter)
            server._reply(replies.queued(writer.queue_id))
            return
        rules = None
        if server.factory.transport_rules is not None:  # exmta.rules.hook: one call, a decision plus its edits
            rules = await server.factory.transport_rules.at_end_of_data(server.session, txn.view(), view, writer)
            if server._closing or rules.reply is not None or rules.discard:
                writer.abort()
                if not server._closing:
                    track_refusal(server, TrackingEventId.REJECT if rules.reply else TrackingEventId.DROP, txn,
                                  writer, rules.reply, "transport rule")
                    server._reply(rules.reply or replies.queued(writer.queue_id))
                return
        view.apply_edits(writer)
        message_id = next(iter(view.field_values("Message-ID")), None)
        forged = forged_sender(server.session, txn) if txn.sender and \
            anonymous(server.session, server.factory) else None
        if forged:  # no DSN to a sender known to be forged
            server.log.info("session {session_id}: {why}: no DSN for this message", session_id=server._sid, why=forged)
        envelope = Envelope(
            sender=str(txn.sender),
            recipients=[Recipient(qualified(server, a), ("NEVER",) if forged else p.notify, p.orcpt)
                        for a, p in txn.recipients],
            params=txn.params,
            queue_id=writer.queue_id,
            received_at=server.clock.seconds(),
            connector=server.config.name,
            client_ip=server.session.peer_ip,
            client_helo=server.session.helo_name,
            auth_identity=server.session.auth_identity,
            message_id=clean_header_value(message_id),
            size=writer.size,
            held_reason=getattr(view, "quarantine_reason", None),
        )
        envelope = view.edit_envelope(envelope)  # filters' recipient edits (exmta.milter)
        if rules is not None:
            envelope = rules.envelope(envelope)
        queue_id = await server.factory.store.commit(writer, envelope)
    except Exception as e:
        refusal = server._storage_error(e, "end of data failed")
        writer.abort()
        server._reply(refusal)
        return
    server._count_queued(queue_id)
    track_received(server, queue_id, envelope, view.agent_notes, getattr(view, "agent_details", None))
    if rules is not None:
        rules.committed(queue_id, envelope)  # rule hits tracked, NDR for refused recipients (never raises)
    server._reply(replies.queued(queue_id))


def refuse_message(server: ESMTPServer, writer: Any, txn: Transaction, reply: Reply, why: str) -> None:
    """Refuse the message at end of data: discard it, log, track, answer ``reply``."""
    writer.abort()
    server.log.info("session {session_id}: message refused at end of data: {why}",
                    session_id=server._sid, why=why)
    track_refusal(server, TrackingEventId.REJECT, txn, writer, reply, why)
    server._reply(reply)


def refuse_oversize(server: ESMTPServer) -> None:
    """The message passed max_message_size: refuse it and end the transaction."""
    if server.txn is not None and server._writer is not None:
        track_refusal(server, TrackingEventId.REJECT, server.txn, server._writer, replies.SIZE_EXCEEDED,
                      "message too big")
    server._reset_transaction()
    server._reply(replies.SIZE_EXCEEDED)
