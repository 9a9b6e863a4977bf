"""The admin API: queue operations over authenticated HTTP (twisted.web), behind ``exmta queue``.

Tree (``make_admin_root``)::

    /                 AdminRoot: 403 for a client outside ``allowed_networks``
    /api/...          JSON queue operations (below), bearer token required (401 without)
    /<name>           extra children given by other components (status page, metrics, ...),
                      behind the same token check unless mounted with ``public=True``

Authentication: ``Authorization: Bearer <token>``. HTTP Basic with the
token as password (any user name) is accepted only for ``GET``/``HEAD`` of
children mounted with ``basic=True`` (the read-only status page), so that a
browser's remembered Basic credentials can never reach ``/api`` (CSRF).
State-changing requests with a form content type or a cross-site ``Origin``
/ ``Sec-Fetch-Site`` are refused (:func:`exmta.admin.httpguard.cross_site_refusal`).
The token lives in a file with mode 0600 (see :mod:`exmta.admin.token`). A
Unix socket client is allowed by address (the socket file is 0600) but
still needs the token.

Endpoints (all JSON; errors are ``{"error": "...", "hint": "..."}`` with
400 bad request, 401, 403, 404 unknown queue or message, 409 busy)::

    GET    /api/queues                          queues by next hop: counts, oldest age, last error
    GET    /api/messages[?queue=Q&state=S&limit=N]
    GET    /api/messages/<id>                   one message, its recipients and queues
    GET    /api/messages/<id>/eml               the content (with X-Sender/X-Receiver, as Export-Message)
    POST   /api/queues/<Q>/retry                deferred mail of Q due now
    POST   /api/queues/<Q>/suspend | resume
    POST   /api/messages/<id>/suspend | resume
    POST   /api/messages/<id>/remove[?ndr=1]    delete, with or without a non-delivery report
    POST   /api/redirect?target=host:port       send the whole queue to another host (drain)
    ...    /api/quarantine/...                  quarantined messages (exmta.admin.quarantine)
    DELETE /api/redirect                        stop redirecting

A queue is named ``connector/nexthop`` (or ``connector`` when the connector
chooses the host), like the scheduler's destinations; held messages are in
the queue ``hold``. Percent-encode the slash in a URL path (``%2F``).
"""
from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.address import UNIXAddress
from twisted.logger import Logger
from twisted.web import resource, server

from exmta.admin.httpguard import cross_site_refusal
from exmta.config.smarthost import smarthost
from exmta.model import Envelope, TrackingEvent, TrackingEventId
from exmta.receive.ranges import ip_in

__all__ = ["AdminRoot", "ApiError", "QueueOperations", "make_admin_root", "queue_name"]

HOLD_QUEUE = "hold"
STATES = ("incoming", "active", "deferred", "hold")


