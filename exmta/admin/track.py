"""``exmta track``: search the message tracking log, as Exchange's Get-MessageTrackingLog.

Reads the live log and its rotated files (oldest first, see
:func:`exmta.observe.rotation.log_files`) straight from disk, so it works
while the server is stopped. Filters combine with AND; ``--recipient`` and
``--sender`` match the whole address case-insensitively (``*`` wildcards
allowed), ``--message-id`` with or without angle brackets. Events are printed
in time order. A corrupt or truncated line is skipped with one warning on
stderr naming the file and line; it never stops the search.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import fnmatch
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from exmta.model import TrackingEventId
from exmta.observe.rotation import log_files
from exmta.textsafe import escape_controls, escape_controls_json

__all__ = ["Filter", "FilterError", "add_track_parser", "read_events", "search"]

EVENT_IDS = tuple(e.value for e in TrackingEventId)
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class FilterError(ValueError):
    """A search filter that cannot be understood; the message says how to write it."""


def parse_time(text: str, now: float) -> float:
    """``2026-11-28T09:30:00Z``, ``2026-11-28 09:30``, ``2026-11-28``, epoch seconds, or ``2h`` (ago)."""
    t = text.strip()
    m = _RELATIVE.match(t)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(t)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise FilterError(f"{text!r} is not a time: use 2026-11-28T09:30:00Z, 2026-11-28, "
                          "epoch seconds, or an age such as 30m, 2h, 7d") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _address_pattern(value: str) -> str:
    v = value.strip().strip("<>").lower()
    if not v:
        raise FilterError("an empty address matches nothing; give an address such as bob@contoso.example")
    return v


@dataclass
class Filter:
    """Get-MessageTrackingLog's parameters; every one given must match."""

    sender: str | None = None
    recipients: list[str] = field(default_factory=list)
    message_id: str | None = None
    queue_id: str | None = None
    events: set[str] = field(default_factory=set)
    connector: str | None = None
    start: float | None = None
    end: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, now: float) -> Filter:
        f = cls()
        if args.sender is not None:
            f.sender = _address_pattern(args.sender)
        f.recipients = [_address_pattern(r) for r in args.recipient or ()]
        if args.message_id is not None:
            mid = args.message_id.strip()
            if not mid.strip("<>"):
                raise FilterError("--message-id is empty")
            f.message_id = mid if mid.startswith("<") else f"<{mid}>"
        if args.queue_id is not None:
            if not re.fullmatch(r"[0-9A-Za-z]{1,64}", args.queue_id):
                raise FilterError(f"--queue-id {args.queue_id!r} is not a queue id (letters and digits, "
                                  "as shown by `exmta queue messages`)")
            f.queue_id = args.queue_id.upper()
        for e in args.event or ():
            for name in e.split(","):
                name = name.strip().upper()
                if name not in EVENT_IDS:
                    raise FilterError(f"unknown event {name!r}: use one of {', '.join(EVENT_IDS)}")
                f.events.add(name)
        f.connector = args.connector
        if args.start is not None:
            f.start = parse_time(args.start, now)
        if args.end is not None:
            f.end = parse_time(args.end, now)
        if f.start is not None and f.end is not None and f.start > f.end:
            raise FilterError("--start is after --end")
        return f

    def matches(self, rec: dict[str, Any]) -> bool:
        ts = rec.get("timestamp")
        if not isinstance(ts, (int, float)):
            return False
        if self.start is not None and ts < self.start:
            return False
        if self.end is not None and ts > self.end:
            return False
        if self.events and rec.get("event_id") not in self.events:
            return False
        if self.queue_id is not None and self.queue_id not in (
                str(rec.get("queue_id", "")).upper(), str(rec.get("dsn_queue_id", "")).upper()):
            return False
        if self.message_id is not None and str(rec.get("message_id", "")) != self.message_id:
            return False
        if self.connector is not None and rec.get("connector") != self.connector:
            return False
        if self.sender is not None and not fnmatch.fnmatchcase(str(rec.get("sender", "")).lower(), self.sender):
            return False
        if self.recipients:
            have = [str(r).lower() for r in rec.get("recipients") or ()]
            if not all(any(fnmatch.fnmatchcase(h, want) for h in have) for want in self.recipients):
                return False
        return True


def read_events(path: str, warn: TextIO | None = None) -> Iterator[dict[str, Any]]:
    """Every well-formed record of the log at ``path`` and its rotated files, file order then line order."""
    for name in log_files(path):
        try:
            f = open(name, "rb")
        except OSError as e:
            if warn is not None:
                print(f"exmta track: warning: cannot read {name}: {e.strerror}", file=warn)
            continue
        with f:
            for number, raw in enumerate(f, 1):
                try:
                    rec = json.loads(raw.decode("utf-8"))
                    if not isinstance(rec, dict) or "event_id" not in rec or "timestamp" not in rec:
                        raise ValueError("not a tracking record")
                except (ValueError, UnicodeDecodeError):
                    if warn is not None and raw.strip():
                        print(f"exmta track: warning: {name}:{number}: skipped a corrupt or truncated line",
                              file=warn)
                    continue
                yield rec


