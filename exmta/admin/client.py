"""``exmta queue ...``: queue commands that talk to the running server's admin API.

Where the server is and the token come from, in order: ``--url`` /
``--token-file`` / ``$EXMTA_ADMIN_TOKEN``, else the server's configuration
(``-c FILE``, or ``--data DIR`` with the embedded default): the first
``[admin] listen`` endpoint and ``[admin] token_file`` (default
``<data_dir>/admin.token``).

Exit codes: 0 done, 1 not found (unknown queue or message), 2 usage or a
refused request (bad argument, 401, 403, 409), 3 the server cannot be
reached. Errors go to stderr and say what to do next.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import stat
import sys
import time
import urllib.parse
from typing import Any

from exmta.textsafe import escape_controls, escape_controls_json

__all__ = ["AdminClient", "CommandError", "add_queue_parser", "age_text", "load_config_for"]

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class CommandError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def load_config_for(args: argparse.Namespace) -> Any:
    from exmta.config.load import ConfigError, embedded_default, load_config

    try:
        if getattr(args, "config", None):
            return load_config(args.config, data_dir=getattr(args, "data", None))
        return embedded_default(getattr(args, "data", None) or "./exmta-data")
    except ConfigError as e:
        raise CommandError(str(e), EXIT_USAGE) from None


def _split_endpoint(text: str) -> list[str]:
    """Twisted's endpoint syntax: colons separate, backslash escapes."""
    parts, cur, escaped = [], "", False
    for ch in text:
        if escaped:
            cur += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def url_for_endpoint(endpoint: str) -> str:
    """``tcp:8025:interface=127.0.0.1`` -> ``http://127.0.0.1:8025``; ``unix:/p`` -> ``unix:/p``."""
    parts = _split_endpoint(endpoint)
    kind, rest = parts[0], parts[1:]
    positional = [p for p in rest if "=" not in p]
    options = dict(p.split("=", 1) for p in rest if "=" in p)
    if kind == "unix":
        return "unix:" + (options.get("address") or positional[0])
    port = options.get("port") or (positional[0] if positional else "")
    host = options.get("interface") or ("::1" if kind == "tcp6" else "127.0.0.1")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