class ApiError(Exception):
    """A refused request: HTTP status, what is wrong and what to do."""

    def __init__(self, status: int, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.hint = hint


def queue_name(connector: str, nexthop: str | None) -> str:
    return f"{connector}/{nexthop}" if nexthop else connector


def parse_target(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[ip]:port`` -> (host, port); ValueError when it is not one."""
    try:
        sh = smarthost(text)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e)) from None
    return sh.host, sh.port


def _recipient_json(r: Any) -> dict[str, Any]:
    return {
        "address": r.address, "status": r.status.value, "attempts": r.attempts,
        "last_reply": str(r.last_reply) if r.last_reply is not None else None,
        "last_attempt": r.last_attempt, "next_attempt": r.next_attempt, "route": r.route,
    }


@dataclass
class _Queue:
    name: str
    connector: str | None
    nexthop: str | None
    ids: set[str] = field(default_factory=set)
    states: dict[str, int] = field(default_factory=dict)
    oldest: float | None = None
    oldest_id: str | None = None
    next_retry: float | None = None
    last_error: str | None = None
    last_error_at: float = -1.0


class QueueOperations:
    """What the API does, on the scheduler and the store (no HTTP here, so it is testable alone).

    ``make_redirect_connector(host, port)`` builds the SMTP send connector
    used to drain the queue to another host. ``run_blocking(f, *args)``
    runs a blocking call (file reads) on the thread pool.
    """

    log = Logger()

    def __init__(self, scheduler: Any, store: Any, clock: Any, tracker: Any = None,
                 make_redirect_connector: Callable[[str, int], Any] | None = None,
                 run_blocking: Callable[..., defer.Deferred[Any]] | None = None,
                 connectors: Iterable[str] = ()) -> None:
        self.scheduler = scheduler
        self.store = store
        self.clock = clock
        self.tracker = tracker
        self.make_redirect_connector = make_redirect_connector
        self.run_blocking = run_blocking or (lambda f, *a: defer.maybeDeferred(f, *a))
        self.connectors = set(connectors)

    # ------------------------------------------------------------ reading

    async def _all(self) -> list[tuple[str, Envelope]]:
        out: list[tuple[str, Envelope]] = []
        for state in STATES:
            for env in await defer.maybeDeferred(self.store.list_messages, state):
                out.append((state, env))
        return out

    def _queues_of(self, state: str, env: Envelope) -> list[tuple[str, str | None, str]]:
        if state == "hold":
            return [(HOLD_QUEUE, None, HOLD_QUEUE)]
        return [(r.connector, r.nexthop, queue_name(r.connector, r.nexthop))
                for r in self.scheduler.routes_for(env)]

    async def queues(self) -> list[dict[str, Any]]:
        now = self.clock.seconds()
        queues: dict[str, _Queue] = {}
        for state, env in await self._all():
            for connector, nexthop, name in self._queues_of(state, env):
                q = queues.get(name)
                if q is None:
                    q = queues[name] = _Queue(name, connector if name != HOLD_QUEUE else None, nexthop)
                q.ids.add(env.queue_id)
                q.states[state] = q.states.get(state, 0) + 1
                if q.oldest is None or env.received_at < q.oldest:
                    q.oldest, q.oldest_id = env.received_at, env.queue_id
                for r in env.pending():
                    if state == "deferred" and r.next_attempt is not None:
                        q.next_retry = r.next_attempt if q.next_retry is None else min(q.next_retry, r.next_attempt)
                    if r.last_reply is not None and (r.last_attempt or 0) >= q.last_error_at \
                            and not r.last_reply.is_positive:
                        q.last_error, q.last_error_at = str(r.last_reply), r.last_attempt or 0
                if state == "hold" and env.held_reason:
                    q.last_error = q.last_error or env.held_reason
        for (connector, nexthop), _reason in self.scheduler.suspended_destinations().items():
            name = queue_name(connector, nexthop)
            queues.setdefault(name, _Queue(name, connector, nexthop))
        out = []
        for q in sorted(queues.values(), key=lambda q: (q.name == HOLD_QUEUE, q.name)):
            state = self.scheduler.destination_state(q.connector, q.nexthop) if q.connector else {}
            if state.get("last_error"):
                q.last_error = state["last_error"]
            if q.name == HOLD_QUEUE:
                status = "held"
            elif "suspended_by_operator" in state:
                status = "suspended"
            elif state.get("suspended_until") and state["suspended_until"] > now:
                status = "retry"
            elif q.states.get("active"):
                status = "active"
            elif q.states.get("deferred") and not (q.states.get("incoming")):
                status = "retry"
            else:
                status = "ready"
            out.append({
                "queue": q.name, "connector": q.connector, "nexthop": q.nexthop, "status": status,
                "messages": len(q.ids), "states": q.states,
                "oldest_age": round(now - q.oldest, 1) if q.oldest else None, "oldest_queue_id": q.oldest_id,
                "next_retry": q.next_retry, "last_error": q.last_error,
                "suspended": "suspended_by_operator" in state,
            })
        redirect = self.scheduler.redirect
        if redirect is not None:
            for item in out:
                item["redirected_to"] = redirect[1]
        return out

    def _summary(self, state: str, env: Envelope, now: float) -> dict[str, Any]:
        return {
            "queue_id": env.queue_id, "state": state, "sender": env.sender,
            "recipients": [r.address for r in env.recipients], "pending": [r.address for r in env.pending()],
            "size": env.size, "message_id": env.message_id, "received_at": env.received_at,
            "age": round(now - env.received_at, 1) if env.received_at else None,
            "queues": [name for _, _, name in self._queues_of(state, env)], "held_reason": env.held_reason,
            "last_error": next((str(r.last_reply) for r in env.pending()
                                if r.last_reply is not None and not r.last_reply.is_positive), None),
        }

    async def messages(self, queue: str | None = None, state: str | None = None,
                       limit: int = 1000) -> list[dict[str, Any]]:
        if state is not None and state not in STATES:
            raise ApiError(400, f"unknown state {state!r}", f"use one of {', '.join(STATES)}")
        now = self.clock.seconds()
        out = []
        known = False
        for st, env in await self._all():
            if state is not None and st != state:
                continue
            summary = self._summary(st, env, now)
            if queue is not None:
                if queue not in summary["queues"]:
                    continue
                known = True
            out.append(summary)
        if queue is not None and not known and not self._queue_exists(queue):
            raise ApiError(404, f"no queue {queue!r}", "`exmta queue list` shows the queues")
        return out[:limit]

    def _queue_exists(self, queue: str) -> bool:
        connector = queue.split("/", 1)[0]
        return queue == HOLD_QUEUE or connector in self.connectors

    async def _read(self, queue_id: str) -> tuple[str, Envelope]:
        try:
            return await defer.maybeDeferred(self.store.read, queue_id)
        except KeyError:
            raise ApiError(404, f"no message {queue_id!r} in the queue",
                           "`exmta queue messages` lists queue ids; `exmta track --queue-id` shows "
                           "what happened to a message that has left") from None

    async def message(self, queue_id: str) -> dict[str, Any]:
        state, env = await self._read(queue_id)
        out = self._summary(state, env, self.clock.seconds())
        out.update(
            recipients=[_recipient_json(r) for r in env.recipients], connector=env.connector,
            client_ip=env.client_ip, client_helo=env.client_helo, kind=env.kind, crashes=env.crashes,
            being_delivered=self.scheduler.is_active(queue_id),
        )
        try:
            out["subject"] = await self.run_blocking(self._subject, queue_id)
        except OSError:
            out["subject"] = None
        return out

    def _subject(self, queue_id: str) -> str | None:
        from email.parser import BytesHeaderParser
        from email.policy import default

        with self.store.open_content(queue_id) as f:
            head = f.read(64 * 1024).split(b"\r\n\r\n", 1)[0]
        value = BytesHeaderParser(policy=default).parsebytes(head + b"\r\n\r\n").get("Subject")
        return str(value) if value is not None else None

    async def export(self, queue_id: str) -> bytes:
        state, env = await self._read(queue_id)

        def read() -> bytes:
            with self.store.open_content(queue_id) as f:
                return f.read()

        content = await self.run_blocking(read)
        head = f"X-Sender: <{env.sender}>\r\n" + "".join(f"X-Receiver: <{r.address}>\r\n" for r in env.pending())
        return head.encode("utf-8") + content

    # ------------------------------------------------------------ actions

    def _parse_queue(self, queue: str) -> tuple[str, str | None]:
        connector, _, nexthop = queue.partition("/")
        if queue == HOLD_QUEUE:
            raise ApiError(400, "the hold queue is not delivered",
                           "resume its messages one by one: `exmta queue resume --message ID`")
        if connector not in self.connectors:
            raise ApiError(404, f"no queue {queue!r}: there is no send connector {connector!r}",
                           "`exmta queue list` shows the queues")
        return connector, nexthop or None

    async def retry(self, queue: str) -> dict[str, Any]:
        connector, nexthop = self._parse_queue(queue)
        if (connector, nexthop) in self.scheduler.suspended_destinations():
            raise ApiError(409, f"queue {queue!r} is suspended", f"resume it first: `exmta queue resume {queue}`")
        return await self._retry(lambda name: name == queue, queue, (connector, nexthop))

    async def _retry(self, wanted: Callable[[str], bool], label: str,
                     destination: tuple[str, str | None] | None) -> dict[str, Any]:
        if destination is not None:
            self.scheduler.clear_backoff(*destination)
        now = self.clock.seconds()
        ids = []
        for env in await defer.maybeDeferred(self.store.list_messages, "deferred"):
            if any(wanted(name) for _, _, name in self._queues_of("deferred", env)):
                ids.append(env.queue_id)
        moved = 0
        for queue_id in ids:
            try:
                if await defer.maybeDeferred(self.store.reschedule, queue_id, now):
                    moved += 1
            except KeyError:
                continue  # delivered or removed meanwhile
        self.scheduler.wake()
        self.log.info("retry {queue}: {count} message(s) due now", queue=label, count=moved)
        return {"queue": label, "retried": moved}

    def suspend_queue(self, queue: str) -> dict[str, Any]:
        connector, nexthop = self._parse_queue(queue)
        self.scheduler.suspend_destination(connector, nexthop, "suspended by an operator")
        return {"queue": queue, "suspended": True}

    async def resume_queue(self, queue: str) -> dict[str, Any]:
        connector, nexthop = self._parse_queue(queue)
        if not self.scheduler.resume_destination(connector, nexthop):
            raise ApiError(409, f"queue {queue!r} is not suspended", "`exmta queue list` shows its status")
        result = await self._retry(lambda name: name == queue, queue, (connector, nexthop))
        return {"queue": queue, "suspended": False, "retried": result["retried"]}

    async def suspend_message(self, queue_id: str) -> dict[str, Any]:
        state, env = await self._read(queue_id)
        if state == "hold":
            raise ApiError(409, f"{queue_id} is already suspended ({env.held_reason})",
                           f"`exmta queue resume --message {queue_id}` releases it")
        await defer.maybeDeferred(self.store.hold, queue_id, None, "suspended by an operator")
        return {"queue_id": queue_id, "state": "hold"}

    async def resume_message(self, queue_id: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
        state, env = await self._read(queue_id)
        if state != "hold":
            raise ApiError(409, f"{queue_id} is not suspended (it is {state})",
                           "`exmta queue retry QUEUE` makes deferred mail due now")
        release_now = getattr(self.store, "release_now", None)
        if release_now is not None:
            await defer.maybeDeferred(release_now, queue_id, self.clock.seconds())
        else:
            await defer.maybeDeferred(self.store.release, queue_id)
        self._track(TrackingEventId.RESUBMIT, env, {"reason": "released by an operator",
                                                     "held_reason": env.held_reason, **(details or {})})
        return {"queue_id": queue_id, "state": "incoming"}

    async def remove_message(self, queue_id: str, ndr: bool) -> dict[str, Any]:
        await self._read(queue_id)  # 404 first
        try:
            return await self.scheduler.remove_message(queue_id, ndr)
        except KeyError:
            raise ApiError(404, f"no message {queue_id!r} in the queue", "it may have just been delivered") from None
        except ValueError as e:
            raise ApiError(409, str(e), "try again in a few seconds") from None

    async def redirect(self, target: str | None) -> dict[str, Any]:
        if target is None:
            self.scheduler.set_redirect(None)
            self.log.info("queue redirect stopped")
            return {"redirect": None}
        try:
            host, port = parse_target(target)
        except ValueError as e:
            raise ApiError(400, f"bad target {target!r}: {e}", "give host, host:port or [ip]:port") from None
        if self.make_redirect_connector is None:
            raise ApiError(400, "redirect is not available in this server", None)
        connector = self.make_redirect_connector(host, port)
        label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        name = getattr(connector, "name", None) or "redirect"
        self.scheduler.set_redirect(name, connector, label)
        self.connectors.add(name)
        self.log.info("queue redirected to {target}", target=label)
        result = await self._retry(lambda name: True, "*", None)
        return {"redirect": label, "retried": result["retried"]}

    def _track(self, event_id: TrackingEventId, env: Envelope, details: dict[str, Any]) -> None:
        if self.tracker is None:
            return
        try:
            self.tracker.track(TrackingEvent(
                event_id, env.queue_id, self.clock.seconds(), sender=env.sender,
                recipients=tuple(r.address for r in env.pending()), message_id=env.message_id, size=env.size,
                source="ADMIN", details=details,
            ))
        except Exception:
            self.log.failure("tracker failed for {queue_id}", queue_id=env.queue_id)


# ---------------------------------------------------------------- HTTP


def _json(request: Any, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, ensure_ascii=False, indent=1).encode("utf-8") + b"\n"


def _error(request: Any, status: int, message: str, hint: str | None = None) -> bytes:
    body: dict[str, Any] = {"error": message}
    if hint:
        body["hint"] = hint
    return _json(request, status, body)


class AdminRoot(resource.Resource):
    """The root: every path answers 403 to a client outside ``allowed_networks`` (Unix sockets pass)."""

    def __init__(self, allowed_networks: Iterable[str]) -> None:
        super().__init__()
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allowed_networks]

    def allowed_address(self, address: Any) -> bool:
        if isinstance(address, UNIXAddress):
            return True
        return ip_in(getattr(address, "host", ""), self.allowed)

    def getChildWithDefault(self, path: bytes, request: Any) -> resource.IResource:
        if not self.allowed_address(request.getClientAddress()):
            return _Refusal(403, "your address may not use the admin API",
                            "connect from an address in [admin] allowed_networks (loopback by default)")
        refused = cross_site_refusal(request)
        if refused is not None:
            return _Refusal(refused[0], refused[1], "the admin API takes no forms and no requests from web "
                            "pages; use `exmta queue` or send 'Authorization: Bearer <token>' without a body")
        return super().getChildWithDefault(path, request)

    def render_GET(self, request: Any) -> bytes:
        if not self.allowed_address(request.getClientAddress()):
            return _error(request, 403, "your address may not use the admin API")
        names = sorted(k.decode() for k in self.children)
        return _json(request, 200, {"service": "exmta admin API", "children": names})


class _Refusal(resource.Resource):
    isLeaf = True

    def __init__(self, status: int, message: str, hint: str | None, challenge: bool | str = False) -> None:
        super().__init__()
        self.status, self.message, self.hint, self.challenge = status, message, hint, challenge

    def render(self, request: Any) -> bytes:
        if self.challenge:
            request.responseHeaders.addRawHeader(b"www-authenticate", b'Bearer realm="exmta"')
            if self.challenge == "basic":
                request.responseHeaders.addRawHeader(b"www-authenticate", b'Basic realm="exmta"')
        return _error(request, self.status, self.message, self.hint)


class TokenGuard(resource.Resource):
    """Passes to ``wrapped`` only with the admin token: Bearer; Basic (token as the password) only
    with ``basic=True`` and for GET/HEAD, so remembered browser credentials never change anything."""

    def __init__(self, wrapped: resource.IResource, token: Callable[[], str], basic: bool = False) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.token = token
        self.basic = basic

    def authorized(self, request: Any) -> bool:
        raw = request.getHeader(b"authorization")
        if not raw:
            return False
        header = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        scheme, _, value = header.partition(" ")
        given = ""
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic" and self.basic and request.method.upper() in (b"GET", b"HEAD"):
            try:
                given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return False
        expected = self.token()
        return bool(given) and bool(expected) and hmac.compare_digest(given.encode(), expected.encode())

    def _refusal(self, request: Any) -> resource.IResource:
        return _Refusal(401, "the admin API needs the admin token",
                        "send 'Authorization: Bearer <token>'; the token is in the [admin] token_file "
                        "(default <data_dir>/admin.token); `exmta queue` reads it for you",
                        challenge="basic" if self.basic else True)

    def getChildWithDefault(self, path: bytes, request: Any) -> resource.IResource:
        if not self.authorized(request):
            return self._refusal(request)
        request.prepath.pop()
        request.postpath.insert(0, path)
        return resource.getChildForRequest(self.wrapped, request)

    def render(self, request: Any) -> bytes:
        if not self.authorized(request):
            return self._refusal(request).render(request)
        return self.wrapped.render(request)


class ApiResource(resource.Resource):
    """``/api``: JSON queue operations (module docstring); the work is done by :class:`QueueOperations`."""

    isLeaf = True
    log = Logger()

    def __init__(self, ops: QueueOperations) -> None:
        super().__init__()
        self.ops = ops

    def render(self, request: Any) -> Any:
        method = request.method.decode("ascii", "replace").upper()
        path = [p.decode("utf-8", "replace") for p in request.postpath if p != b""]
        args = {k.decode("utf-8", "replace"): v[-1].decode("utf-8", "replace") for k, v in request.args.items()}
        peer = request.getClientAddress()
        # who asked (set here, over anything the query said): the quarantine's release records it
        args["_peer"] = str(getattr(peer, "host", None) or getattr(peer, "name", None) or "unix socket")
        d = defer.Deferred.fromCoroutine(self._dispatch(method, path, args))

        def done(result: tuple[int, Any]) -> None:
            status, body = result
            if isinstance(body, bytes):
                request.setResponseCode(status)
                request.setHeader(b"content-type", b"message/rfc822")
                request.setHeader(b"content-disposition",
                                  f'attachment; filename="{path[1]}.eml"'.encode("ascii", "replace"))
                request.write(body)
            else:
                request.write(_json(request, status, body))
            request.finish()

        def failed(f: Any) -> None:
            if f.check(ApiError):
                e = f.value
                request.write(_error(request, e.status, e.message, e.hint))
            else:
                self.log.failure("admin API {method} {path} failed", f, method=method, path="/".join(path))
                request.write(_error(request, 500, "internal error (see the server log)"))
            request.finish()

        d.addCallbacks(done, failed)
        d.addErrback(lambda f: None)  # the client went away: nothing to tell it
        return server.NOT_DONE_YET

    async def _dispatch(self, method: str, path: list[str], args: dict[str, str]) -> tuple[int, Any]:
        ops = self.ops
        n = len(path)
        if n >= 1 and path[0] == "quarantine":  # exmta.admin.quarantine (issue 15)
            from exmta.admin.quarantine import dispatch

            return await dispatch(ops, method, path[1:], args, getattr(ops, "quarantine_expiry", 30 * 86400.0))
        if n == 1 and path[0] == "queues" and method == "GET":
            return 200, {"queues": await ops.queues(), "time": ops.clock.seconds()}
        if n == 3 and path[0] == "queues" and method == "POST":
            queue, action = path[1], path[2]
            if action == "retry":
                return 200, await ops.retry(queue)
            if action == "suspend":
                return 200, ops.suspend_queue(queue)
            if action == "resume":
                return 200, await ops.resume_queue(queue)
        if n == 1 and path[0] == "messages" and method == "GET":
            limit = args.get("limit", "1000")
            if not limit.isdigit() or int(limit) < 1:
                raise ApiError(400, f"limit must be a positive whole number, not {limit!r}")
            return 200, {"messages": await ops.messages(args.get("queue"), args.get("state"), int(limit))}
        if n >= 2 and path[0] == "messages":
            queue_id = path[1]
            if n == 2 and method == "GET":
                return 200, await ops.message(queue_id)
            if n == 3 and path[2] == "eml" and method == "GET":
                return 200, await ops.export(queue_id)
            if n == 3 and method == "POST":
                if path[2] == "suspend":
                    return 200, await ops.suspend_message(queue_id)
                if path[2] == "resume":
                    return 200, await ops.resume_message(queue_id)
                if path[2] == "remove":
                    ndr = args.get("ndr", "0").lower()
                    if ndr not in ("0", "1", "true", "false", "yes", "no"):
                        raise ApiError(400, f"ndr must be 1 or 0, not {ndr!r}")
                    return 200, await ops.remove_message(queue_id, ndr in ("1", "true", "yes"))
        if n == 1 and path[0] == "redirect":
            if method == "POST":
                target = args.get("target")
                if not target:
                    raise ApiError(400, "target is missing", "POST /api/redirect?target=host:port")
                return 200, await ops.redirect(target)
            if method == "DELETE":
                return 200, await ops.redirect(None)
        raise ApiError(404 if method in ("GET", "POST", "DELETE") else 405,
                       f"no such admin API call: {method} /api/{'/'.join(path)}",
                       "see exmta/admin/api.py for the calls, or use `exmta queue --help`")


def make_admin_root(ops: QueueOperations, token: Callable[[], str], allowed_networks: Iterable[str],
                    children: dict[bytes, resource.IResource] | None = None,
                    public: dict[bytes, resource.IResource] | None = None) -> AdminRoot:
    """The admin web tree: ``/api`` and ``children`` behind the token, ``public`` without it.

    Every path, public or not, answers 403 outside ``allowed_networks``.
    Other components add children with ``root.putChild(name, TokenGuard(r, root.token))``
    (``basic=True`` only for a read-only page a browser opens).
    """
    root = AdminRoot(allowed_networks)
    root.token = token  # type: ignore[attr-defined]
    root.putChild(b"api", TokenGuard(ApiResource(ops), token))
    for name, child in (children or {}).items():
        root.putChild(name, TokenGuard(child, token))
    for name, child in (public or {}).items():
        root.putChild(name, child)
    return root


def now_iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
