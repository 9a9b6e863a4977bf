"""The status page: queues, the quarantine, throughput and latency of the last hour, active alerts, tracking search.

One self-contained HTML page rendered on the server: graphs are inline SVG,
there is no script and nothing is fetched from elsewhere (the Content
Security Policy says so), so it works on an isolated admin network and in a
text-mode browser. Mount it in the admin API (behind its authentication:
the search shows addresses) as ``status``; ``?q=...`` searches the message
tracking log.

Search: the admin API may pass its own ``search(query, limit)`` function;
otherwise :func:`search_tracking_log` reads the live log and its rotated
files newest first (:mod:`exmta.admin.status.newest`), stopping at 100
matches or after 64 MiB, and does a case-insensitive match of every word of
the query against a record's queue id, Message-ID, sender, recipients,
event id and connector (``key:value`` words restrict to one field).
Corrupt or truncated lines are skipped and counted, never fatal. The search
runs on a thread pool (``run_blocking``), at most :data:`MAX_SEARCHES` at a
time; more waiting than :data:`MAX_WAITING` get 503.
"""
from __future__ import annotations

import html
import time
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web import resource, server

from exmta.admin.client import age_text
from exmta.admin.status.newest import MAX_BYTES, search_newest
from exmta.admin.status.quarantine import render_quarantine

__all__ = ["StatusResource", "render_status", "search_tracking_log", "svg_lines"]

log = Logger()

MAX_SEARCHES = 2   # tracking searches running at once (each on a pool thread)
MAX_WAITING = 8    # more queued than this: 503

SEARCH_FIELDS = ("queue_id", "message_id", "sender", "recipients", "event_id", "connector", "remote_host")
_COLOURS = {"received": "#1f77b4", "delivered": "#2ca02c", "deferred": "#ff7f0e", "bounced": "#d62728",
            "rejected": "#7f7f7f", "latency": "#9467bd", "queued": "#17becf"}


class SearchError(ValueError):
    """The query cannot be understood; the message says how to write it."""


def parse_query(query: str) -> list[tuple[str | None, str]]:
    """``"bob@x event:DEFER"`` -> [(None, "bob@x"), ("event_id", "defer")]."""
    terms: list[tuple[str | None, str]] = []
    aliases = {"event": "event_id", "id": "queue_id", "msgid": "message_id", "from": "sender",
               "to": "recipients", "rcpt": "recipients"}
    for word in query.split():
        if ":" in word and not word.startswith("<"):
            key, _, value = word.partition(":")
            key = aliases.get(key.lower(), key.lower())
            if key not in SEARCH_FIELDS:
                raise SearchError(f"unknown field {key!r}: use one of {', '.join(SEARCH_FIELDS)} "
                                  "(or event:, from:, to:, id:, msgid:)")
            if not value:
                raise SearchError(f"{word!r}: a value is needed after the colon")
            terms.append((key, value.lower()))
        else:
            terms.append((None, word.lower()))
    if len(terms) > 20:
        raise SearchError("at most 20 search words")
    return terms


def _matches(record: dict[str, Any], terms: list[tuple[str | None, str]]) -> bool:
    for key, value in terms:
        fields = [key] if key else list(SEARCH_FIELDS)
        found = False
        for f in fields:
            v = record.get(f)
            if v is None:
                continue
            text = " ".join(map(str, v)) if isinstance(v, list) else str(v)
            if value in text.lower():
                found = True
                break
        if not found:
            return False
    return True


def search_tracking_log(path: str, query: str, limit: int = 100,
                        max_bytes: int = MAX_BYTES) -> tuple[list[dict[str, Any]], int]:
    """-> (matching records newest first, number of unreadable lines skipped). Blocking.

    Reads the live log then its rotated files backwards, and stops at
    ``limit`` matches or after ``max_bytes`` (see
    :mod:`exmta.admin.status.newest`; ``exmta track`` reads everything).
    """
    terms = parse_query(query)
    if not terms:
        return [], 0
    words = [value.encode() for _, value in terms]
    maybe = None
    if all(w.isascii() and b'"' not in w and b"\\" not in w for w in words):
        maybe = lambda raw: all(w in raw.lower() for w in words)  # noqa: E731  JSON keeps these as they are
    records, bad, _ = search_newest(path, lambda r: _matches(r, terms), limit, max_bytes, maybe)
    return records, bad