def search(path: str, flt: Filter, warn: TextIO | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Matching records in time order (stable: same-time events keep their log order)."""
    out = [rec for rec in read_events(path, warn) if flt.matches(rec)]
    out.sort(key=lambda r: r["timestamp"])
    if limit is not None and len(out) > limit:
        out = out[-limit:]
    return out


def history(path: str, flt: Filter, warn: TextIO | None = None) -> list[dict[str, Any]]:
    """One message's whole story: every event with its queue id(s) or Message-ID, and its DSNs."""
    first = search(path, flt, warn)
    if flt.queue_id is not None:
        ids = {flt.queue_id}  # that message (and the DSN event that created it), not its parent's story
    else:
        ids = {str(r.get("queue_id", "")).upper() for r in first if r.get("queue_id")}
    if not ids:
        return first
    out = [r for r in read_events(path, None)
           if str(r.get("queue_id", "")).upper() in ids or str(r.get("dsn_queue_id", "")).upper() in ids]
    out.sort(key=lambda r: r["timestamp"])
    return out


# ---------------------------------------------------------------- output

COLUMNS = ("time", "event", "queue_id", "source", "connector", "sender", "recipients", "reply")


def _time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _row(rec: dict[str, Any]) -> dict[str, str]:
    reply = rec.get("reply") or ""
    extra = []
    if rec.get("remote_host"):
        extra.append(f"host={rec['remote_host']}")
    if rec.get("latency") is not None:
        extra.append(f"latency={rec['latency']}s")
    if rec.get("dsn_queue_id"):
        extra.append(f"dsn={rec['dsn_queue_id']}")
    if rec.get("reason"):
        extra.append(f"reason={rec['reason']}")
    if rec.get("filter"):  # AGENTINFO, and a REJECT/DROP decided by a filter
        extra.append(f"agent={rec['filter']}")
    for key in ("phase", "verdict", "header_edits"):
        if rec.get("event_id") == "AGENTINFO" and rec.get(key):
            extra.append(f"{key}={rec[key]}")
    if rec.get("tls_version"):
        extra.append(f"tls={rec['tls_version']}")
    if isinstance(rec.get("recipient_sets"), dict):  # TRANSFER: one message per recipient set (routing/split.py)
        extra.append("sets=" + "; ".join(f"{c}: {','.join(r)}" for c, r in rec["recipient_sets"].items()))
    if rec.get("auth_user"):  # the SMTP AUTH identity of a RECEIVE or REJECT
        extra.append(f"user={rec['auth_user']}")
    return {
        "time": _time(rec["timestamp"]), "event": str(rec.get("event_id", "")),
        "queue_id": str(rec.get("queue_id", "")), "source": str(rec.get("source") or ""),
        "connector": str(rec.get("connector") or ""), "sender": str(rec.get("sender", "")),
        "recipients": ",".join(str(r) for r in rec.get("recipients") or ()),
        "reply": " ".join(p for p in (reply, *extra) if p),
    }


def format_table(records: list[dict[str, Any]]) -> str:
    rows = [_row(r) for r in records]
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in COLUMNS}
    widths["reply"] = len("reply")  # last column: not padded
    line = lambda r: "  ".join(r[c].ljust(widths[c]) if c != "reply" else r[c] for c in COLUMNS)  # noqa: E731
    header = {c: c.upper() for c in COLUMNS}
    return "\n".join([line(header).rstrip(), *(line(r).rstrip() for r in rows)]) + "\n"


