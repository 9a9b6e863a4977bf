"""``exmta quarantine list|show|release|delete|export``: the quarantine through the admin API.

Exit codes as ``exmta queue``: 0 done, 1 not found (or not in quarantine),
2 usage or refused, 3 the server cannot be reached.
"""
from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from typing import Any

from exmta.admin.client import (EXIT_OK, EXIT_USAGE, AdminClient, CommandError, _checked, _table,
                                admin_client_options, age_text)
from exmta.textsafe import escape_controls, escape_controls_json

__all__ = ["add_quarantine_parser"]


def print_list(body: dict[str, Any]) -> str:
    rows = [[m["queue_id"], age_text(m.get("age")), str(m["size"]), m["sender"] or "<>",
             ",".join(m["recipients"]), (m.get("held_reason") or "")[:90]] for m in body["messages"]]
    if not rows:
        return "The quarantine is empty.\n"
    return _table(["QUEUE ID", "AGE", "SIZE", "SENDER", "RECIPIENTS", "REASON"], rows)


def print_one(m: dict[str, Any]) -> str:
    lines = [f"Queue id:     {m['queue_id']}",
             f"Reason:       {m.get('held_reason')}",
             f"Message-ID:   {m.get('message_id') or '-'}",
             f"Subject:      {m.get('subject') or '-'}",
             f"Sender:       {m['sender'] or '<>'}",
             f"Recipients:   {', '.join(r['address'] for r in m['recipients'])}",
             f"Size:         {m['size']} octets",
             f"Received:     {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(m['received_at']))} "
             f"from {m.get('client_ip') or 'local'} on {m.get('connector') or '-'} ({age_text(m.get('age'))} ago)"]
    return "\n".join(lines) + "\n"


def _do(client: AdminClient, args: argparse.Namespace) -> Any:
    a = args.action
    if a == "list":
        query = {k: v for k, v in (("reason", args.reason), ("sender", args.sender), ("recipient", args.recipient),
                                   ("older_than", args.older_than), ("newer_than", args.newer_than)) if v}
        body = _checked(*client.call("GET", "quarantine", query)[:2])
        return body if args.json else print_list(body)
    if a == "show":
        body = _checked(*client.call("GET", f"quarantine\0{args.queue_id}")[:2])
        return body if args.json else print_one(body)
    if a == "export":
        status, body, _ = client.call("GET", f"quarantine\0{args.queue_id}\0eml")
        return _checked(status, body)
    if a in ("release", "delete"):
        who: dict[str, str] = {}
        if a == "release":
            who = {"by": _login(), **({"to": args.to} if args.to else {})}
        body = _checked(*client.call("POST", f"quarantine\0{args.queue_id}\0{a}", who or None)[:2])
        if args.json:
            return body
        if a == "release":
            return f"Message {args.queue_id} released to {', '.join(body['recipients'])}.\n"
        return f"Message {args.queue_id} deleted.\n"
    raise CommandError(f"unknown action {a}", EXIT_USAGE)


def _login() -> str:
    """Who runs the command (recorded in the release's tracking event)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _command(args: argparse.Namespace) -> int:
    try:
        out = _do(AdminClient.from_args(args), args)
    except CommandError as e:
        print(f"exmta quarantine {args.action}: {e}", file=sys.stderr)
        return e.code
    if isinstance(out, bytes):
        if args.output and args.output != "-":
            from exmta.filemodes import private_opener

            with open(args.output, "wb", opener=private_opener) as f:  # 0600: it is mail
                if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    os.fchmod(f.fileno(), 0o600)
                f.write(out)
        else:
            sys.stdout.buffer.write(out)
            sys.stdout.flush()
    elif isinstance(out, str):
        sys.stdout.write(escape_controls(out, keep="\n"))  # reasons and subjects come from other hosts
    else:
        print(escape_controls_json(json.dumps(out, indent=1, ensure_ascii=False)))
    return EXIT_OK


def add_quarantine_parser(sub: Any) -> None:
    q = sub.add_parser("quarantine", help="see, release, delete and export quarantined messages",
                       description="Quarantined messages (held by a filter or a transport rule, with the "
                                   "reason) through the admin API. Exit codes: 0 done, 1 not found, "
                                   "2 usage or refused, 3 server unreachable.")
    common = admin_client_options()
    actions = q.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    p = actions.add_parser("list", parents=[common], help="quarantined messages, filtered")
    p.add_argument("--reason", help="reason contains this (no case), e.g. 'macro' or 'virus'")
    p.add_argument("--sender", help="sender contains this")
    p.add_argument("--recipient", help="a recipient contains this")
    p.add_argument("--older-than", metavar="AGE", help="older than AGE (3600, 2h, 7d)")
    p.add_argument("--newer-than", metavar="AGE", help="newer than AGE")
    for name, text in (("show", "one quarantined message and its reason"),
                       ("release", "deliver it to its original recipients (or to --to)"),
                       ("delete", "delete it (no report to the sender)")):
        p = actions.add_parser(name, parents=[common], help=text)
        p.add_argument("queue_id", metavar="QUEUE_ID")
        if name == "release":
            p.add_argument("--to", metavar="ADDR[,ADDR]",
                           help="deliver to these recipients instead of the original ones")
    p = actions.add_parser("export", parents=[common], help="write it as .eml (X-Sender/X-Receiver added)")
    p.add_argument("queue_id", metavar="QUEUE_ID")
    p.add_argument("-o", "--output", metavar="FILE", help="write here (default: standard output)")
    q.set_defaults(func=_command)
