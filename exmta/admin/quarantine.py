"""The quarantine: held messages an operator works through ``exmta quarantine`` (issue 15).

Quarantined messages are the hold queue's messages that a filter or a
transport rule put there, with their reason (``held_reason``); messages an
operator suspended (``exmta queue suspend --message``) are not quarantine.
Operations (on :class:`~exmta.admin.api.QueueOperations`, so they go through
the same store, scheduler and tracking as the queue commands):

* list, filtered by reason (substring, no case), sender, recipient and age;
* show, export (.eml with X-Sender/X-Receiver), release (delivered to the
  original recipients, or to the ``to`` recipients chosen instead; a
  RESUBMIT tracking event naming the reason, who released it and to whom) and
  delete (a DROP tracking event, no report);
* expiry: quarantined messages older than ``[admin] quarantine_expiry``
  (30 days by default, 0 keeps them) are deleted by a timer.

HTTP (under ``/api``, same token)::

    GET  /api/quarantine[?reason=&sender=&recipient=&older_than=S&newer_than=S&limit=N]
    GET  /api/quarantine/<id>            POST /api/quarantine/<id>/release[?to=a@x,b@y&by=NAME] | delete
    GET  /api/quarantine/<id>/eml        POST /api/quarantine/expire
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.logger import Logger

if TYPE_CHECKING:
    from exmta.admin.api import QueueOperations

__all__ = ["OPERATOR_HOLD", "dispatch", "expire", "is_quarantine", "quarantined", "add_expiry_timer"]

log = Logger()

#: the reason `exmta queue suspend --message` gives: an operator's hold, not quarantine
OPERATOR_HOLD = "suspended by an operator"
EXPIRY_CHECK_INTERVAL = 3600.0
MAX_RELEASE_RECIPIENTS = 100


def _api_error(status: int, message: str, hint: str | None = None) -> Exception:
    """exmta.admin.api.ApiError (imported here: the API imports this module when it routes to it)."""
    from exmta.admin.api import ApiError

    return ApiError(status, message, hint)


def is_quarantine(summary: dict[str, Any]) -> bool:
    reason = summary.get("held_reason") or ""
    return summary.get("state") == "hold" and bool(reason) and reason != OPERATOR_HOLD


async def quarantined(ops: QueueOperations, reason: str | None = None, sender: str | None = None,
                      recipient: str | None = None, older_than: float | None = None,
                      newer_than: float | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Quarantined messages matching every filter given (substring matches, no case; ages in seconds)."""
    out = []
    for m in await ops.messages(state="hold", limit=1_000_000):
        if not is_quarantine(m):
            continue
        if reason and reason.lower() not in m["held_reason"].lower():
            continue
        if sender and sender.lower() not in (m["sender"] or "").lower():
            continue
        if recipient and not any(recipient.lower() in r.lower() for r in m["recipients"]):
            continue
        age = m.get("age") or 0.0
        if older_than is not None and age < older_than:
            continue
        if newer_than is not None and age > newer_than:
            continue
        out.append(m)
    return out[:limit]


async def _one(ops: QueueOperations, queue_id: str) -> dict[str, Any]:
    m = await ops.message(queue_id)
    if not is_quarantine(m):
        raise _api_error(404, f"{queue_id} is not in quarantine (it is {m['state']})",
                       "`exmta quarantine list` lists quarantined messages; `exmta queue show` any message")
    return m


def release_recipients(text: str) -> list[str]:
    """The ``to`` of a release: comma-separated addresses (local@domain), checked; ApiError 400 otherwise."""
    out: list[str] = []
    for raw in text.split(","):
        address = raw.strip()
        if not address:
            continue
        local, at, domain = address.rpartition("@")
        if (not at or not local or not domain or len(address) > 254 or "." not in domain.strip("[]") and
                not domain.startswith("[") or any(c.isspace() or c in '<>()",;\\' or ord(c) < 32 for c in address)):
            raise _api_error(400, f"not a mail address: {address!r}", "give addresses as local@domain, "
                             "separated by commas")
        if address.lower() not in (a.lower() for a in out):
            out.append(address)
    if not out:
        raise _api_error(400, "to: no recipient given", "give addresses as local@domain, separated by commas")
    if len(out) > MAX_RELEASE_RECIPIENTS:
        raise _api_error(400, f"to: more than {MAX_RELEASE_RECIPIENTS} recipients")
    return out


