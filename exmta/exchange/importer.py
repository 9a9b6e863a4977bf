"""``exmta import exchange``: Exchange connector and accepted-domain JSON -> an exmta TOML config.

Input is what ``Get-ReceiveConnector | ConvertTo-Json``,
``Get-SendConnector | ConvertTo-Json`` and ``Get-AcceptedDomain |
ConvertTo-Json`` print in the Exchange Management Shell (one object or an
array; UTF-8 or the UTF-16 that Windows PowerShell 5.1 redirects to), or
the same objects written by ``Export-Clixml`` (:mod:`exmta.exchange.clixml`). The
shell is a remote session, so Exchange's own types arrive as strings:
``"0.0.0.0:25"``, ``"192.168.5.10-192.168.5.20"``, ``"SMTP:*;1"``,
``"36 MB (37,748,736 bytes)"``, ``"00:10:00"``, ``"Tls, BasicAuth"``. The
object forms of a local session (``{"LowerBound": ..., "UpperBound": ...}``,
``{"Address": ..., "Port": ...}``) are read too; numeric enums are not
(their numbering is not documented) and are reported.

Every property of every object is either mapped or listed with the reason
it is not (as comments in the output and in :attr:`Import.unmapped`),
never dropped silently. What the JSON cannot say is asked for on the
command line: the PEM files of the certificate (``TlsCertificateName``
names a certificate in the Windows store), the password store for
``BasicAuth``, the Exchange server that receives mail for the accepted
domains, and which connectors carry the anonymous relay permission
(``Add-ADPermission ... Ms-Exch-SMTP-Accept-Any-Recipient``, which is
stored in Active Directory, not on the connector object).
"""
from __future__ import annotations

import ipaddress
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from exmta.config.reader import domain as _domain

__all__ = ["Import", "ImportOptions", "import_exchange", "load_objects", "main"]


@dataclass
class ImportOptions:
    hostname: str | None = None
    data_dir: str = "/var/lib/exmta"
    tls_cert: str | None = None            # PEM of the certificate TlsCertificateName names
    tls_key: str | None = None
    auth_backend: str | None = None        # users file or [auth.NAME] for BasicAuth connectors
    relay_connectors: tuple[str, ...] = ()  # receive connectors with the anonymous relay ACE
    mailbox_host: str | None = None        # where mail for the accepted domains goes (an Exchange server)
    server: str | None = None              # import the receive connectors of this server only


@dataclass
class Import:
    """The result: TOML text and every property that was not mapped, with why."""

    toml: str = ""
    unmapped: list[tuple[str, str, str]] = field(default_factory=list)  # (object, property, why)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading the JSON