def svg_lines(title: str, series: dict[str, list[float]], width: int = 600, height: int = 154,
              unit: str = "") -> str:
    """An inline SVG line chart; each series is one value per minute, oldest first.

    The title has the first line and the legend a line of its own below it, so
    that a long title never runs into the legend.
    """
    n = max((len(v) for v in series.values()), default=0)
    top = max((max(v) for v in series.values() if v), default=0.0)
    top = top if top > 0 else 1.0
    pad_l, pad_b, pad_t = 40, 18, 30
    w, h = width - pad_l - 4, height - pad_b - pad_t
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" class="chart" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}"><title>{html.escape(title)}</title>',
             f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" fill="#fafafa" stroke="#ccc"/>',
             f'<text x="{pad_l}" y="11" font-size="11">{html.escape(title)}</text>',
             f'<text x="2" y="{pad_t + 9}" font-size="10">{top:.4g}{html.escape(unit)}</text>',
             f'<text x="2" y="{pad_t + h}" font-size="10">0</text>',
             f'<text x="{pad_l}" y="{height - 4}" font-size="10">-60 min</text>',
             f'<text x="{width - 34}" y="{height - 4}" font-size="10">now</text>']
    legend_x = pad_l
    for name, values in series.items():
        colour = _COLOURS.get(name, "#333")
        if n > 1 and values:
            pts = " ".join(
                f"{pad_l + i * w / (n - 1):.1f},{pad_t + h - (v / top) * h:.1f}" for i, v in enumerate(values)
            )
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{pts}" '
                         f'data-series="{html.escape(name)}" data-total="{sum(values):g}"/>')
        parts.append(f'<text x="{legend_x}" y="25" font-size="11" fill="{colour}">{html.escape(name)} '
                     f'({sum(values):g})</text>')
        legend_x += 110
    parts.append("</svg>")
    return "".join(parts)


def render_status(obs: Any, query: str | None = None,
                  search: Callable[[str, int], tuple[list[dict[str, Any]], int]] | None = None) -> str:
    """The whole page as text; ``obs`` is an :class:`exmta.observe.runtime.Observability`."""
    e = html.escape
    now = obs.reactor.seconds()
    config = obs.config
    snap = obs.sampler.snapshot
    out = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
           f"<title>exmta status: {e(config.hostname)}</title>",
           "<style>body{font:14px sans-serif;margin:1em 2em;color:#222}table{border-collapse:collapse;"
           "margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}th{background:#eee}"
           ".firing{color:#b00;font-weight:bold}.none{color:#080}.err{color:#b00}</style></head><body>",
           f"<h1>exmta on {e(config.hostname)}</h1>",
           f"<p>Status at {e(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(now)))}; "
           f"{'stopping' if obs.stopping else 'running' if obs.started else 'starting'}.</p>"]

    # alerts
    out.append('<h2>Alerts</h2><div id="alerts">')
    active = list(obs.alerts.active.values()) if obs.alerts is not None else []
    if not active:
        out.append('<p class="none">No active alerts.</p>')
    else:
        out.append("<table><tr><th>Alert</th><th>Kind</th><th>Value</th><th>Threshold</th><th>Since</th>"
                   "<th>Detail</th></tr>")
        for a in active:
            out.append(f'<tr class="firing alert"><td>{e(a.rule.name)}</td><td>{e(a.rule.kind)}</td>'
                       f"<td>{a.value:g}</td><td>{a.rule.threshold:g}</td><td>{age_text(now - a.since)} ago</td>"
                       f"<td>{e(a.detail)}</td></tr>")
        out.append("</table>")
    out.append("</div>")

    # queues
    out.append('<h2>Queues</h2><div id="queues">')
    if snap is None:
        out.append("<p>The queue has not been listed yet.</p>")
    else:
        out.append(f"<p>Listed {age_text(now - snap.taken_at)} ago: <b id=\"queued-total\">{snap.total}</b> "
                   "message(s); oldest " + (age_text(snap.oldest_age(now)) if snap.oldest else "none") + ".</p>")
        out.append("<table><tr><th>Queue</th><th>Messages</th></tr>")
        for q in ("incoming", "active", "deferred", "hold"):
            out.append(f'<tr class="queue"><td>{q}</td><td>{snap.by_queue.get(q, 0)}</td></tr>')
        out.append("</table><table><tr><th>Next hop</th><th>Messages</th><th>Oldest</th><th>Last error</th></tr>")
        if not snap.by_nexthop:
            out.append('<tr><td colspan="4">nothing waiting</td></tr>')
        for hop, count in sorted(snap.by_nexthop.items(), key=lambda x: (-x[1], x[0])):
            oldest = snap.oldest_by_nexthop.get(hop)
            out.append(f'<tr class="nexthop"><td>{e(hop)}</td><td>{count}</td>'
                       f"<td>{age_text(now - oldest) if oldest else ''}</td>"
                       f'<td class="err">{e(snap.last_error.get(hop) or "")}</td></tr>')
        out.append("</table>")
    out.append("</div>")
    out.append(render_quarantine(getattr(snap, "quarantine", None) if snap is not None else None, now))

    # graphs
    series = obs.throughput.series(now)
    flows = {k: [float(b[k]) for _, b in series] for k in ("received", "delivered", "deferred", "bounced")}
    latency = [b["latency"][0] / b["latency"][1] if b["latency"][1] else 0.0 for _, b in series]
    queued = _queue_per_minute(obs.history, [t for t, _ in series], obs.throughput.step)
    out.append('<h2>Last hour</h2><div id="graphs">')
    out.append(svg_lines("Messages per minute", flows))
    out.append(svg_lines("Mean delivery latency per minute", {"latency": latency}, unit="s"))
    out.append(svg_lines("Messages queued", {"queued": queued}))
    out.append("</div>")

    # search
    out.append('<h2>Message tracking</h2><form method="get" action="">'
               f'<input type="search" name="q" size="60" value="{e(query or "")}" '
               'placeholder="address, Message-ID, queue id; event:DEFER from:... to:...">'
               ' <button type="submit">Search</button></form><div id="results">')
    if query:
        try:
            if search is not None:
                records, bad = search(query, 100)
            else:
                records, bad = search_tracking_log(obs.paths["tracking"], query)
        except SearchError as err:
            out.append(f'<p class="err" id="search-error">Cannot search: {e(str(err))}</p>')
        else:
            out.append(f"<p>{len(records)} event(s) found"
                       + (f"; {bad} unreadable line(s) skipped" if bad else "") + ".</p>")
            if records:
                out.append("<table><tr><th>Time</th><th>Event</th><th>Queue id</th><th>Sender</th>"
                           "<th>Recipients</th><th>Connector</th><th>Reply</th></tr>")
                for r in records:
                    ts = r.get("timestamp")
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if isinstance(ts, (int, float)) else ""
                    rcpts = r.get("recipients")
                    rcpts = ", ".join(map(str, rcpts)) if isinstance(rcpts, list) else str(rcpts or "")
                    out.append(f'<tr class="event"><td>{e(when)}</td><td>{e(str(r.get("event_id", "")))}</td>'
                               f'<td>{e(str(r.get("queue_id", "")))}</td><td>{e(str(r.get("sender", "")))}</td>'
                               f'<td>{e(rcpts)}</td><td>{e(str(r.get("connector", "") or ""))}</td>'
                               f'<td>{e(str(r.get("reply", "") or ""))}</td></tr>')
                out.append("</table>")
    out.append("</div></body></html>")
    return "".join(out)


