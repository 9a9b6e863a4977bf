"""``exmta explain``: what an SMTP reply means and what to do about it.

A catalogue of the RFC 3463 enhanced status codes (the IANA registry of
RFC 5248) and of the Microsoft 365 / Exchange Online replies that
administrators meet (docs/diagnose.rst lists the sources).  :func:`explain`
takes a reply as text ("550 5.7.68 TenantInboundAttribution; Rejecting")
and returns the most specific :class:`Explanation`:

1. an entry whose text pattern matches (the same code means different
   things at Microsoft and elsewhere: ``5.4.1`` is "no answer from host"
   in RFC 3463 but Directory-Based Edge Blocking at Exchange Online);
2. an entry for the exact enhanced code, or a range that contains it
   (``4.7.500``-``4.7.699``, ``5.7.606``-``5.7.649``);
3. the RFC 3463 subject/detail entry, then the class alone.

The tracking log's DEFER and FAIL events carry :func:`short` of the reply
(exmta.observe.tracking.event_details).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["CATALOGUE", "Explanation", "explain", "parse_reply", "short"]

RFC3463 = "https://www.rfc-editor.org/rfc/rfc3463"
IANA = "https://www.iana.org/assignments/smtp-enhanced-status-codes"
EXO_NDR = ("https://learn.microsoft.com/en-us/exchange/mail-flow-best-practices/"
           "non-delivery-reports-in-exchange-online/non-delivery-reports-in-exchange-online")
EXO_TROUBLE = "https://learn.microsoft.com/en-us/exchange/troubleshoot/email-delivery/ndr/"
DIRECT_SEND = ("https://techcommunity.microsoft.com/blog/exchange/"
               "introducing-more-control-over-direct-send-in-exchange-online/4408790")
OUTLOOK_POLICIES = "https://sendersupport.olc.protection.outlook.com/pm/troubleshooting.aspx"
DELIST = "https://sender.office.com"


@dataclass(frozen=True)
class Explanation:
    """What a reply means (``meaning``), what to do (``action``), and where that is written."""

    code: str              # "5.7.68", "4.7.500-699" or "5.7.x"
    title: str
    meaning: str
    action: str
    source: str
    vendor: str = "RFC 3463"   # | "Microsoft 365" | "exmta"

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "title": self.title, "meaning": self.meaning, "action": self.action,
                "source": self.source, "vendor": self.vendor}


@dataclass(frozen=True)
class _Entry:
    low: tuple[int, int, int]
    high: tuple[int, int, int]
    pattern: re.Pattern[str] | None
    explanation: Explanation


def _code(text: str) -> tuple[int, int, int]:
    a, b, c = text.split(".")
    return int(a), int(b), int(c)


CATALOGUE: list[_Entry] = []


def _add(code: str, title: str, meaning: str, action: str, source: str, vendor: str,
         pattern: str | None = None) -> None:
    """``code`` is "5.7.68", or "4.7.500-699" for a range of details; ``pattern`` a regex on the text."""
    first, _, last = code.partition("-")
    low = _code(first)
    high = (low[0], low[1], int(last)) if last else low
    CATALOGUE.append(_Entry(low, high, re.compile(pattern, re.I) if pattern else None,
                            Explanation(code, title, meaning, action, source, vendor)))


def _ms(code: str, title: str, meaning: str, action: str, source: str = EXO_NDR,
        pattern: str | None = None) -> None:
    _add(code, title, meaning, action, source, "Microsoft 365", pattern)


# ---------------------------------------------------------------- Microsoft 365 / Exchange Online

_ms("5.7.68", "TenantInboundAttribution: Direct Send rejected",
    "Exchange Online refused anonymous mail whose envelope sender (P1 MAIL FROM) is one of the tenant's "
    "accepted domains, because the tenant has Reject Direct Send on "
    "(Set-OrganizationConfig -RejectDirectSend $true) and no inbound connector (certificate or IP) "
    "matched this sending server.",
    "Send through a partner inbound connector: create an OnPremises inbound connector in Exchange Online "
    "keyed on the certificate this exmta send connector presents (tls_certificate, whose name is an "
    "accepted domain) or on our public IP, and relay devices through exmta to it (or use the XOAUTH2 "
    "relay). Turning Reject Direct Send off again is the last resort.",
    DIRECT_SEND, pattern=r"TenantInboundAttribution")
_ms("5.7.64", "TenantAttribution: relay access denied",
    "Exchange Online could not attribute the relayed message to your tenant: the inbound connector "
    "that should match this server (by certificate or IP) no longer does, e.g. after a certificate "
    "renewal with a different name or a new public IP.",
    "Make the connector match: the certificate our send connector presents (tls_certificate) must carry "
    "the name in the inbound connector's TlsSenderCertificateName, or update SenderIPAddresses to our "
    "outbound IP; re-run the Hybrid Configuration Wizard in hybrid set-ups.",
    EXO_TROUBLE + "relay-access-denied-smtp", pattern=r"TenantAttribution")
_ms("5.7.57", "Client not authenticated to send mail (smtp.office365.com)",
    "The client submission endpoint requires SMTP AUTH before MAIL FROM; the session was anonymous.",
    "Configure auth_username/auth_password (or XOAUTH2) on the send connector that uses "
    "smtp.office365.com:587, or send to the tenant's MX endpoint through a connector instead.",
    EXO_NDR)
_ms("5.7.139", "SMTP AUTH disabled for the tenant or mailbox",
    "Authenticated client submission (SMTP AUTH) is turned off for the tenant or the mailbox "
    "(Basic authentication retirement, MC786329).",
    "Use OAuth (XOAUTH2) for the relay, or enable SmtpClientAuthentication for this mailbox only.",
    EXO_NDR)
_ms("5.7.1", "Unable to relay",
    "The receiving server does not relay for us: we are not authenticated and the recipient is not in "
    "one of its accepted domains.",
    "Check the route (is this recipient supposed to go to this host?), authenticate (auth_username), "
    "or have the receiving side allow our IP/certificate to relay (an inbound connector at Exchange).",
    EXO_TROUBLE + "fix-error-code-550-5-7-1-in-exchange-online", pattern=r"relay")
_ms("5.7.1", "Delivery not authorized: the recipient rejects the sender",
    "The recipient (or a group's delivery restriction, or a mail flow rule) does not accept mail from "
    "this sender.",
    "Ask the recipient's administrator to allow the sender (group settings, mail flow rules, "
    "RequireSenderAuthenticationEnabled), or send from an allowed address.",
    EXO_TROUBLE + "fix-error-code-550-5-7-1-in-exchange-online",
    pattern=r"not authorized|delivery not authorized|RESOLVER\.RST")
_ms("5.4.1", "Recipient address rejected: Access denied (Directory-Based Edge Blocking)",
    "Exchange Online / EOP blocked the message at its edge: the recipient does not exist in the "
    "tenant's directory and the accepted domain is Authoritative (DBEB), or the domain is not an "
    "accepted domain there (AS(201806281)).",
    "Check the recipient address; if the mailbox lives elsewhere (on-premises), make the accepted "
    "domain Internal Relay or sync the recipient to Entra ID.",
    EXO_TROUBLE + "fix-error-code-550-5-4-1-in-exchange-online", pattern=r"access denied|AS\(\d+\)")
_ms("5.4.1", "Relay access denied",
    "Exchange Online does not accept mail for this domain from us.",
    "The recipient domain must be an accepted domain of the tenant behind this MX, or we must relay "
    "through a connector that the tenant attributes to itself.",
    EXO_TROUBLE + "fix-error-code-550-5-4-1-in-exchange-online", pattern=r"relay access denied")
_ms("5.7.606-649", "Access denied, banned sending IP",
    "Our sending IP address is on Microsoft's block list (poor reputation or spam seen from it).",
    f"Stop any abuse first, then request delisting of the IP at the delist portal ({DELIST}).",
    EXO_TROUBLE + "fix-error-code-5-7-606-649-in-exchange-online")
_ms("4.7.500-699", "Access denied, please try again later (throttling)",
    "Microsoft is throttling this sending IP or tenant (suspicious volume, a new tenant or IP, or "
    "reputation); the message is accepted again later.",
    "Nothing to change for one-off deferrals: exmta retries. If it persists, lower the rate to "
    "Microsoft (max_per_destination), warm up new IPs, and check the IP's reputation "
    f"({OUTLOOK_POLICIES}).",
    EXO_NDR)
_ms("5.7.700-749", "Access denied, tenant has exceeded threshold",
    "The sending tenant is blocked from sending (trial tenant, tenant without verified domains, or too "
    "much outbound spam).",
    "Contact Microsoft support for the sending tenant; check for compromised accounts.",
    EXO_TROUBLE + "fix-error-code-5-7-700-through-5-7-750")
_ms("5.7.708", "Access denied, traffic not accepted from this IP",
    "The sending IP (usually a new tenant's, or a shared one) has low reputation at Exchange Online.",
    "Send through a connector with a known IP or a verified domain; ask Microsoft support to review.",
    EXO_TROUBLE + "fix-error-code-5-7-700-through-5-7-750")
_ms("5.7.750", "Client blocked from sending from unregistered domains",
    "The tenant sent a large amount of mail from domains that are not accepted (verified) domains of "
    "the tenant.",
    "Add and verify the sending domains as accepted domains in Microsoft 365, or stop sending from them.",
    EXO_TROUBLE + "fix-error-code-5-7-700-through-5-7-750")
_ms("5.7.23", "SPF violation",
    "The recipient's server checked SPF for the envelope sender's domain and our IP is not allowed "
    "(SPF fail with a policy that rejects).",
    "Add our sending IP to the domain's SPF record (ip4:/include:), within the 10-lookup limit; "
    "`exmta diagnose DOMAIN` shows what SPF says for our addresses.",
    EXO_NDR)
_ms("5.7.509", "DMARC: sending domain does not pass DMARC verification (p=reject)",
    "The From: domain publishes DMARC p=reject and the message passed neither SPF nor DKIM in "
    "alignment.",
    "DKIM-sign with a key of the From: domain (dkim_sign = true and [[dkim.keys]]), and/or align SPF; "
    "`exmta diagnose DOMAIN` checks the published key against ours.",
    EXO_NDR)
_ms("5.7.515", "Sending domain does not meet the required authentication level",
    "Outlook.com requires SPF, DKIM and DMARC from high-volume senders and this message lacked them.",
    "Publish SPF, DKIM-sign and publish a DMARC record for the sending domain.",
    OUTLOOK_POLICIES)
_ms("5.7.510", "Access denied: recipient does not accept mail over IPv6",
    "The receiving organisation accepts mail over IPv4 only (or our IPv6 address lacks reverse DNS).",
    "Send over IPv4 to this destination, or give our IPv6 addresses PTR records and SPF.",
    EXO_NDR)
_ms("5.7.511", "Access denied, banned sender",
    "The sending IP address is banned by Microsoft.",
    f"Request delisting at {DELIST}; if refused, contact Microsoft support with the full reply.",
    EXO_NDR)
_ms("5.7.512", "Message must be RFC 5322 section 3.6.2 compliant",
    "The message has no valid From: header.",
    "Fix the sending application so that it writes a From: header with one valid address.",
    EXO_NDR)
_ms("5.7.513", "Client host blocked using Customer Block list",
    "The recipient organisation has blocked our IP in its own connection filter.",
    "Ask the recipient's administrator to remove our IP from their IP block list.",
    EXO_NDR)
_ms("5.7.520", "Your organization doesn't allow external forwarding",
    "An outbound spam policy of the sender's tenant forbids automatic forwarding to external recipients.",
    "Allow forwarding for these mailboxes in the outbound spam policy, or use a transport rule.",
    EXO_NDR)
_ms("5.7.12", "Sender was not authenticated by the organization",
    "The recipient (usually a group) accepts mail only from authenticated internal senders.",
    "Have the recipient's administrator allow external senders, or send from inside the organisation.",
    EXO_NDR)
_ms("5.7.124", "Sender not in the allowed senders list",
    "The group's delivery management allows only some senders.",
    "Ask the group owner to add the sender.",
    EXO_NDR)
_ms("5.7.133", "Sender not authenticated for group",
    "The group accepts mail from authenticated senders only.",
    "Ask the group owner to allow external senders.",
    EXO_NDR)
_ms("5.7.134", "Sender not authenticated for mailbox",
    "The mailbox accepts mail from authenticated senders only.",
    "Ask the recipient's administrator to allow external senders for the mailbox.",
    EXO_NDR)
_ms("5.7.60", "Client does not have permission to send as this sender",
    "The authenticated account has no Send As right for the envelope/From address.",
    "Grant Send As to the account, or send as the authenticated mailbox.",
    EXO_NDR)
_ms("5.1.8", "Access denied, bad outbound sender",
    "The sending account was blocked for sending spam (restricted users).",
    "Secure the account, then unblock it in the Microsoft Defender portal (Restricted entities).",
    EXO_NDR)
_ms("5.1.10", "Recipient not found",
    "No recipient with this SMTP address exists in the destination organisation.",
    "Check the address; in hybrid set-ups sync the recipient or route its domain on-premises.",
    EXO_NDR)
_ms("5.1.90", "Daily recipient limit reached",
    "The sending mailbox exceeded its daily recipient rate limit.",
    "Wait 24 hours; use High Volume Email or a connector for bulk mail.",
    EXO_NDR)
_ms("5.2.121", "Recipient's per-hour message receive limit reached",
    "The recipient received more messages from this sender in an hour than it accepts.",
    "Try later; exmta retries transient replies automatically.",
    EXO_NDR)
_ms("5.2.122", "Recipient's per-hour message receive limit reached",
    "The recipient received more messages in an hour than it accepts.",
    "Try later; exmta retries transient replies automatically.",
    EXO_NDR)
_ms("5.4.14", "Hop count exceeded: possible mail loop",
    "The message went around a loop of servers (a connector or forwarding rule routes it back).",
    "Check the routes and connectors on both sides: an accepted domain routed back to its sender.",
    EXO_NDR)
_ms("5.6.11", "Invalid characters in message",
    "The message contains bare line feeds that the receiver refuses.",
    "Fix the sending application (CRLF line endings) or send with BDAT/CHUNKING.",
    EXO_NDR)
_ms("4.4.316", "Connection refused by the next hop",
    "Exchange Online could not connect to the destination (e.g. the on-premises server of a hybrid "
    "connector).",
    "Check that the destination's port 25 is reachable from the Internet and its certificate is valid.",
    EXO_NDR)
_ms("4.7.321", "starttls-not-supported: destination must support TLS",
    "The sending side requires TLS and the destination did not offer STARTTLS or it failed.",
    "Enable STARTTLS with a valid certificate on the destination; `exmta diagnose HOST` shows it.",
    EXO_NDR)
_ms("5.7.321", "starttls-not-supported: destination must support TLS",
    "The sending side requires TLS and the destination did not offer STARTTLS or it failed.",
    "Enable STARTTLS with a valid certificate on the destination; `exmta diagnose HOST` shows it.",
    EXO_NDR)
_ms("5.7.900-999", "Rejected by a mail flow (transport) rule",
    "A mail flow rule of the recipient organisation rejected the message with a custom code.",
    "Read the text after the code: it is the rule's RejectMessageReasonText; ask their administrator.",
    EXO_NDR)
_ms("4.7.230", "Connector is not supported (out-of-date server)",
    "Exchange Online refuses mail from on-premises servers that run unsupported versions.",
    "Update the on-premises Exchange server, or relay through exmta.",
    EXO_NDR)
_ms("5.7.230", "Connector is not supported (out-of-date server)",
    "Exchange Online refuses mail from on-premises servers that run unsupported versions.",
    "Update the on-premises Exchange server, or relay through exmta.",
    EXO_NDR)
_ms("4.7.66", "TLS version not supported",
    "Exchange Online requires TLS 1.2 or later on this endpoint.",
    "Upgrade the client (exmta always offers TLS 1.2+).",
    EXO_NDR)

# ---------------------------------------------------------------- exmta's own replies (policy, TLS)

_add("4.7.5", "TLS policy or certificate failure (MTA-STS, DANE or mandatory TLS)",
     "The destination's certificate or TLS support did not satisfy the policy that applies: the "
     "domain's MTA-STS policy (enforce), its DANE TLSA records, or the send connector's tls = "
     "\"mandatory\". The message was not sent in clear; it waits in the queue.",
     "Run `exmta diagnose DOMAIN` to see which MX fails and why. The receiving domain must fix its "
     "certificate or policy; to ship mail anyway, add a [tls_policy.overrides] entry for the domain.",
     "docs/tls-policy.rst", "exmta", pattern=r"MTA-STS|DANE|TLSA|TLS is mandatory|certificate")
_add("4.4.3", "MTA-STS: no MX host matches the policy",
     "The domain's MTA-STS policy in enforce mode lists mx: patterns that none of its MX hosts match "
     "(a misconfigured policy or a DNS attack); nothing was sent.",
     "The receiving domain must fix its MX records or its policy; meanwhile the mail waits.",
     "docs/tls-policy.rst", "exmta", pattern=r"MTA-STS")

# ---------------------------------------------------------------- RFC 3463 (and RFC 5248 registry)

_SUBJECTS = {
    0: "Other or undefined status", 1: "Addressing status", 2: "Mailbox status", 3: "Mail system status",
    4: "Network and routing status", 5: "Mail delivery protocol status", 6: "Message content or media status",
    7: "Security or policy status",
}
_CLASSES = {2: "Success", 4: "Persistent transient failure", 5: "Permanent failure"}
_RFC = [
    ("x.0.0", "Other undefined status", "No more specific code applies.",
     "Read the text of the reply; if it persists, ask the remote administrator."),
    ("x.1.0", "Other address status", "Something about the address was wrong.", "Check the address."),
    ("x.1.1", "Bad destination mailbox address", "The mailbox does not exist at the destination.",
     "Check the spelling of the recipient address."),
    ("x.1.2", "Bad destination system address", "The destination host or domain does not exist or "
     "accepts no mail.", "Check the domain part of the address."),
    ("x.1.3", "Bad destination mailbox address syntax", "The address is not valid.", "Fix the address."),
    ("x.1.6", "Destination mailbox has moved", "No forwarding address is known.", "Ask for the new address."),
    ("x.1.7", "Bad sender's mailbox address syntax", "The envelope sender is not valid.",
     "Fix the sender address of the application."),
    ("x.1.8", "Bad sender's system address", "The sender's domain does not exist or cannot be "
     "verified.", "Make the sender's domain resolve (MX or A) in public DNS."),
    ("x.1.10", "Recipient address has null MX", "The domain publishes a null MX (RFC 7505).",
     "The domain accepts no mail; remove the recipient."),
    ("x.2.0", "Other or undefined mailbox status", "The mailbox exists but something about it failed.",
     "Try later or ask the recipient."),
    ("x.2.1", "Mailbox disabled, not accepting messages", "The mailbox is disabled.", "Contact the recipient."),
    ("x.2.2", "Mailbox full", "The recipient's mailbox is over its quota.",
     "The recipient must make room; transient codes are retried."),
    ("x.2.3", "Message length exceeds administrative limit", "Too big for this recipient.",
     "Send a smaller message (share a link)."),
    ("x.2.4", "Mailing list expansion problem", "A list could not be expanded.", "Contact the list owner."),
    ("x.3.0", "Other or undefined mail system status", "The destination system had a problem.",
     "Try later; transient codes are retried."),
    ("x.3.1", "Mail system full", "The destination is out of disk or resources.", "Wait; it is retried."),
    ("x.3.2", "System not accepting network messages", "The host is shutting down or paused.",
     "Wait; it is retried."),
    ("x.3.4", "Message too big for system", "Larger than the destination's fixed limit (SIZE).",
     "Send a smaller message."),
    ("x.4.0", "Other or undefined network or routing status", "Routing failed.",
     "Check routes and DNS; `exmta diagnose DOMAIN`."),
    ("x.4.1", "No answer from host", "The connection attempt got no answer.",
     "Check that port 25 of the destination is reachable (firewall); `exmta diagnose HOST`."),
    ("x.4.2", "Bad connection", "The connection was dropped or timed out during the transaction.",
     "Usually transient; if it persists, check firewalls and MTU on the path."),
    ("x.4.3", "Directory server failure", "DNS (or a directory) could not be queried.",
     "Check the DNS servers the send connector uses (dns_servers)."),
    ("x.4.4", "Unable to route", "No next hop could be found (no MX, no address).",
     "Check the domain's MX and A records; `exmta diagnose DOMAIN`."),
    ("x.4.5", "Mail system congestion", "The destination is overloaded.", "Wait; it is retried."),
    ("x.4.6", "Routing loop detected", "Too many Received headers: the message loops.",
     "Fix the routes that send the domain back and forth."),
    ("x.4.7", "Delivery time expired", "The message stayed in the queue longer than its lifetime.",
     "Find out why earlier attempts failed (`exmta track --event DEFER`)."),
    ("x.5.0", "Other or undefined protocol status", "The SMTP dialogue failed.", "Read the text."),
    ("x.5.1", "Invalid command", "The server did not understand a command.", "Report it with a protocol log."),
    ("x.5.2", "Syntax error", "A command had a syntax error.", "Report it with a protocol log."),
    ("x.5.3", "Too many recipients", "More recipients than the server takes at once.",
     "exmta sends the rest in another transaction."),
    ("x.5.4", "Invalid command arguments", "A parameter was refused.", "Report it with a protocol log."),
    ("x.5.6", "Authentication exchange line too long", "The SASL exchange was too long.", "Check credentials."),
    ("x.6.0", "Other or undefined media error", "The content was refused.", "Read the text."),
    ("x.6.1", "Media not supported", "The receiver cannot handle this content.", "Change the content."),
    ("x.6.3", "Conversion required but not supported", "8-bit content to a 7-bit-only server.",
     "Send 7-bit (quoted-printable) content."),
    ("x.6.7", "Non-ASCII addresses not permitted", "SMTPUTF8 needed but not offered (RFC 6531).",
     "Use an ASCII address for this recipient."),
    ("x.7.0", "Other or undefined security status", "A security or policy check refused the message.",
     "Read the text; the receiving administrator knows which policy."),
    ("x.7.1", "Delivery not authorized, message refused", "The sender or this server is not allowed "
     "to send this (relay denied, blocked sender, policy).",
     "Authenticate, or have the receiver allow our IP/certificate; check the text for the reason."),
    ("x.7.2", "Mailing list expansion prohibited", "The sender may not post to this list.", "Ask the list owner."),
    ("x.7.4", "Security features not supported", "A required security feature is missing.",
     "Check TLS and authentication settings."),
    ("x.7.5", "Cryptographic failure", "TLS or a signature could not be verified.",
     "Check certificates and keys; `exmta diagnose HOST`."),
    ("x.7.7", "Message integrity failure", "The message was changed or is corrupt.", "Resend."),
    ("x.7.8", "Authentication credentials invalid", "AUTH failed (RFC 4954).",
     "Fix auth_username/auth_password of the send connector."),
    ("x.7.9", "Authentication mechanism is too weak", "The server wants a stronger mechanism.",
     "Use TLS and a stronger mechanism."),
    ("x.7.10", "Encryption needed", "The server requires TLS for this.", "Enable TLS on the send connector."),
    ("x.7.11", "Encryption required for requested authentication mechanism", "AUTH only after TLS.",
     "Enable TLS on the send connector."),
    ("x.7.13", "User account disabled", "The authenticating account is disabled.", "Enable the account."),
    ("x.7.14", "Trust relationship required", "The server needs a trust relationship.",
     "Set up the connector agreement with the receiver."),
    ("x.7.15", "Priority level is too low", "Refused by priority (RFC 6710).", "Send later."),
    ("x.7.16", "Message is too big for the specified priority", "Too big for this priority.", "Send smaller."),
    ("x.7.17", "Mailbox owner has changed", "RFC 7293: the mailbox changed owner.", "Check the recipient."),
    ("x.7.18", "Domain owner has changed", "RFC 7293: the domain changed owner.", "Check the recipient."),
    ("x.7.20", "No passing DKIM signature found", "RFC 7372.", "DKIM-sign the message."),
    ("x.7.21", "No acceptable DKIM signature found", "RFC 7372.", "Use an accepted DKIM key/algorithm."),
    ("x.7.22", "No valid author-matched DKIM signature found", "RFC 7372.",
     "Sign with a key of the From: domain."),
    ("x.7.23", "SPF validation failed", "RFC 7372: our IP is not in the sender domain's SPF.",
     "Add our IP to the SPF record."),
    ("x.7.24", "SPF validation error", "RFC 7372: the SPF record could not be evaluated.",
     "Fix the SPF record (syntax, 10-lookup limit); `exmta diagnose DOMAIN`."),
    ("x.7.25", "Reverse DNS validation failed", "RFC 7372: our IP has no matching PTR.",
     "Give the sending IP a PTR whose name resolves back to it."),
    ("x.7.26", "Multiple authentication checks failed", "RFC 7372.", "Fix SPF and DKIM."),
    ("x.7.27", "Sender address has null MX", "RFC 7505: the sender's domain publishes a null MX.",
     "Use a sender domain that receives mail (bounces must be deliverable)."),
]
for _spec, _title, _meaning, _action in _RFC:
    _, _s, _d = _spec.split(".")
    for _cls in (4, 5):
        _add(f"{_cls}.{_s}.{_d}", _title, _meaning, _action, RFC3463 if int(_s) != 7 or int(_d) < 8 else IANA,
             "RFC 3463")

_REPLY = re.compile(r"^\s*(?P<code>[245]\d\d)?[ -]?\s*(?P<status>[245]\.\d{1,3}\.\d{1,3})?\b\s*(?P<text>.*)$", re.S)


def parse_reply(reply: str) -> tuple[int | None, str | None, str]:
    """``"550 5.7.68 text"`` -> (550, "5.7.68", "text"); a bare ``"5.7.68"`` works too.

    Multi-line replies are joined; the status may also appear in the text
    (Exchange writes "#5.7.68 ..." in NDRs), where the first one found is used.
    """
    lines = [re.sub(r"^\s*\d{3}[ -]", "", ln) if i else ln for i, ln in enumerate(reply.strip().splitlines())]
    text = " ".join(x.strip() for x in lines)
    m = _REPLY.match(text)
    code = int(m.group("code")) if m and m.group("code") else None
    status = m.group("status") if m else None
    rest = m.group("text") if m else text
    if status is None:
        found = re.search(r"#?\b([245]\.\d{1,3}\.\d{1,3})\b", text)
        if found:
            status = found.group(1)
    return code, status, rest.strip()


def explain(reply: str) -> Explanation | None:
    """The most specific explanation of ``reply`` (see the module docstring), or None."""
    code, status, text = parse_reply(reply)
    if status is None:
        if code is None:
            return None
        return Explanation(f"{code}", f"{_CLASSES.get(code // 100, 'Reply')} (no enhanced status code)",
                           "The reply carries no RFC 3463 enhanced status code; its first digit says "
                           "4 = try again later, 5 = permanent.",
                           "Read the text of the reply.", "https://www.rfc-editor.org/rfc/rfc5321#section-4.2.1")
    try:
        key = _code(status)
    except ValueError:
        return None
    in_range = [e for e in CATALOGUE if e.low[:2] == key[:2] and e.low[2] <= key[2] <= e.high[2]]
    for entry in in_range:  # a text pattern first: the same code differs by vendor
        if entry.pattern is not None and entry.pattern.search(text):
            return entry.explanation
    # a pattern-only code (TenantInboundAttribution) also wins when the text names it under another code
    for entry in CATALOGUE:
        if entry.pattern is not None and entry.explanation.vendor == "Microsoft 365" \
                and entry.low == entry.high and "Tenant" in entry.pattern.pattern and entry.pattern.search(text):
            return entry.explanation
    exact = [e for e in in_range if e.pattern is None and e.low == e.high]
    if exact:
        return exact[0].explanation
    ranged = [e for e in in_range if e.pattern is None]
    if ranged:
        return ranged[0].explanation
    subject = _SUBJECTS.get(key[1], "Unknown subject")
    return Explanation(
        f"{key[0]}.{key[1]}.x", f"{_CLASSES.get(key[0], 'Status')}: {subject.lower()}",
        f"No entry for {status}; class {key[0]} means {_CLASSES.get(key[0], 'unknown').lower()}, "
        f"subject {key[1]} is {subject.lower()}.",
        "Read the text of the reply." + (" It is retried automatically." if key[0] == 4 else ""),
        RFC3463)


def short(reply: str) -> str | None:
    """One line for the tracking log: "5.7.68 TenantInboundAttribution ...: <action>", or None."""
    found = explain(reply)
    if found is None or found.code.endswith(".x") or not found.code[0].isdigit() or "." not in found.code:
        return None
    return f"{found.title}. {found.action}"
