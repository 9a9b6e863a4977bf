"""The ``exmta explain`` and ``exmta diagnose`` subcommands (argument parsing and output only)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_commands"]


def add_commands(sub: Any) -> None:
    """Register ``explain`` and ``diagnose`` on the ``exmta`` parser's subparsers object."""
    ex = sub.add_parser("explain", help="what an SMTP reply means and what to do about it")
    ex.add_argument("reply", help='the reply, e.g. "550 5.7.68 TenantInboundAttribution; Rejecting"')
    ex.add_argument("--json", action="store_true", help="print JSON")
    ex.set_defaults(func=_explain)
    from exmta.diagnose.command import add_diagnose_parser

    add_diagnose_parser(sub)


def _explain(args: argparse.Namespace) -> int:
    """Exit 0 with an explanation, 1 when the reply has no code we can explain."""
    from exmta.diagnose.explain import explain

    found = explain(args.reply)
    if args.json:
        print(json.dumps({"reply": args.reply, "explanation": found.to_json() if found else None}, indent=2))
        return 0 if found else 1
    if found is None:
        print(f"exmta explain: no SMTP reply code in {args.reply!r}", file=sys.stderr)
        return 1
    width = 9
    for label, value in (("code", found.code), ("vendor", found.vendor), ("title", found.title),
                         ("meaning", found.meaning), ("action", found.action), ("source", found.source)):
        print(f"{label + ':':<{width}} {value}")
    return 0