def format_csv(records: list[dict[str, Any]]) -> str:
    keys = ["timestamp", "event_id", "queue_id", "message_id", "source", "connector", "sender", "recipients",
            "size", "remote_host", "reply", "tls_version", "tls_cipher", "latency"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for rec in records:
        w.writerow(["|".join(rec.get(k) or ()) if k == "recipients" else
                    ("" if rec.get(k) is None else rec.get(k)) for k in keys])
    return buf.getvalue()


def format_json(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


# ---------------------------------------------------------------- command


def _cluster_database(args: argparse.Namespace) -> tuple[str, float] | None:
    """(dsn, connect timeout) when the configuration keeps the queue in PostgreSQL, else None."""
    if not args.config:
        return None
    from exmta.admin.client import load_config_for

    config = load_config_for(args)
    if config.queue.store != "postgres":
        return None
    return config.postgres.dsn, config.postgres.connect_timeout


def cluster_search(db: tuple[str, float], flt: Filter, limit: int | None = None) -> list[dict[str, Any]]:
    """search() over the cluster's tracking table (exmta.observe.pgtracking)."""
    from exmta.observe.pgtracking import search_cluster

    out = [rec for rec in search_cluster(db[0], {flt.queue_id} if flt.queue_id else None, flt.message_id,
                                         flt.start, flt.end, db[1]) if flt.matches(rec)]
    if limit is not None and len(out) > limit:
        out = out[-limit:]
    return out


def cluster_history(db: tuple[str, float], flt: Filter) -> list[dict[str, Any]]:
    """history() over the cluster's tracking table."""
    from exmta.observe.pgtracking import search_cluster

    first = cluster_search(db, flt)
    ids = {flt.queue_id} if flt.queue_id else {str(r.get("queue_id", "")).upper() for r in first if r.get("queue_id")}
    if not ids:
        return first
    return list(search_cluster(db[0], ids, connect_timeout=db[1]))


def tracking_path(args: argparse.Namespace) -> str:
    """--log, else [server] tracking_log / <data_dir>/log/tracking.jsonl from --config / --data."""
    if args.log:
        return args.log
    from exmta.admin.client import load_config_for

    config = load_config_for(args)
    if config.tracking_log:
        return os.path.abspath(config.tracking_log)
    return os.path.join(os.path.abspath(config.data_dir), "log", "tracking.jsonl")


def _run(args: argparse.Namespace) -> int:
    import time

    from exmta.admin.client import CommandError

    try:
        flt = Filter.from_args(args, time.time())
        path = tracking_path(args)
    except FilterError as e:
        print(f"exmta track: {e}", file=sys.stderr)
        return 2
    except CommandError as e:
        print(f"exmta track: {e}", file=sys.stderr)
        return e.code
    whole = args.history or (args.message_id or args.queue_id) and not (
        args.sender or args.recipient or args.event or args.connector or args.start or args.end)
    cluster = None if args.log else _cluster_database(args)
    if cluster is not None:  # several nodes: every node's events, from the shared database
        try:
            records = cluster_history(cluster, flt) if whole else cluster_search(cluster, flt, args.limit)
        except Exception as e:
            print(f"exmta track: PostgreSQL: {type(e).__name__}: {e} (--log FILE searches this node's log)",
                  file=sys.stderr)
            return 1
    else:
        if not log_files(path):
            print(f"exmta track: no tracking log at {path} (give --log FILE, or -c CONFIG / --data DIR of the "
                  "server)", file=sys.stderr)
            return 1
        records = history(path, flt, sys.stderr) if whole else search(path, flt, sys.stderr, args.limit)
    if not records:
        print("exmta track: no matching events", file=sys.stderr)
        return 1
    out = {"table": format_table, "csv": format_csv, "json": format_json}[args.format](records)
    # remote replies may hold terminal escapes: shown escaped (JSON stays valid JSON)
    sys.stdout.write(escape_controls_json(out) if args.format == "json" else escape_controls(out, keep="\n"))
    return 0


def add_track_parser(sub: Any) -> None:
    p = sub.add_parser(
        "track", help="search the message tracking log (Get-MessageTrackingLog)",
        description="Search the message tracking log and its rotated files. Filters combine with AND. "
                    "With only --message-id or --queue-id, prints that message's whole history in order "
                    "(including its DSNs). Exit codes: 0 found, 1 nothing found, 2 bad filter.",
        epilog="examples:\n  exmta track --message-id '<abc@contoso.example>'\n"
               "  exmta track --recipient bob@fabrikam.example --event DEFER,FAIL --start 2h\n"
               "  exmta track --sender '*@contoso.example' --start 2026-11-28 --format csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sender", metavar="ADDR", help="envelope sender (* wildcards allowed)")
    p.add_argument("--recipient", metavar="ADDR", action="append", help="a recipient (repeatable; * allowed)")
    p.add_argument("--message-id", metavar="ID", help="Message-ID header, with or without <>")
    p.add_argument("--queue-id", metavar="QID", help="internal queue id")
    p.add_argument("--event", metavar="EVENT", action="append",
                   help=f"event id(s), comma separated: {', '.join(EVENT_IDS)}")
    p.add_argument("--connector", metavar="NAME", help="receive or send connector name")
    p.add_argument("--start", metavar="TIME", help="from this time (ISO 8601 UTC, epoch, or an age: 2h, 7d)")
    p.add_argument("--end", metavar="TIME", help="until this time")
    p.add_argument("--history", action="store_true",
                   help="show the whole history of every message that matches")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most the last N events")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format")
    p.add_argument("--log", metavar="FILE", help="the tracking log (default: from the configuration)")
    p.add_argument("-c", "--config", metavar="FILE", help="the server's TOML configuration")
    p.add_argument("--data", metavar="DIR", help="the server's data directory (with the embedded default config)")
    p.set_defaults(func=_run)
