"""``exmta rules check|test|import``: validate a rules file, dry-run a message, import from Exchange."""
from __future__ import annotations

import argparse
import difflib
import email.utils
import re
import sys
import time
from typing import Any

from exmta.config.reader import ConfigError

__all__ = ["add_rules_parser"]


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """(RuleSet, Config or None) from --rules, else the configuration's [transport_rules] file."""
    from exmta.rules.plugins import discover
    from exmta.rules.ruleset import load_rules
    config = None
    if args.config:
        from exmta.config.load import load_config
        config = load_config(args.config)
    path = args.rules or (config.transport_rules.file if config else None)
    if not path:
        raise ConfigError(args.config or "<command line>",
                          ["give --rules FILE, or -c CONFIG with [transport_rules] file"])
    plugins, problems = discover()
    if problems:
        raise ConfigError(path, problems)
    known = (lambda n: n in {s.name for s in config.send}) if config else None
    limits = None
    if config is not None:
        from exmta.message import Limits
        limits = Limits.from_mapping(dict(config.transport_rules.limits))
    return load_rules(path, send_connector_known=known, plugins=plugins, limits=limits), config


def _check(args: argparse.Namespace) -> int:
    from exmta.rules.plugins import discover
    from exmta.rules.ruleset import load_rules
    plugins, problems = discover()
    try:
        if problems:
            raise ConfigError(args.file, problems)
        ruleset = load_rules(args.file, plugins=plugins)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    enabled = sum(1 for r in ruleset.rules if r.enabled)
    print(f"{args.file}: {len(ruleset)} rule(s) OK ({enabled} enabled)")
    return 0


def _test(args: argparse.Namespace) -> int:
    from exmta.message import MimeMessage
    from exmta.rules.context import RuleContext
    try:
        ruleset, config = _load(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    try:
        with open(args.message, "rb") as f:
            raw = re.sub(rb"\r?\n", b"\r\n", f.read())
    except OSError as e:
        print(f"{args.message}: {e.strerror or e}", file=sys.stderr)
        return 2
    internal = {d.lower() for d in args.internal_domain}

    def internal_domain(domain: str) -> bool:
        if config is not None:
            accepted = config.accepted_domain(domain)
            if accepted is not None and accepted.kind != "external_relay":
                return True
        return domain in internal

    sender = args.sender or next((a for _, a in email.utils.getaddresses(
        MimeMessage(raw).header_values("From")) if a), "")
    ctx = RuleContext(MimeMessage(raw, ruleset.limits), sender, tuple(args.to), connector=args.connector or "",
                      client_ip=args.client_ip, authenticated=args.authenticated,
                      trusted=args.authenticated or args.internal_session, source="TEST", scl=args.scl,
                      now=time.time(), internal_domain=internal_domain)
    decision = ruleset.evaluate(ctx)
    out = sys.stdout
    print(f"rules: {ruleset.source} ({len(ruleset)} rule(s))", file=out)
    hits = {h.rule: h for h in decision.hits}
    for rule in ruleset.rules:
        hit = hits.get(rule.name)
        if hit is None:
            state = "not active" if not rule.active(ctx.now) else "no match"
            print(f"  {state}: {rule.name!r}", file=out)
            continue
        print(f"  MATCH: {rule.name!r} ({hit.mode})", file=out)
        for why in hit.matched:
            print(f"      because {why}", file=out)
        if len(hit.recipients) != len(ctx.recipients):
            print(f"      for recipients {', '.join(hit.recipients)}", file=out)
        for action in hit.actions:
            print(f"      -> {action}", file=out)
    if decision.reject is not None:
        print(f"result: rejected: {decision.reject}", file=out)
    elif decision.delete:
        print("result: deleted silently", file=out)
    else:
        final = decision.final_recipients(list(args.to))
        print(f"result: queued for {', '.join(final) or '(nobody)'}", file=out)
        for rcpt, reply in decision.rejected_recipients.items():
            print(f"  refused {rcpt}: {reply} (the sender gets an NDR)", file=out)
        for rcpt in sorted(decision.deleted_recipients):
            print(f"  dropped {rcpt}", file=out)
        if decision.quarantine:
            print(f"  quarantined: {decision.quarantine}", file=out)
        if decision.route_connector:
            print(f"  routed via send connector {decision.route_connector}", file=out)
        if decision.require_tls:
            print("  TLS required for the next hop", file=out)
        if decision.scl is not None:
            print(f"  SCL set to {decision.scl}", file=out)
        for to, _ in decision.incident_reports:
            print(f"  incident report to {to}", file=out)
        for text in decision.events:
            print(f"  event: {text}", file=out)
        if decision.content_changed:
            after = decision.apply_to(raw)
            diff = difflib.unified_diff(
                raw.decode("utf-8", "replace").splitlines(), after.decode("utf-8", "replace").splitlines(),
                "message as received", "message as it would leave", lineterm="")
            print("\n".join(diff), file=out)
        else:
            print("  message unchanged", file=out)
    return 0


def _import(args: argparse.Namespace) -> int:
    from exmta.rules.exchange import import_collection, to_toml
    try:
        with open(args.file, "rb") as f:
            result = import_collection(f.read())
    except (OSError, ValueError) as e:
        print(f"{args.file}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # xml.etree.ElementTree.ParseError
        print(f"{args.file}: not a rule collection export: {e}", file=sys.stderr)
        return 2
    text = to_toml(result, args.file)
    if args.output and args.output != "-":
        try:
            with open(args.output, "x", encoding="utf-8") as f:  # never overwrite a rules file
                f.write(text)
        except OSError as e:
            print(f"{args.output}: {e.strerror or e} (it is never overwritten)", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(text)
    print(f"{len(result.rules)} rule(s) imported", file=sys.stderr)
    for rule, param, why in result.unmapped:
        print(f"  not imported: rule {rule!r}: -{param}: {why}", file=sys.stderr)
    return 1 if result.unmapped else 0


def add_rules_parser(sub: Any) -> None:
    rules = sub.add_parser("rules", help="transport rules: check a rules file, dry-run a message, import")
    rsub = rules.add_subparsers(dest="rules_command", metavar="ACTION", required=True)
    check = rsub.add_parser("check", help="validate a rules file")
    check.add_argument("file")
    check.set_defaults(func=_check)
    test = rsub.add_parser("test", help="show which rules match a message and how it would leave (queues nothing)")
    test.add_argument("message", help="an .eml file")
    test.add_argument("--from", dest="sender", help="envelope sender (default: the From: address)")
    test.add_argument("--to", action="append", required=True, help="an envelope recipient (repeat for more)")
    test.add_argument("--connector", help="the receive connector it arrived on")
    test.add_argument("--rules", help="the rules file (default: [transport_rules] file of -c CONFIG)")
    test.add_argument("-c", "--config", help="exmta.toml: accepted domains, send connectors, the rules file")
    test.add_argument("--client-ip", help="the sending client's address (SenderIpRanges)")
    test.add_argument("--authenticated", action="store_true", help="as if the client had authenticated")
    test.add_argument("--internal-session", action="store_true",
                      help="as if from an internal connector (FromScope InOrganization needs it)")
    test.add_argument("--internal-domain", action="append", default=[], help="a domain of the organisation")
    test.add_argument("--scl", type=int, help="the message's spam confidence level")
    test.set_defaults(func=_test)
    imp = rsub.add_parser("import", help="convert an Export-TransportRuleCollection XML file to a rules file")
    imp.add_argument("file")
    imp.add_argument("-o", "--output", help="write here (never overwrites; default: standard output)")
    imp.set_defaults(func=_import)