class AdminClient:
    """A small blocking HTTP client for the admin API (a command line tool may block)."""

    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        self.url = url
        self.token = token
        self.timeout = timeout

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AdminClient:
        from exmta.admin.token import read_token, token_path

        url, token_file, config = args.url, args.token_file, None
        if url is None or (token_file is None and not os.environ.get("EXMTA_ADMIN_TOKEN")):
            config = load_config_for(args)
            if url is None:
                if not config.admin.enabled or not config.admin.listen:
                    raise CommandError(f"{config.source}: the admin API is disabled ([admin] enabled = false); "
                                       "enable it and restart the server", EXIT_USAGE)
                url = url_for_endpoint(config.admin.listen[0])
        token = os.environ.get("EXMTA_ADMIN_TOKEN") if token_file is None else None
        if not token:
            path = token_file or token_path(config.data_dir, config.admin.token_file)
            try:
                token = read_token(path)
            except FileNotFoundError:
                raise CommandError(
                    f"no admin token at {path}: the server creates it on its first start; give -c CONFIG or "
                    "--data DIR of the running server, or --token-file FILE", EXIT_USAGE) from None
            except PermissionError:
                raise CommandError(f"cannot read the admin token {path}: run as the server's user (or root)",
                                   EXIT_USAGE) from None
            except (OSError, ValueError) as e:
                raise CommandError(f"cannot read the admin token {path}: {e}", EXIT_USAGE) from None
        return cls(url, token, args.timeout)

    def _connection(self) -> http.client.HTTPConnection:
        if self.url.startswith("unix:"):
            return _UnixConnection(self.url[5:], self.timeout)
        u = urllib.parse.urlsplit(self.url)
        if u.scheme != "http" or not u.hostname:
            raise CommandError(f"--url {self.url!r}: use http://HOST:PORT or unix:/PATH", EXIT_USAGE)
        return http.client.HTTPConnection(u.hostname, u.port or 80, timeout=self.timeout)

    def call(self, method: str, path: str, query: dict[str, str] | None = None) -> tuple[int, Any, str]:
        """-> (status, decoded JSON or raw bytes, content type). CommandError(3) when unreachable."""
        target = "/api/" + "/".join(urllib.parse.quote(p, safe="") for p in path.split("\0"))
        if query:
            target += "?" + urllib.parse.urlencode(query)
        conn = self._connection()
        try:
            conn.request(method, target, headers={"Authorization": f"Bearer {self.token}",
                                                  "Accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise CommandError(f"cannot reach the admin API at {self.url}: {e}. Is the server running "
                               "(twistd exmta), and is this its configuration ([admin] listen)?",
                               EXIT_UNREACHABLE) from None
        finally:
            conn.close()
        ctype = resp.getheader("content-type", "")
        if ctype.startswith("application/json"):
            try:
                return resp.status, json.loads(body), ctype
            except ValueError:
                pass
        return resp.status, body, ctype


def _checked(status: int, body: Any) -> Any:
    if status == 200:
        return body
    message = body.get("error", "") if isinstance(body, dict) else str(body)[:200]
    hint = body.get("hint") if isinstance(body, dict) else None
    text = f"{message}" + (f" ({hint})" if hint else "")
    if status == 404:
        raise CommandError(text, EXIT_NOT_FOUND)
    if status == 401:
        raise CommandError(f"the server refused the admin token: {text}. Use the token_file of the running "
                           "server (-c CONFIG / --data DIR / --token-file)", EXIT_USAGE)
    if status == 403:
        raise CommandError(f"{text}", EXIT_USAGE)
    if status in (400, 405, 409):
        raise CommandError(text, EXIT_USAGE)
    raise CommandError(f"the server answered {status}: {text}", EXIT_UNREACHABLE)


# ---------------------------------------------------------------- output


def age_text(seconds: float | None) -> str:
    """A short age for tables and the status page: ``42s``, ``5m``, ``3h07m``, ``2d4h`` (``-`` if unknown)."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600}h"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(headers), *(fmt(r) for r in rows)]) + "\n"


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    return "now" if ts <= now else f"in {age_text(ts - now)}"


def print_queues(body: dict[str, Any]) -> str:
    now = body.get("time") or time.time()
    rows = [[q["queue"], q["status"], str(q["messages"]), age_text(q["oldest_age"]), _when(q.get("next_retry"), now),
             (q.get("last_error") or "")[:100]] for q in body["queues"]]
    if not rows:
        return "The queue is empty.\n"
    return _table(["QUEUE", "STATUS", "MESSAGES", "OLDEST", "NEXT RETRY", "LAST ERROR"], rows)


def print_messages(body: dict[str, Any]) -> str:
    rows = [[m["queue_id"], m["state"], age_text(m.get("age")), str(m["size"]), m["sender"] or "<>",
             ",".join(m["pending"]) or "-", (m.get("last_error") or m.get("held_reason") or "")[:80]]
            for m in body["messages"]]
    if not rows:
        return "No messages.\n"
    return _table(["QUEUE ID", "STATE", "AGE", "SIZE", "SENDER", "PENDING", "LAST ERROR"], rows)


def print_message(m: dict[str, Any]) -> str:
    lines = [f"Queue id:     {m['queue_id']}",
             f"State:        {m['state']}" + (" (being delivered)" if m.get("being_delivered") else ""),
             f"Queues:       {', '.join(m['queues']) or '-'}",
             f"Message-ID:   {m.get('message_id') or '-'}",
             f"Subject:      {m.get('subject') or '-'}",
             f"Sender:       {m['sender'] or '<>'}",
             f"Size:         {m['size']} octets",
             f"Received:     {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(m['received_at']))} "
             f"from {m.get('client_ip') or 'local'} on {m.get('connector') or '-'} ({age_text(m.get('age'))} ago)"]
    if m.get("held_reason"):
        lines.append(f"Held:         {m['held_reason']}")
    lines.append("Recipients:")
    for r in m["recipients"]:
        lines.append(f"  {r['address']}  {r['status']}  attempts={r['attempts']}"
                     + (f"  last: {r['last_reply']}" if r.get("last_reply") else ""))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- commands


def _queue_cmd(args: argparse.Namespace) -> int:
    try:
        client = AdminClient.from_args(args)
        out = _do(client, args)
    except CommandError as e:
        print(f"exmta queue {args.action}: {e}", file=sys.stderr)
        return e.code
    if isinstance(out, bytes):
        if args.output and args.output != "-":
            from exmta.filemodes import private_opener

            with open(args.output, "wb", opener=private_opener) as f:  # a new file is 0600: it is mail
                if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    os.fchmod(f.fileno(), 0o600)  # and so is a file that was there
                f.write(out)
        else:
            sys.stdout.buffer.write(out)
            sys.stdout.flush()
    elif getattr(args, "json", False) and not isinstance(out, str):
        print(escape_controls_json(json.dumps(out, indent=1, ensure_ascii=False)))
    elif isinstance(out, str):
        sys.stdout.write(escape_controls(out, keep="\n"))  # replies and subjects come from other hosts
    return EXIT_OK


def _one_target(args: argparse.Namespace) -> tuple[str, str]:
    """suspend/resume take a QUEUE or --message ID, not both."""
    if bool(args.queue) == bool(args.message):
        raise CommandError("give a QUEUE (see `exmta queue list`) or --message QUEUE_ID, not both", EXIT_USAGE)
    return ("message", args.message) if args.message else ("queue", args.queue)


def _do(client: AdminClient, args: argparse.Namespace) -> Any:
    a = args.action
    if a == "list":
        body = _checked(*client.call("GET", "queues")[:2])
        return body if args.json else print_queues(body)
    if a == "messages":
        query = {k: v for k, v in (("queue", args.queue), ("state", args.state)) if v}
        body = _checked(*client.call("GET", "messages", query)[:2])
        return body if args.json else print_messages(body)
    if a == "show":
        body = _checked(*client.call("GET", f"messages\0{args.queue_id}")[:2])
        return body if args.json else print_message(body)
    if a == "export":
        status, body, _ = client.call("GET", f"messages\0{args.queue_id}\0eml")
        return _checked(status, body)
    if a == "retry":
        body = _checked(*client.call("POST", f"queues\0{args.queue}\0retry")[:2])
        return body if args.json else f"{body['retried']} message(s) in {args.queue} are due now.\n"
    if a in ("suspend", "resume"):
        kind, target = _one_target(args)
        body = _checked(*client.call("POST", f"{kind}s\0{target}\0{a}")[:2])
        if args.json:
            return body
        if kind == "message":
            return f"Message {target} {'suspended (held)' if a == 'suspend' else 'resumed'}.\n"
        extra = f" {body.get('retried', 0)} message(s) due now." if a == "resume" else ""
        return f"Queue {target} {'suspended' if a == 'suspend' else 'resumed'}.{extra}\n"
    if a == "remove":
        body = _checked(*client.call("POST", f"messages\0{args.queue_id}\0remove",
                                     {"ndr": "1" if args.ndr else "0"})[:2])
        if args.json:
            return body
        how = f"with a non-delivery report ({body['dsn_queue_id']})" if body.get("ndr") else "without a report"
        return f"Message {args.queue_id} removed {how}.\n"
    if a == "redirect":
        if args.stop:
            body = _checked(*client.call("DELETE", "redirect")[:2])
            return body if args.json else "Redirect stopped; mail is routed normally again.\n"
        if not args.target:
            raise CommandError("give a TARGET host[:port] (or --stop)", EXIT_USAGE)
        body = _checked(*client.call("POST", "redirect", {"target": args.target})[:2])
        return body if args.json else (f"All queued mail now goes to {body['redirect']}; "
                                       f"{body['retried']} deferred message(s) due now.\n")
    raise CommandError(f"unknown action {a}", EXIT_USAGE)


def admin_client_options() -> argparse.ArgumentParser:
    """The options every command that talks to the admin API takes (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE", help="the server's TOML configuration")
    common.add_argument("--data", metavar="DIR", help="the server's data directory (embedded default config)")
    common.add_argument("--url", help="admin API: http://HOST:PORT or unix:/PATH (default: [admin] listen)")
    common.add_argument("--token-file", metavar="FILE",
                        help="admin token file (default: [admin] token_file; or $EXMTA_ADMIN_TOKEN)")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server")
    common.add_argument("--json", action="store_true", help="print the API's JSON answer")
    return common


def add_queue_parser(sub: Any) -> None:
    q = sub.add_parser(
        "queue", help="see and manage the queues of the running server",
        description="Queue commands (Exchange's Get-Queue, Retry-Queue, Suspend-/Resume-Queue, Get-Message, "
                    "Remove-Message, Export-Message, Redirect-Message) through the admin API. Exit codes: "
                    "0 done, 1 unknown queue or message, 2 usage or refused, 3 server unreachable.",
    )
    common = admin_client_options()
    actions = q.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("list", parents=[common], help="queues by next hop: messages, oldest, last error")
    p = actions.add_parser("messages", parents=[common], help="list queued messages")
    p.add_argument("--queue", help="only this queue (as `list` names it)")
    p.add_argument("--state", choices=("incoming", "active", "deferred", "hold"), help="only this state")
    p = actions.add_parser("show", parents=[common], help="one message: envelope, recipients, last replies")
    p.add_argument("queue_id", metavar="QUEUE_ID")
    p = actions.add_parser("retry", parents=[common], help="make a queue's deferred messages due now")
    p.add_argument("queue", metavar="QUEUE")
    for name, text in (("suspend", "stop delivering a queue, or hold one message"),
                       ("resume", "resume a suspended queue, or release a held message")):
        p = actions.add_parser(name, parents=[common], help=text)
        p.add_argument("queue", metavar="QUEUE", nargs="?")
        p.add_argument("--message", metavar="QUEUE_ID", help="a message instead of a queue")
    p = actions.add_parser("remove", parents=[common], help="delete a message, with --ndr also tell the sender")
    p.add_argument("queue_id", metavar="QUEUE_ID")
    p.add_argument("--ndr", action="store_true", help="send a non-delivery report to the sender")
    p = actions.add_parser("export", parents=[common], help="write a message as .eml (X-Sender/X-Receiver added)")
    p.add_argument("queue_id", metavar="QUEUE_ID")
    p.add_argument("-o", "--output", metavar="FILE", help="write here (default: standard output)")
    p = actions.add_parser("redirect", parents=[common], help="send all queued mail to another host (drain)")
    p.add_argument("target", metavar="TARGET", nargs="?", help="host, host:port or [ip]:port")
    p.add_argument("--stop", action="store_true", help="stop redirecting")
    q.set_defaults(func=_queue_cmd)