async def release(ops: QueueOperations, queue_id: str, to: list[str] | None = None,
                  by: str | None = None) -> dict[str, Any]:
    """Deliver to the original recipients (or to ``to`` instead); tracked as RESUBMIT with reason, who and whom.

    ``by`` names who released it (the CLI sends the login name; the API adds the client's address).
    """
    m = await _one(ops, queue_id)
    original = [r["address"] for r in m["recipients"]]
    if to:
        from exmta.model import Recipient

        _, env = await ops._read(queue_id)
        chosen = dataclasses.replace(env, recipients=[Recipient(a) for a in to])
        await defer.maybeDeferred(ops.store.hold, queue_id, chosen, env.held_reason)  # the new envelope, still held
    who = by or "an operator"
    await ops.resume_message(queue_id, details={
        "reason": f"released from quarantine by {who}" + (f" to {', '.join(to)}" if to else ""),
        "released_by": who, "released_to": list(to or original), "original_recipients": original})
    log.info("quarantine: {queue_id} released by {who} to {to} ({reason})", queue_id=queue_id, who=who,
             to=", ".join(to or original), reason=m["held_reason"])
    return {"queue_id": queue_id, "released": True, "reason": m["held_reason"], "released_by": who,
            "recipients": list(to or original), "original_recipients": original}


async def delete(ops: QueueOperations, queue_id: str) -> dict[str, Any]:
    """Delete without a report (a DROP tracking event)."""
    m = await _one(ops, queue_id)
    await ops.remove_message(queue_id, False)
    log.info("quarantine: {queue_id} deleted ({reason})", queue_id=queue_id, reason=m["held_reason"])
    return {"queue_id": queue_id, "deleted": True, "reason": m["held_reason"]}


async def expire(ops: QueueOperations, max_age: float) -> dict[str, Any]:
    """Delete quarantined messages older than ``max_age`` seconds (0: keep them all)."""
    deleted = []
    if max_age > 0:
        for m in await quarantined(ops, older_than=max_age):
            try:
                await ops.remove_message(m["queue_id"], False)
            except Exception as e:
                from exmta.admin.api import ApiError

                if not isinstance(e, ApiError):
                    raise
                continue  # released or deleted meanwhile
            deleted.append(m["queue_id"])
    if deleted:
        log.info("quarantine expiry: {count} message(s) older than {days:g} days deleted", count=len(deleted),
                 days=max_age / 86400)
    return {"expired": deleted}


def add_expiry_timer(parent: Any, ops: QueueOperations, max_age: float, clock: Any) -> TimerService | None:
    """A timer that runs :func:`expire` every hour (none when ``max_age`` is 0)."""
    if max_age <= 0:
        return None

    def run() -> defer.Deferred[Any]:
        d = defer.Deferred.fromCoroutine(expire(ops, max_age))
        d.addErrback(lambda f: log.failure("quarantine expiry failed", f))
        return d

    timer = TimerService(EXPIRY_CHECK_INTERVAL, run)
    timer.clock = clock
    timer.setName("quarantine-expiry")
    timer.setServiceParent(parent)
    return timer


def _seconds(args: dict[str, str], key: str) -> float | None:
    value = args.get(key)
    if value is None or value == "":
        return None
    from exmta.config.load import parse_duration

    try:
        seconds = parse_duration(value) if not value.replace(".", "", 1).isdigit() else float(value)
    except (TypeError, ValueError):
        raise _api_error(400, f"{key} must be a duration such as 3600, 2h or 7d, not {value!r}") from None
    return seconds


async def dispatch(ops: QueueOperations, method: str, path: list[str], args: dict[str, str],
                   max_age: float = 30 * 86400.0) -> tuple[int, Any]:
    """``/api/quarantine/...`` (``path`` without ``quarantine``); see the module docstring."""
    n = len(path)
    if n == 0 and method == "GET":
        limit = args.get("limit", "1000")
        if not limit.isdigit() or int(limit) < 1:
            raise _api_error(400, f"limit must be a positive whole number, not {limit!r}")
        return 200, {"messages": await quarantined(ops, args.get("reason"), args.get("sender"),
                                                   args.get("recipient"), _seconds(args, "older_than"),
                                                   _seconds(args, "newer_than"), int(limit)),
                     "time": ops.clock.seconds()}
    if n == 1 and path[0] == "expire" and method == "POST":
        return 200, await expire(ops, max_age)
    if n >= 1:
        queue_id = path[0]
        if n == 1 and method == "GET":
            return 200, await _one(ops, queue_id)
        if n == 2 and path[1] == "eml" and method == "GET":
            await _one(ops, queue_id)
            return 200, await ops.export(queue_id)
        if n == 2 and method == "POST" and path[1] == "release":
            to = release_recipients(args["to"]) if args.get("to") is not None else None
            by = " ".join((args.get("by") or "").split())[:100] or None
            peer = args.get("_peer")
            who = f"{by or 'admin API'} (from {peer})" if peer else by
            return 200, await release(ops, queue_id, to, who)
        if n == 2 and method == "POST" and path[1] == "delete":
            return 200, await delete(ops, queue_id)
    raise _api_error(404 if method in ("GET", "POST") else 405,
                   f"no such admin API call: {method} /api/quarantine/{'/'.join(path)}",
                   "see exmta/admin/quarantine.py, or `exmta quarantine --help`")