def _queue_per_minute(history: Iterable[tuple[float, int]], minutes: list[float], step: float) -> list[float]:
    """The last queue size sampled in each minute (carried forward over minutes without a sample)."""
    samples = sorted(history)
    out, i, last = [], 0, 0.0
    for m in minutes:
        while i < len(samples) and samples[i][0] < m + step:
            last = float(samples[i][1])
            i += 1
        out.append(last)
    return out


class StatusResource(resource.Resource):
    """``GET status[?q=...]``: the page. Mount it behind the admin API's authentication."""

    isLeaf = True

    def __init__(self, obs: Any, search: Callable[[str, int], tuple[list[dict[str, Any]], int]] | None = None,
                 run_blocking: Callable[..., defer.Deferred[Any]] | None = None):
        super().__init__()
        self.obs = obs
        self.search = search
        if run_blocking is None:
            reactor = getattr(obs, "reactor", None)
            if reactor is not None and hasattr(reactor, "getThreadPool"):
                run_blocking = lambda f, *a: deferToThreadPool(reactor, reactor.getThreadPool(), f, *a)  # noqa: E731
            else:
                run_blocking = lambda f, *a: defer.maybeDeferred(f, *a)  # noqa: E731
        self.run_blocking = run_blocking
        self.searches = defer.DeferredSemaphore(MAX_SEARCHES)

    def _headers(self, request: Any) -> None:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy",
                          b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-frame-options", b"DENY")

    def _find(self, query: str, limit: int) -> tuple[list[dict[str, Any]], int] | SearchError:
        """The search (blocking, on a pool thread); a SearchError is returned, to be shown."""
        try:
            if self.search is not None:
                return self.search(query, limit)
            return search_tracking_log(self.obs.paths["tracking"], query, limit)
        except SearchError as e:
            return e

    def render_GET(self, request: Any) -> Any:
        q = request.args.get(b"q", [b""])[0].decode("utf-8", "replace").strip()[:500]
        self._headers(request)
        if not q:
            return render_status(self.obs, None, self.search).encode("utf-8")
        if len(self.searches.waiting) >= MAX_WAITING:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"retry-after", b"5")
            return b"too many tracking searches at once; try again in a few seconds\n"
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda f: gone.append(True))
        d = self.searches.run(self.run_blocking, self._find, q, 100)

        def show(found: Any) -> None:
            if gone:
                return

            def precomputed(query: str, limit: int) -> tuple[list[dict[str, Any]], int]:
                if isinstance(found, SearchError):
                    raise found
                return found

            request.write(render_status(self.obs, q, precomputed).encode("utf-8"))
            request.finish()

        def failed(f: Any) -> None:
            log.failure("status page: tracking search failed", f)
            if not gone:
                request.setResponseCode(500)
                request.write(b"the search failed; see the server log\n")
                request.finish()

        d.addCallbacks(show, failed)
        return server.NOT_DONE_YET