def load_objects(data: bytes) -> list[dict[str, Any]]:
    """The objects in one ConvertTo-Json or Export-Clixml output (UTF-8, UTF-8 with BOM or UTF-16)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16")
    else:
        text = data.decode("utf-8-sig")
    if text.lstrip().startswith("<"):  # Export-Clixml
        from exmta.exchange.clixml import load_clixml

        return load_clixml(text)
    value = json.loads(text)
    items = value if isinstance(value, list) else [value]
    out = [v for v in items if isinstance(v, dict)]
    if len(out) != len(items):
        raise ValueError("expected JSON objects (the output of ... | ConvertTo-Json)")
    return out


def kind_of(obj: dict[str, Any]) -> str | None:
    if "DomainType" in obj and "DomainName" in obj:
        return "accepted_domain"
    if "AddressSpaces" in obj or "DNSRoutingEnabled" in obj:
        return "send"
    if "Bindings" in obj and "RemoteIPRanges" in obj:
        return "receive"
    return None


def _text(v: Any) -> str:
    if isinstance(v, dict):  # an object form: IPAddress and friends
        for key in ("IPAddressToString", "Value", "Address"):
            if isinstance(v.get(key), (str, int)):
                return str(v[key])
    return "" if v is None else str(v)


def _list(v: Any) -> list[Any]:
    if v is None or v == "":
        return []
    if isinstance(v, list):
        return v
    if isinstance(v, dict) and isinstance(v.get("value"), list):  # some serializers wrap arrays
        return v["value"]
    if isinstance(v, str) and v.startswith("{") and v.endswith("}"):  # Format-List style "{a, b}"
        return [s.strip() for s in v[1:-1].split(",") if s.strip()]
    return [v]


def _flags(v: Any) -> list[str]:
    """``"Tls, BasicAuth"`` or ``["Tls", "BasicAuth"]`` -> names; a number raises ValueError."""
    if isinstance(v, bool) or isinstance(v, (int, float)):
        raise ValueError(f"numeric enum value {v!r}; export from the Exchange Management Shell, where enums "
                         "are names")
    items = v if isinstance(v, list) else str(v or "").split(",")
    return [str(s).strip() for s in items if str(s).strip()]


_BYTES = re.compile(r"\(([\d,.\s\u00a0']+)\s*bytes\)", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_size(v: Any) -> int | None:
    """ByteQuantifiedSize: ``"36 MB (37,748,736 bytes)"``, ``"25 MB"``, a number; None = Unlimited."""
    if isinstance(v, dict):
        if v.get("IsUnlimited"):
            return None
        v = v.get("Value", v)
        if isinstance(v, dict):
            return int(v.get("Bytes") or v.get("m_value") or 0) or None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return int(v)
    s = str(v).strip()
    if s.lower() == "unlimited":
        return None
    m = _BYTES.search(s)
    if m:
        return int(re.sub(r"\D", "", m.group(1)))
    m = re.match(r"^([\d.]+)\s*([KMGT]?B)$", s, re.IGNORECASE)
    if m:
        return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    raise ValueError(f"{s!r} is not a size")


def parse_timespan(v: Any) -> float:
    """EnhancedTimeSpan ``"00:10:00"`` / ``"1.00:00:00"``, or a TimeSpan object -> seconds."""
    if isinstance(v, dict) and "TotalSeconds" in v:
        return float(v["TotalSeconds"])
    m = re.match(r"^(?:(\d+)\.)?(\d+):(\d+):(\d+(?:\.\d+)?)$", str(v).strip())
    if not m:
        raise ValueError(f"{v!r} is not a time span (dd.hh:mm:ss)")
    days, h, mi, s = int(m.group(1) or 0), int(m.group(2)), int(m.group(3)), float(m.group(4))
    return ((days * 24 + h) * 60 + mi) * 60 + s


def parse_limit(v: Any) -> int:
    """``Unlimited`` -> 0 (exmta's "no limit"), else the number."""
    if isinstance(v, dict):
        if v.get("IsUnlimited"):
            return 0
        v = v.get("Value", 0)
    s = str(v).strip()
    return 0 if s.lower() == "unlimited" else int(s)


def parse_ranges(values: Any) -> list[str]:
    """RemoteIPRanges (``192.168.1.1``, ``192.168.1.1-192.168.1.254``, ``192.168.1.0/24``) -> CIDRs."""
    out: list[str] = []
    for item in _list(values):
        if isinstance(item, dict) and "LowerBound" in item:
            lo, hi = _text(item["LowerBound"]), _text(item.get("UpperBound", item["LowerBound"]))
        else:
            s = _text(item).strip()
            if "/" in s:
                out.append(str(ipaddress.ip_network(s.split("%")[0], strict=False)))
                continue
            lo, _, hi = s.partition("-")
            hi = hi or lo
        first = ipaddress.ip_address(lo.strip().split("%")[0])
        last = ipaddress.ip_address(hi.strip().split("%")[0])
        out += [str(n) for n in ipaddress.summarize_address_range(first, last)]
    return list(dict.fromkeys(out))


def parse_binding(item: Any) -> str:
    """``0.0.0.0:25`` / ``[::]:25`` / ``10.0.0.1:25`` -> a Twisted endpoint string."""
    if isinstance(item, dict):
        host, port = _text(item.get("Address")), int(item.get("Port", 25))
    else:
        s = _text(item).strip()
        if s.startswith("["):
            host, _, rest = s[1:].partition("]")
            port = int(rest.lstrip(":"))
        else:
            host, _, p = s.rpartition(":")
            port = int(p)
    addr = ipaddress.ip_address(host.split("%")[0])
    if addr.version == 6:
        return f"tcp6:{port}:interface=" + str(addr).replace(":", "\\:")
    return f"tcp:{port}" if str(addr) == "0.0.0.0" else f"tcp:{port}:interface={addr}"


def parse_address_space(item: Any) -> tuple[str, str, int]:
    """``SMTP:*;1`` / ``contoso.com;2`` / ``SMTP:contoso.com`` -> (type, space, cost)."""
    if isinstance(item, dict):
        return (str(item.get("Type", "SMTP")), str(item.get("Address", item.get("Domain", ""))),
                int(item.get("Cost", 1)))
    s = _text(item).strip()
    kind = "SMTP"
    m = re.match(r"^([A-Za-z0-9]+):(.*)$", s)
    if m and not m.group(2).startswith("//"):
        kind, s = m.group(1).upper(), m.group(2)
    space, _, cost = s.rpartition(";") if ";" in s else (s, "", "1")
    return kind, space.strip(), int(cost or 1)


def slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "connector"


def _q(v: Any) -> str:
    """A TOML value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_q(x) for x in v) + "]"
    return json.dumps(str(v))


# ---------------------------------------------------------------- what is not mapped, and why

METADATA = {
    "AdminDisplayName", "DistinguishedName", "ExchangeVersion", "Guid", "Id", "Identity", "IsValid",
    "ObjectCategory", "ObjectClass", "ObjectState", "OrganizationId", "OriginatingServer", "PSComputerName",
    "PSShowComputerName", "RunspaceId", "WhenChanged", "WhenChangedUTC", "WhenCreated", "WhenCreatedUTC",
    "Name", "Server", "HomeMtaServerId", "HomeMTA", "SourceRoutingGroup", "SourceTransportServers",
    "SmartHostsString", "IsReadOnly", "PSSourceName", "Comment", "ConnectorSource", "AddressSpaces",
    "ConnectedDomains", "DomainController", "Enabled", "TransportRole",
}
REASONS = {
    # receive connectors
    "ConnectionTimeout": "exmta limits each command's idle time (command_timeout, from "
                         "ConnectionInactivityTimeout) and DATA time, not the length of a whole session",
    "MaxHopCount": "exmta's hop limit is server-wide (the Received count), not per connector",
    "MaxLocalHopCount": "exmta's hop limit is server-wide",
    "MaxHeaderSize": "exmta limits each header line (max_text_line), not the whole header section",
    "MaxProtocolErrors": "closest exmta setting is max_errors (bad commands before 421); review it",
    "MaxLogonFailures": "exmta locks out by user and by source (auth_lockout_*), not per connection",
    "TarpitInterval": "exmta tarpits failed logins (auth_tarpit) only",
    "AuthTarpitInterval": "set auth_tarpit by hand if it differs from 5 s",
    "MaxInboundConnectionPercentagePerSource": "exmta limits per source by count (max_connections_per_ip)",
    "MaxAcknowledgementDelay": "shadow redundancy does not exist in exmta (one node)",
    "TlsCertificateName": "names a certificate in the Windows store; export it to PEM and give "
                          "--tls-cert/--tls-key",
    "TlsDomainCapabilities": "Exchange Online domain capabilities have no exmta equivalent",
    "DomainSecureEnabled": "domain security (mutual TLS by domain list) is not implemented",
    "DefaultDomain": "exmta qualifies bare recipients with the postmaster domain",
    "MessageRateSource": "used with MessageRateLimit",
    "ServiceDiscoveryFqdn": "Outlook client settings, not transport",
    "AdvertiseClientSettings": "Outlook on the web client settings, not transport",
    "ExtendedProtectionPolicy": "Integrated (NTLM) authentication is not offered",
    "EnableAuthGSSAPI": "Kerberos/GSSAPI is not offered",
    "LiveCredentialEnabled": "Windows Live credentials are not supported",
    "ProxyEnabled": "XPROXY between Exchange roles does not exist in exmta",
    "Usage": "a usage type only seeds defaults at creation; the resulting properties are imported",
    "Banner": "",
    "SuppressXAnonymousTls": "exmta sends no X-ANONYMOUSTLS",
    "RequireEHLODomain": "exmta does not require an EHLO domain",
    "RejectReservedTopLevelRecipientDomains": "exmta's relay checks reject unresolvable domains at delivery",
    "RejectReservedSecondLevelRecipientDomains": "exmta's relay checks reject unresolvable domains at delivery",
    "RejectSingleLabelRecipientDomains": "exmta's relay checks reject unresolvable domains at delivery",
    "MaxInboundConnection": "",
    "SmtpUtf8Enabled": "exmta always offers SMTPUTF8",
    "FqdnOverride": "",
    # send connectors
    "AuthenticationCredential": "the password is not exported; set auth_username/auth_password by hand",
    "IsScopedConnector": "exmta has no AD sites: every connector is available",
    "IsCoexistenceConnector": "Exchange 2010 coexistence flag; see send_organization_headers",
    "LinkedReceiveConnector": "linked connectors: use a route per receive connector's domains instead",
    "MaxMessageSize": "exmta send connectors have no size limit of their own (the receive limit applies)",
    "UseExternalDNSServersEnabled": "set dns_servers to Set-TransportService's ExternalDNSServers",
    "SourceIPAddress": "exmta connects from the address the system chooses",
    "ForceHELO": "exmta always tries EHLO first",
    "FrontendProxyEnabled": "exmta has no front end/back end split",
    "ErrorPolicies": "exmta classifies replies by their code (4xx retry, 5xx bounce)",
    "DomainSecureEnabled_send": "",
    "ConnectorType": "see CloudServicesMailEnabled (send_organization_headers)",
    "RequireOorg": "reserved for Microsoft",
    "Region": "",
    # accepted domains
    "Default": "the default domain is Exchange's for new recipient policies; exmta needs none",
    "AddressBookEnabled": "recipient lookup: list the addresses in [server] recipient_list",
    "MatchSubDomains": "write \"*.domain\" as a separate accepted domain",
    "EmailOnly": "", "ExternallyManaged": "", "IsCoexistenceDomain": "", "AuthenticationType": "",
    "LiveIdInstanceType": "", "PendingRemoval": "", "PendingCompletion": "", "FederatedOrganizationLink": "",
    "MailFlowPartner": "", "OutboundOnly": "", "InitialDomain": "", "PerimeterDuplicateDetected": "",
    "IsDefaultFederatedDomain": "", "EnableNego2Authentication": "", "DomainName": "",
}
EXTENSIONS = {
    "BinaryMimeEnabled", "ChunkingEnabled", "DeliveryStatusNotificationEnabled", "EightBitMimeEnabled",
    "EnhancedStatusCodesEnabled", "PipeliningEnabled", "SizeEnabled", "LongAddressesEnabled", "OrarEnabled",
}


class _Connector:
    """Collects one connector's keys and unmapped properties."""

    def __init__(self, result: Import, label: str, obj: dict[str, Any]) -> None:
        self.result = result
        self.label = label
        self.obj = obj
        self.keys: dict[str, Any] = {}
        self.used: set[str] = set()
        self.comments: list[str] = []

    def get(self, prop: str) -> Any:
        self.used.add(prop)
        return self.obj.get(prop)

    def skip(self, prop: str, why: str) -> None:
        self.used.add(prop)
        self.result.unmapped.append((self.label, prop, why))
        self.comments.append(f"not mapped: {prop} = {_text(self.obj.get(prop))!s:.60} ({why})")

    def finish(self) -> None:
        meta = sorted(p for p in self.obj if p not in self.used and p in METADATA)
        if meta:
            why = "directory metadata or identity, not settings (the name becomes the section name)"
            for p in meta:
                self.result.unmapped.append((self.label, p, why))
            self.comments.append(f"not mapped ({why}): {', '.join(meta)}")
        for p in sorted(set(self.obj) - self.used - set(meta)):
            v = self.obj[p]
            if v is None or v == "" or v == []:
                why = "not set in Exchange: nothing to map"
            elif p in EXTENSIONS:
                why = ("exmta always offers this SMTP extension" if v in (True, "Enabled", "EnabledWithoutValue")
                       else "exmta cannot turn this SMTP extension off")
            elif REASONS.get(p):
                why = REASONS[p]
            elif v in (None, "", [], False):
                why = "empty or off in Exchange; no exmta equivalent"
            else:
                why = "no exmta equivalent"
            self.skip(p, why)


# ---------------------------------------------------------------- mapping


AUTH_MAPPED = {"Tls", "BasicAuth", "BasicAuthRequireTLS", "ExternalAuthoritative", "None"}


def _receive(result: Import, obj: dict[str, Any], opts: ImportOptions, names: set[str]) -> tuple[str, list[str]] | None:
    name = str(obj.get("Name") or obj.get("Identity") or "receive")
    c = _Connector(result, f"receive connector {name!r}", obj)
    role = str(c.get("TransportRole") or "")
    bindings = [_text(b) for b in _list(c.get("Bindings"))]
    if c.get("Enabled") is False:
        result.notes.append(f"receive connector {name!r} is disabled in Exchange: not imported")
        c.skip("Enabled", "the connector is disabled")
        return None
    ports = set()
    listen: list[str] = []
    for b in bindings:
        try:
            listen.append(parse_binding(b))
            ports.add(int(b.rpartition(":")[2]))
        except ValueError:
            result.unmapped.append((c.label, "Bindings", f"cannot read binding {b!r}"))
    for ep in list(listen):  # [::]:25 next to 0.0.0.0:25: a dual-stack listener would take both
        port_of = ep.split(":")[1]
        if ep.startswith("tcp6:") and ep.endswith("interface=\\:\\:") and f"tcp:{port_of}" in listen:
            listen.remove(ep)
            result.unmapped.append((c.label, f"Bindings [::]:{port_of}",
                                    f"on Linux an IPv6 [::] listener also takes IPv4, and conflicts with "
                                    f"0.0.0.0:{port_of}; add a tcp6 listener for a specific IPv6 "
                                    "address by hand if you need one"))
    if ports and ((role == "HubTransport" and ports <= {2525, 465, 717}) or ports == {717}):
        result.notes.append(f"receive connector {name!r}: Exchange-internal hop between the Front End Transport "
                            "and Transport services (port 2525/465/717); exmta is one process, not imported")
        for p in obj:
            c.used.add(p)
        result.unmapped.append((c.label, "*", "Exchange-internal HubTransport connector, not imported"))
        return None
    section = slug(name)
    while section in names:
        section += "-2"
    names.add(section)
    c.keys["listen"] = list(dict.fromkeys(listen))
    try:
        ranges = parse_ranges(c.get("RemoteIPRanges"))
    except ValueError as e:
        c.skip("RemoteIPRanges", f"cannot read a range: {e}")
        ranges = []
    if ranges:
        c.keys["remote_ranges"] = ranges
    if c.get("Fqdn"):
        c.keys["hostname"] = _text(obj["Fqdn"]).lower()
    banner = c.get("Banner")
    if banner:
        text = _text(banner)
        rest = text[3:].strip() if text.startswith("220") else text
        host = c.keys.get("hostname", "")
        if host and rest.lower().startswith(host):
            rest = rest[len(host):].strip()
        c.keys["banner"] = rest
        c.comments.append(f"Banner {text!r}: exmta writes \"220 <hostname> <banner>\"")
    if obj.get("MaxMessageSize") is not None:
        try:
            size = parse_size(c.get("MaxMessageSize"))
            if size is None:
                c.skip("MaxMessageSize", "Unlimited: exmta needs a limit; the default 36 MiB stays")
            else:
                c.keys["max_message_size"] = size
        except ValueError as e:
            c.skip("MaxMessageSize", str(e))
    if obj.get("MaxRecipientsPerMessage") is not None:
        c.keys["max_recipients"] = int(c.get("MaxRecipientsPerMessage"))
    for prop, key in (("MaxInboundConnection", "max_connections"),
                      ("MaxInboundConnectionPerSource", "max_connections_per_ip")):
        if obj.get(prop) is not None:
            try:
                c.keys[key] = parse_limit(c.get(prop))
            except ValueError:
                c.skip(prop, f"cannot read {obj[prop]!r}")
    if obj.get("MessageRateLimit") is not None:
        try:
            rate = parse_limit(c.get("MessageRateLimit"))
            source = str(c.get("MessageRateSource") or "IPAddress")
            if rate and "User" in source and "IPAddress" not in source and "All" not in source:
                c.keys["messages_per_minute_per_user"] = rate
            elif rate:
                c.keys["messages_per_minute_per_ip"] = rate
        except ValueError:
            c.skip("MessageRateLimit", f"cannot read {obj['MessageRateLimit']!r}")
    if obj.get("ConnectionInactivityTimeout") is not None:
        try:
            c.keys["command_timeout"] = parse_timespan(c.get("ConnectionInactivityTimeout"))
        except ValueError as e:
            c.skip("ConnectionInactivityTimeout", str(e))
    if str(obj.get("ProtocolLoggingLevel", "")) == "Verbose":
        c.get("ProtocolLoggingLevel")
        c.keys["protocol_log"] = "verbose"
    elif "ProtocolLoggingLevel" in obj:
        c.get("ProtocolLoggingLevel")

    # authentication and permission groups
    try:
        mechs = _flags(c.get("AuthMechanism"))
    except ValueError as e:
        c.skip("AuthMechanism", str(e))
        mechs = []
    try:
        groups = _flags(c.get("PermissionGroups"))
    except ValueError as e:
        c.skip("PermissionGroups", str(e))
        groups = []
    tls_table: dict[str, Any] | None = None
    if "Tls" in mechs:
        if opts.tls_cert:
            tls_table = {"cert": opts.tls_cert}
            if opts.tls_key:
                tls_table["key"] = opts.tls_key
        else:
            result.unmapped.append((c.label, "AuthMechanism Tls",
                                    "STARTTLS needs the certificate as PEM files: give --tls-cert/--tls-key"))
            c.comments.append("not mapped: AuthMechanism Tls (no --tls-cert given: no STARTTLS)")
    if obj.get("RequireTLS") is True:
        c.get("RequireTLS")
        if tls_table is not None:
            c.keys["require_tls"] = True
        else:
            c.skip("RequireTLS", "needs STARTTLS, which needs --tls-cert")
    else:
        c.get("RequireTLS")
    others = [m for m in mechs if m not in AUTH_MAPPED]
    for m in others:
        why = {"Integrated": "NTLM/Kerberos (Integrated) is not offered: clients log in with PLAIN/LOGIN",
               "ExchangeServer": "Exchange server authentication (GSSAPI/Kerberos) is not offered; trust "
                                 "servers by range (externally_secured)"}.get(m, "no exmta equivalent")
        result.unmapped.append((c.label, f"AuthMechanism {m}", why))
        c.comments.append(f"not mapped: AuthMechanism {m} ({why})")
    out_groups: list[str] = []
    external = "ExternalAuthoritative" in mechs
    every = any(ipaddress.ip_network(r).prefixlen == 0 for r in ranges) or not ranges
    for g in groups:
        if g == "AnonymousUsers":
            out_groups.append("anonymous")
        elif g == "ExchangeUsers":
            if "BasicAuth" in mechs or "BasicAuthRequireTLS" in mechs:
                out_groups.append("authenticated")
            else:
                result.unmapped.append((c.label, "PermissionGroups ExchangeUsers",
                                        "needs BasicAuth, the only login exmta offers"))
        elif g == "ExchangeServers":
            if external and not every:
                out_groups.append("exchange_servers")
            else:
                why = ("exmta grants exchange_servers only to externally secured ranges "
                       "(AuthMechanism ExternalAuthoritative with narrow RemoteIPRanges); Exchange servers "
                       "that log in with Kerberos cannot be recognised")
                result.unmapped.append((c.label, "PermissionGroups ExchangeServers", why))
                c.comments.append(f"not mapped: PermissionGroups ExchangeServers ({why})")
        elif g == "Partners":
            why = "partners need a TLS client certificate check: set tls.client_certificate and client_names"
            result.unmapped.append((c.label, "PermissionGroups Partners", why))
            c.comments.append(f"not mapped: PermissionGroups Partners ({why})")
        elif g in ("ExchangeLegacyServers", "Custom", "None"):
            why = {"ExchangeLegacyServers": "Exchange 2003/2007 interoperability has no exmta equivalent",
                   "Custom": "explicit Active Directory permissions are not in this output (see --relay-connector)",
                   "None": "no permission group"}[g]
            result.unmapped.append((c.label, f"PermissionGroups {g}", why))
            c.comments.append(f"not mapped: PermissionGroups {g} ({why})")
    if external and not every:
        c.keys["externally_secured"] = True
    elif external:
        result.unmapped.append((c.label, "AuthMechanism ExternalAuthoritative",
                                "refused for a connector open to every address (it would make everyone an "
                                "Exchange server)"))
    if out_groups:
        c.keys["permission_groups"] = list(dict.fromkeys(out_groups))
    elif groups:
        c.keys["permission_groups"] = ["anonymous"] if "AnonymousUsers" in groups else ["authenticated"]
    if "BasicAuth" in mechs or "BasicAuthRequireTLS" in mechs:
        if opts.auth_backend:
            c.keys["auth"] = ["PLAIN", "LOGIN"]
            c.keys["auth_backend"] = opts.auth_backend
            if "BasicAuthRequireTLS" not in mechs:
                c.comments.append("BasicAuth without BasicAuthRequireTLS: exmta still offers AUTH only after "
                                  "STARTTLS (auth_before_tls_networks lists exceptions)")
        else:
            result.unmapped.append((c.label, "AuthMechanism BasicAuth",
                                    "exmta checks passwords against a users file or LDAP: give --auth-backend"))
            c.comments.append("not mapped: AuthMechanism BasicAuth (no --auth-backend given)")
    if name in opts.relay_connectors or section in opts.relay_connectors:
        if every:
            result.notes.append(f"receive connector {name!r}: --relay-connector refused for a connector open to "
                                "every address (an open relay)")
        else:
            c.keys["relay_networks"] = ranges
            c.comments.append("relay_networks: the anonymous relay permission (Ms-Exch-SMTP-Accept-Any-Recipient), "
                              "given with --relay-connector")
    elif "AnonymousUsers" in groups and not every and not external:
        result.notes.append(f"receive connector {name!r} is anonymous with narrow RemoteIPRanges: if it has the "
                            "anonymous relay permission (Get-ADPermission shows Ms-Exch-SMTP-Accept-Any-Recipient), "
                            f"run the import again with --relay-connector {json.dumps(name)}")
    c.finish()
    lines = [f"# from Exchange receive connector {name!r} ({role or 'role unknown'})"]
    lines += [f"# {t}" for t in c.comments]
    lines.append(f"[receive.{section}]")
    lines += [f"{k} = {_q(v)}" for k, v in c.keys.items()]
    if tls_table is not None:
        lines += ["", f"[receive.{section}.tls]"] + [f"{k} = {_q(v)}" for k, v in tls_table.items()]
    return section, lines


def _send(result: Import, obj: dict[str, Any], opts: ImportOptions, names: set[str],
          routes: list[tuple[list[str], str, int]]) -> list[str] | None:
    name = str(obj.get("Name") or obj.get("Identity") or "send")
    c = _Connector(result, f"send connector {name!r}", obj)
    if c.get("Enabled") is False:
        result.notes.append(f"send connector {name!r} is disabled in Exchange: not imported")
        c.skip("Enabled", "the connector is disabled")
        return None
    section = slug(name)
    while section in names:
        section += "-2"
    names.add(section)
    by_cost: dict[int, list[str]] = {}
    for item in _list(c.get("AddressSpaces")):
        try:
            kind, space, cost = parse_address_space(item)
        except ValueError:
            c.skip("AddressSpaces", f"cannot read {item!r}")
            continue
        if kind != "SMTP":
            result.unmapped.append((c.label, "AddressSpaces", f"{_text(item)}: only SMTP address spaces are routed"))
            continue
        try:
            domain = _domain(space)
        except ValueError as e:
            result.unmapped.append((c.label, "AddressSpaces", f"{_text(item)}: {e}"))
            continue
        by_cost.setdefault(cost, []).append(domain)
    for cost, spaces in sorted(by_cost.items()):
        routes.append((spaces, section, cost))
    port = int(c.get("Port") or 25)
    smarthosts = [_text(h).strip() for h in _list(c.get("SmartHosts")) if _text(h).strip()]
    dns = c.get("DNSRoutingEnabled")
    if smarthosts and dns is not True:
        hosts = [f"[{h}]" if ":" in h and not h.startswith("[") else h for h in smarthosts]  # IPv6 literal
        c.keys["smarthosts"] = hosts if port == 25 else [f"{h}:{port}" for h in hosts]
    elif port != 25:
        c.keys["port"] = port
    if obj.get("Fqdn"):
        c.keys["helo_name"] = _text(c.get("Fqdn")).lower()
    if c.get("IgnoreSTARTTLS") is True:
        c.keys["tls"] = "none"
    elif c.get("RequireTLS") is True:
        c.keys["tls"] = "mandatory"
    level = str(c.get("TlsAuthLevel") or "")
    if level and c.keys.get("tls") == "mandatory":
        mapped = {"EncryptionOnly": "encryption_only", "CertificateValidation": "certificate",
                  "DomainValidation": "domain"}.get(level)
        if mapped:
            c.keys["tls_auth_level"] = mapped
        else:
            c.skip("TlsAuthLevel", f"unknown level {level!r}")
    elif level:
        c.skip("TlsAuthLevel", "needs RequireTLS")
    tls_domain = _text(c.get("TlsDomain")).lower()
    if tls_domain and c.keys.get("tls_auth_level") == "domain":
        c.keys["tls_domain"] = tls_domain
    elif tls_domain:
        c.skip("TlsDomain", "used only with TlsAuthLevel DomainValidation")
    cert_name = _text(c.get("TlsCertificateName"))
    if cert_name:
        if opts.tls_cert and c.keys.get("tls") != "none":
            c.keys["tls_certificate"] = opts.tls_cert
            if opts.tls_key:
                c.keys["tls_key"] = opts.tls_key
            c.comments.append(f"TlsCertificateName {cert_name!r}: --tls-cert must be that certificate")
        else:
            c.skip("TlsCertificateName", "names a certificate in the Windows store; export it to PEM and give "
                   "--tls-cert/--tls-key")
    trusted = c.get("CloudServicesMailEnabled") is True
    try:
        sh_auth = _flags(c.get("SmartHostAuthMechanism") or "None")
    except ValueError as e:
        c.skip("SmartHostAuthMechanism", str(e))
        sh_auth = []
    if "ExchangeServer" in sh_auth or "ExternalAuthoritative" in sh_auth:
        trusted = True
        c.comments.append(f"SmartHostAuthMechanism {', '.join(sh_auth)}: the next hop is an Exchange server; "
                          "exmta sends no authentication but keeps the organisation headers")
    elif "BasicAuth" in sh_auth or "BasicAuthRequireTLS" in sh_auth:
        result.unmapped.append((c.label, "SmartHostAuthMechanism",
                                "the password is not exported; set auth_username/auth_password by hand"))
        if any(h.lower().rstrip(".") == "smtp.office365.com" for h in smarthosts):
            result.notes.append(f"send connector {name!r} logs in to smtp.office365.com with Basic SMTP AUTH, which "
                                "Exchange Online turns off (MC786329): use auth = \"xoauth2\" "
                                "(docs/exchange-online-oauth2.rst)")
    if any(h.lower().rstrip(".").endswith(".mail.protection.outlook.com") for h in smarthosts):
        result.notes.append(f"send connector {name!r} goes to Exchange Online: run `exmta exo check` on the result "
                            "(certificate, accepted domains, TLS: MC1226222)")
    if trusted:
        c.keys["send_organization_headers"] = True
    if obj.get("ConnectionInactivityTimeOut") is not None:
        try:
            c.keys["command_timeout"] = parse_timespan(c.get("ConnectionInactivityTimeOut"))
        except ValueError as e:
            c.skip("ConnectionInactivityTimeOut", str(e))
    if obj.get("SmtpMaxMessagesPerConnection"):
        c.keys["max_messages_per_connection"] = int(c.get("SmtpMaxMessagesPerConnection"))
    if str(obj.get("ProtocolLoggingLevel", "")) == "Verbose":
        c.keys["protocol_log"] = "verbose"
    if "ProtocolLoggingLevel" in obj:
        c.get("ProtocolLoggingLevel")
    if "DomainSecureEnabled" in obj:
        c.skip("DomainSecureEnabled", "domain security (mutual TLS by domain list) is not implemented")
    c.finish()
    lines = [f"# from Exchange send connector {name!r}"]
    lines += [f"# {t}" for t in c.comments]
    lines.append(f"[send.{section}]")
    lines += [f"{k} = {_q(v)}" for k, v in c.keys.items()]
    return lines


def import_exchange(objects: list[dict[str, Any]], opts: ImportOptions | None = None) -> Import:
    """Map the cmdlets' objects (any mix) to an exmta configuration."""
    opts = opts or ImportOptions()
    result = Import()
    receive = [o for o in objects if kind_of(o) == "receive"]
    send = [o for o in objects if kind_of(o) == "send"]
    domains = [o for o in objects if kind_of(o) == "accepted_domain"]
    for o in objects:
        if kind_of(o) is None:
            result.unmapped.append((str(o.get("Identity") or o.get("Name") or "an object"), "*",
                                    "not a receive connector, send connector or accepted domain"))

    body: list[str] = []
    names: set[str] = set()
    hostname = opts.hostname
    accepted: list[tuple[str, str]] = []
    for o in domains:
        c = _Connector(result, f"accepted domain {o.get('Name') or o.get('DomainName')!r}", o)
        dname = _text(c.get("DomainName")).lower()
        dtype = c.get("DomainType")
        kind = {"Authoritative": "authoritative", "InternalRelay": "internal_relay",
                "ExternalRelay": "external_relay"}.get(str(dtype))
        if kind is None:
            c.skip("DomainType", f"{dtype!r} is not Authoritative, InternalRelay or ExternalRelay")
            kind = "authoritative"
        if o.get("MatchSubDomains") is True:
            c.get("MatchSubDomains")
            accepted.append((f"*.{dname.lstrip('*.')}", kind))
        accepted.append((dname, kind))
        c.finish()
        if c.comments:
            body.append("# accepted domain " + dname + ": " + "; ".join(c.comments))
    servers = sorted({str(o.get("Server") or "") for o in receive} - {""})
    server = opts.server or (servers[0] if len(servers) > 1 else None)
    if server is not None:
        others = [n for n in servers if n.lower() != server.lower()]
        if others:
            result.notes.append(f"receive connectors of {', '.join(others)} not imported: exmta takes the place of "
                                f"one server ({server}); run again with --server for another")
        for o in receive:
            if str(o.get("Server") or server).lower() != server.lower():
                result.unmapped.append((f"receive connector {o.get('Name')!r}", "*",
                                        f"on server {o.get('Server')}, not {server} (--server)"))
        receive = [o for o in receive if str(o.get("Server") or server).lower() == server.lower()]
    sections: list[list[str]] = []
    for o in receive:
        out = _receive(result, o, opts, names)
        if out is not None:
            sections.append(out[1])
            if hostname is None and "Fqdn" in o and o["Fqdn"]:
                hostname = _text(o["Fqdn"]).lower()
    send_names: set[str] = set()
    routes: list[tuple[list[str], str, int]] = []
    for o in send:
        out_send = _send(result, o, opts, send_names, routes)
        if out_send is not None:
            sections.append(out_send)
    if opts.mailbox_host and accepted:
        local = [d for d, k in accepted if k in ("authoritative", "internal_relay")]
        section = "mailbox"
        while section in send_names:
            section += "-2"
        sections.append(["# mail for the accepted domains goes to the Exchange server (--mailbox-host)",
                         f"[send.{section}]", f"smarthosts = {_q([opts.mailbox_host])}",
                         "send_organization_headers = true"])
        routes.append((local, section, 1))
    elif accepted:
        result.notes.append("no route for the accepted domains (Exchange delivered them to mailboxes): give "
                            "--mailbox-host EXCHANGE-SERVER to route them to it")

    header = ["# exmta configuration imported from Exchange by `exmta import exchange`.",
              "# Review every 'not mapped' line before use; ports, certificates and passwords need you.", "",
              "[server]"]
    header.append(f"hostname = {_q(hostname or 'localhost')}")
    header.append(f"data_dir = {_q(opts.data_dir)}")
    header.append("")
    if accepted:
        header.append("[accepted_domains]")
        header += [f"{_q(d)} = {_q(k)}" for d, k in dict(accepted).items()]
        header.append("")
    text = "\n".join(header + body)
    for s in sections:
        text += "\n" + "\n".join(s) + "\n"
    for spaces, connector, cost in routes:
        text += f"\n[[route]]\ndomains = {_q(spaces)}\nconnector = {_q(connector)}\n"
        if cost != 1:
            text += f"cost = {cost}\n"
    if result.notes:
        text += "\n" + "\n".join(f"# NOTE: {n}" for n in result.notes) + "\n"
    result.toml = text
    return result


def main(args: Any) -> int:
    """``exmta import exchange FILE... [-o OUT]``: 0 written, 2 unreadable input."""
    objects: list[dict[str, Any]] = []
    for path in args.files:
        try:
            with open(path, "rb") as f:
                objects += load_objects(f.read())
        except (OSError, ValueError) as e:
            print(f"{path}: {e}", file=sys.stderr)
            return 2
    opts = ImportOptions(hostname=args.hostname, data_dir=args.data_dir, tls_cert=args.tls_cert,
                         tls_key=args.tls_key, auth_backend=args.auth_backend,
                         relay_connectors=tuple(args.relay_connector or ()), mailbox_host=args.mailbox_host,
                         server=args.server)
    result = import_exchange(objects, opts)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(result.toml)
    else:
        sys.stdout.write(result.toml)
    print(f"{len(result.unmapped)} propert(ies) not mapped:", file=sys.stderr)
    grouped: dict[tuple[str, str], list[str]] = {}
    for obj, prop, why in result.unmapped:
        grouped.setdefault((obj, why), []).append(prop)
    for (obj, why), props in grouped.items():
        print(f"  {obj}: {', '.join(props)}: {why}", file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
