"""The validated, frozen configuration that every component is built from.

:mod:`exmta.config.load` turns TOML into these objects and reports every
problem at once; components take only the part of the config they need.
Sizes are in octets and durations in seconds here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from exmta.tlspolicy.config import TLSPolicyConfig


@dataclass(frozen=True)
class AcceptedDomain:
    """An Exchange accepted domain. ``kind`` is authoritative, internal_relay or external_relay."""

    name: str  # lower case, no trailing dot; "*.example.com" matches subdomains
    kind: str = "authoritative"

    def matches(self, domain: str) -> bool:
        d = domain.lower().rstrip(".")
        if self.name.startswith("*."):
            return d.endswith(self.name[1:])
        return d == self.name


@dataclass(frozen=True)
class TLSCertificateConfig:
    """One PEM certificate (optionally followed by its chain) and its key; see exmta.tls.certs."""

    cert: str                             # PEM file: the certificate, then any intermediates
    key: str | None = None                # PEM private key file; None = the key is in ``cert``
    chain: str | None = None              # PEM intermediates, when not appended to ``cert``
    names: tuple[str, ...] = ()           # SNI names this certificate serves ("*.example" allowed)


@dataclass(frozen=True)
class ReceiveTLSConfig:
    """TLS of one receive connector ([receive.NAME.tls]); see exmta.tls.context."""

    certificate: TLSCertificateConfig
    sni: tuple[TLSCertificateConfig, ...] = ()   # more certificates chosen by the client's SNI name
    implicit: bool = False                # TLS from the first byte (port 465, RFC 8314) instead of STARTTLS
    min_version: str = "1.2"              # "1.2" or "1.3"
    ciphers: str | None = None            # OpenSSL cipher string for TLS 1.2; None = modern AEAD list
    legacy_networks: tuple[str, ...] = ()     # CIDRs that may use TLS 1.0/1.1 (old scanners, printers)
    plaintext_networks: tuple[str, ...] = ()  # CIDRs exempt from require_tls
    client_certificate: str = "none"      # "none" | "request" | "require" (partner connectors)
    client_ca: str | None = None          # PEM CAs for client certificates; None = the system store
    client_names: tuple[str, ...] = ()    # accepted client certificate subject CN / SAN DNS names
    reload_interval: float = 60.0         # seconds between checks of the files' mtimes; 0 = only SIGHUP


@dataclass(frozen=True)
class AuthBackendConfig:
    """[auth.NAME]: where SMTP AUTH checks passwords (exmta.auth). ``kind`` is "users" or "ldap"."""

    name: str
    kind: str = "users"
    path: str | None = None               # users: the users file (`exmta users add FILE USER`)
    uri: str | None = None                # ldap: ldap://host:389 (StartTLS) or ldaps://host:636
    tls: str = "starttls"                 # ldap: "starttls" | "ldaps" | "none" (loopback directories only)
    ca_file: str | None = None            # ldap: PEM CAs for the directory's certificate; None = system store
    base_dn: str = ""                     # ldap: where users are searched
    bind_dn: str | None = None            # ldap: lookup account; None = anonymous lookup
    bind_password: str | None = None
    login_attributes: tuple[str, ...] = ("sAMAccountName", "userPrincipalName", "mail")
    user_filter: str = ""                 # ldap: ANDed with the lookup, e.g. "(objectClass=user)"
    identity_attributes: tuple[str, ...] = ("userPrincipalName", "mail")  # the session's auth identity
    timeout: float = 10.0                 # ldap: connect and each operation


@dataclass(frozen=True)
class ReceiveConnectorConfig:
    name: str
    listen: tuple[str, ...] = ("tcp:2525:interface=127.0.0.1",)
    hostname: str = "localhost"           # FQDN in the banner, EHLO reply and Received
    banner: str | None = None             # text after the hostname in the 220 greeting
    max_message_size: int = 36 * 1024 * 1024
    max_recipients: int = 200             # per message (Exchange's default)
    max_errors: int = 10                  # bad commands before 421 and close
    max_command_line: int = 512           # RFC 5321 4.5.3.1.4, including CRLF
    max_text_line: int = 0                # 0 = no limit (Postfix, Exchange); 1000 = RFC 5321 4.5.3.1.6, incl. CRLF
    command_timeout: float = 300.0        # RFC 5321 4.5.3.2.7 server timeout
    data_timeout: float = 180.0           # between two reads inside DATA/BDAT
    min_data_rate: int = 500              # octets/s: DATA/BDAT may last data_timeout + size / rate; 0 = no limit
    bare_lf: str = "reject"               # "reject" or "normalize" (SMTP smuggling defence)
    relay_networks: tuple[str, ...] = ()  # CIDRs whose clients may relay to any domain
    filters: tuple[str, ...] = ()         # filter instance names, in order
    add_received: bool = True
    tls: ReceiveTLSConfig | None = None   # None: no STARTTLS on this connector
    require_tls: bool = False             # MAIL before STARTTLS gets 530 5.7.0 (Exchange RequireTLS)
    # connector security (exmta.receive.ranges / policy): Exchange RemoteIPRanges, PermissionGroups, limits
    remote_ranges: tuple[str, ...] = ("0.0.0.0/0", "::/0")  # clients served; on one endpoint the most specific wins
    permission_groups: tuple[str, ...] = ("anonymous", "authenticated")  # | "partners" | "exchange_servers"
    externally_secured: bool = False      # every client in remote_ranges is an exchange_servers member
    max_connections: int = 5000           # open sessions in total (Exchange MaxInboundConnection); 0 = none
    max_connections_per_ip: int = 20      # per source address (MaxInboundConnectionPerSource); 0 = none
    messages_per_minute_per_ip: int = 0   # MAIL FROM per source address per minute; 0 = no limit
    recipients_per_minute_per_ip: int = 0
    messages_per_minute_per_user: int = 0  # per authenticated user
    recipients_per_minute_per_user: int = 0
    # SMTP AUTH (exmta.auth): Exchange AuthMechanism BasicAuthRequireTLS, AuthTarpitInterval, MaxLogonFailures
    auth: tuple[str, ...] = ()            # SASL mechanisms offered ("PLAIN", "LOGIN"); empty = no AUTH
    auth_backend: str | None = None       # an [auth.NAME] section, or a users file path
    auth_before_tls_networks: tuple[str, ...] = ()  # CIDRs that may AUTH without TLS (pinned networks only)
    auth_tarpit: float = 5.0              # delay before each 535
    auth_lockout_source_failures: int = 10  # failures per source (IPv6: /64) in the window; 0 = off
    auth_lockout_user_failures: int = 5   # failures per user name in the window; 0 = off
    auth_lockout_window: float = 600.0
    auth_lockout_duration: float = 900.0
    accept_any_sender: bool = False       # true: no send-as check (Ms-Exch-SMTP-Accept-Any-Sender)
    protocol_log: str = "off"             # "off" | "verbose": SMTP transcript (exmta.observe.protocol)
    # abuse limits (exmta.smtp.limits, read by exmta.config.abuse)
    max_header_size: int = 256 * 1024     # the header block; more gets 552 5.3.4 (Exchange MaxHeaderSize)
    max_header_field: int = 100 * 1024    # one field with its continuation lines (Postfix header_size_limit)
    max_refused_recipients: int = 20      # 5xx RCPT replies per session before 421 4.7.0 and close; 0 = none
    refused_recipients_tarpit_after: int = 10  # refused RCPTs after which each refusal waits the tarpit
    refused_recipients_tarpit: float = 1.0  # seconds (Postfix smtpd_soft_error_limit, smtpd_error_sleep_time)
    proxy_header_timeout: float = 10.0    # haproxy: listeners: the PROXY header must arrive within this
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1/128")  # peers that may send a PROXY header
    # connection filtering (exmta.receive.screen; exmta.config.connfilter): DNS lists and the greet pause
    greet_pause: float = 0.0              # seconds before the 220; a client talking first is refused (0 = off)
    dnsbl_sites: tuple[str, ...] = ()     # [connection_filter.lists.NAME] checked at connect
    connection_filter_exempt: tuple[str, ...] = ()  # CIDRs never screened (relay_networks never are either)
    connection_filter: Any = None         # exmta.config.connfilter.ConnectionFilterConfig of dnsbl_sites, or None


@dataclass(frozen=True)
class SmartHost:
    host: str
    port: int = 25


@dataclass(frozen=True)
class OAuth2Config:
    """[send.NAME.oauth2]: the app registration whose tokens log in with XOAUTH2 (exmta.send.oauth2)."""

    token_endpoint: str                   # Entra: https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token
    client_id: str
    tenant: str | None = None             # for the cache key and the default token_endpoint
    scope: str = "https://outlook.office365.com/.default"
    client_secret: str | None = None      # one of: client_secret, client_secret_file, certificate
    client_secret_file: str | None = None
    certificate: str | None = None        # PEM certificate: a private_key_jwt assertion (RS256, x5t)
    private_key: str | None = None        # its PEM key; None = in certificate
    send_as: str = "mailbox"              # XOAUTH2 user=: "mailbox" (fixed) | "sender" (SMTP.SendAsApp)
    mailbox: str | None = None            # the fixed mailbox; with "sender", used for the null sender
    timeout: float = 30.0                 # one token request
    refresh_before: float = 300.0         # fetch a new token this long before the old one expires


@dataclass(frozen=True)
class SendConnectorConfig:
    name: str
    kind: str = "smtp"                    # "smtp" | "lmtp" | "maildir"
    smarthosts: tuple[SmartHost, ...] = ()  # smtp: try in order; empty means DNS MX
    port: int = 25                        # smtp with MX: the port to connect to
    lmtp: str | None = None               # lmtp: "host:port" or "unix:/path"
    maildir_root: str | None = None       # maildir: <root>/<domain>/<local-part>/
    helo_name: str | None = None          # defaults to the server hostname
    tls: str = "opportunistic"            # "none" | "opportunistic" | "mandatory"
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    max_per_destination: int = 20         # concurrent connections per next hop
    max_messages_per_connection: int = 100
    auth_username: str | None = None
    auth_password: str | None = None
    auth: str | None = None               # "xoauth2": log in with OAuth2 tokens from [send.NAME.oauth2]
    oauth2: OAuth2Config | None = None
    dns_servers: tuple[str, ...] = ()     # "ip" or "ip:port"; empty = system resolver
    dkim_sign: bool = False               # DKIM-sign with the [[dkim.keys]] of the author domain
    tls_auth_level: str = "encryption_only"  # | "certificate" | "domain" (Exchange TlsAuthLevel)
    tls_domain: str | None = None         # "domain": the name the certificate must match (default: host)
    tls_ca_file: str | None = None        # PEM CA bundle for validation; None = the system store
    tls_certificate: str | None = None    # PEM client certificate (+chain) to present (TlsCertificateName)
    tls_key: str | None = None            # its key; None = in tls_certificate
    protocol_log: str = "off"             # "off" | "verbose": SMTP transcript (exmta.observe.protocol)
    send_organization_headers: bool = False  # keep X-MS-Exchange-Organization-* etc. (exmta.send.header_firewall)


@dataclass(frozen=True)
class RouteConfig:
    domains: tuple[str, ...]              # "example.com", "*.example.com" or "*"
    connector: str
    cost: int = 1
    # split by recipient set (exmta.routing.split): the tenant's domains to one connector (HVE), the rest here
    internal_connector: str | None = None
    internal_domains: tuple[str, ...] = ()  # empty = every [accepted_domains] entry


@dataclass(frozen=True)
class TransportRulesConfig:
    """[transport_rules]: Exchange-style mail flow rules (exmta.rules); off while ``file`` is None."""

    file: str | None = None               # the rules file (absolute, or relative to this config file)
    reload_interval: float = 2.0          # seconds between checks of the file's mtime (live reload)
    threads: int = 2                      # the bounded pool that parses messages and runs the rules
    limits: tuple[tuple[str, Any], ...] = ()  # MIME inspection limits (exmta.message.Limits) as key/value pairs
    directory: str | None = None          # an [auth.NAME] LDAP back end for FromMemberOf / SentToMemberOf


@dataclass(frozen=True)
class BackPressureConfig:
    """[back_pressure]: new mail gets 452 4.3.1 while a limit is passed (exmta.receive.backpressure)."""

    min_free_disk: int = 100 * 1024 * 1024  # free space on the queue's file system; 0 = not checked
    max_memory: int = 0                   # resident memory of a process; 0 = not checked
    max_queued_messages: int = 0          # messages in the queue; 0 = not checked
    check_interval: float = 5.0


@dataclass(frozen=True)
class QueueConfig:
    retry_schedule: tuple[float, ...] = (300.0, 600.0, 1200.0, 2400.0, 4800.0, 9600.0, 14400.0)
    max_lifetime: float = 5 * 86400.0     # then the message expires and bounces
    delay_warning: float = 4 * 3600.0     # DSN action=delayed after this; 0 = never
    max_active: int = 5000                # messages claimed into memory for delivery at once
    poison_threshold: int = 3             # crashed attempts before a message is held
    pickup_interval: float = 2.0          # seconds between scans of the pickup directory
    store: str = "spool"                  # "spool" (embedded, one node) | "postgres" (shared by nodes: [postgres])


@dataclass(frozen=True)
class PostgresConfig:
    """[postgres]: the shared PostgreSQL queue (exmta.queue.postgres), used when [queue] store = "postgres"."""

    dsn: str = ""                         # libpq conninfo or URI; keep the password in ~/.pgpass, not here
    node: str = ""                        # this node's name in the cluster; default: [server] hostname
    lease: float = 60.0                   # a claimed message returns to the others this long after a node dies
    pool_size: int = 8                    # connections and threads for queue work
    connect_timeout: float = 10.0         # seconds to connect before the work fails as temporary (4xx)
    poll_interval: float = 1.0            # seconds between looks for mail left by other nodes


@dataclass(frozen=True)
class LogsConfig:
    """[logs]: rotation and retention of the tracking and protocol logs (exmta.observe.rotation)."""

    protocol_dir: str | None = None       # default <data_dir>/log/protocol
    rotate_size: int = 64 * 1024 * 1024   # rotate the live file at this size; 0 = never by size
    rotate_age: float = 86400.0           # rotate the live file this long after opening it; 0 = never by age
    keep_age: float = 30 * 86400.0        # delete rotated files older than this; 0 = keep (Exchange MaxAge)
    keep_size: int = 1024 * 1024 * 1024   # rotated files of one log above this: oldest deleted; 0 = no cap


@dataclass(frozen=True)
class AdminConfig:
    """[admin]: the authenticated admin API behind `exmta queue` (exmta.admin)."""

    enabled: bool = True
    listen: tuple[str, ...] = ("tcp:8025:interface=127.0.0.1",)  # also "unix:/run/exmta/admin.sock"
    token_file: str | None = None         # default <data_dir>/admin.token (0600, generated on first start)
    allowed_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")  # other clients get 403
    quarantine_expiry: float = 30 * 86400.0  # quarantined messages older than this are deleted; 0 = keep


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: Prometheus /metrics, /healthz and /readyz (exmta.observe)."""

    enabled: bool = True                  # counters and gauges (needs prometheus-client, the "metrics" extra)
    listen: str | tuple[str, ...] | None = None  # extra unauthenticated listener(s) for /metrics /healthz /readyz
    sample_interval: float = 15.0         # seconds between queue listings for the gauges and alerts
    min_free_disk: int = 100 * 1024 * 1024  # /readyz fails below this many free octets on the queue's disk
    status_page: bool = False             # also serve /status (with tracking search) on ``listen``: no login!
    # clients of ``listen`` outside these are closed when they connect (loopback and private ranges)
    allowed_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12",
                                         "192.168.0.0/16", "fc00::/7")


@dataclass(frozen=True)
class AlertRuleConfig:
    """[alerts.rule.NAME]; kinds and units in exmta.observe.alerts.RULE_KINDS."""

    name: str
    kind: str
    threshold: float
    window: float = 900.0                 # rates and counts: seconds looked back
    min_events: int = 20                  # rates: fewer events in the window never fire
    clear_ratio: float = 0.8              # hysteresis: clears at threshold*ratio (above) or /ratio (below)
    certificates: tuple[str, ...] = ()    # cert_expiry: PEM files (default: the receive connectors' certificates)


@dataclass(frozen=True)
class AlertsConfig:
    """[alerts]: rules evaluated every ``interval``; notifications logged, mailed, posted."""

    interval: float = 30.0
    repeat: float = 3600.0                # re-notify an alert that still holds this often
    mail_postmaster: bool = True          # mail each state change to the postmaster through the queue
    webhook: str | None = None            # http(s) URL that gets a JSON POST per state change
    webhook_timeout: float = 10.0
    rules: tuple[AlertRuleConfig, ...] = ()


@dataclass(frozen=True)
class DKIMKeyConfig:
    """One DKIM signing key ([[dkim.keys]]); a domain may have several (RSA and Ed25519 together)."""

    domain: str
    selector: str
    key_file: str                         # PEM RSA key or base64 Ed25519 seed (exmta dkim keygen)
    algorithm: str = "rsa-sha256"         # | "ed25519-sha256"
    arc_seal: bool = False                # also ARC-seal (RFC 8617) forwarded mail with this key (RSA; one key)
    on_failure: str = "defer"             # signing fails: "defer" the message (logged) | "send_unsigned"


def auto_receive_workers() -> int:
    """``receive_workers = "auto"`` (the default): one per CPU this process may run on; none on a single CPU."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return cpus if cpus > 1 else 0


@dataclass(frozen=True)
class Config:
    hostname: str = "localhost"
    data_dir: str = "./exmta-data"
    postmaster: str = "postmaster"        # local part; always accepted for local domains
    accepted_domains: tuple[AcceptedDomain, ...] = ()
    receive: tuple[ReceiveConnectorConfig, ...] = ()
    send: tuple[SendConnectorConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    queue: QueueConfig = field(default_factory=QueueConfig)
    postgres: PostgresConfig = field(default_factory=PostgresConfig)
    pickup_dir: str | None = None         # default <data_dir>/pickup
    tracking_log: str | None = None       # default <data_dir>/log/tracking.jsonl
    # extra processes accepting SMTP: by default "auto", one per CPU (0 = the main process only); the
    # limits of a receive connector count every process of the node all the same (exmta.receive.noderates)
    receive_workers: int = field(default_factory=auto_receive_workers)
    spool_io: str = "auto"                # "threads" | "inline" | "auto" (exmta.queue.spool; see main_spool_io)
    spool_sync: str = "auto"              # "fsync" | "syncfs" | "auto" (see spool_sync_for)
    receive_worker_nice: int = 10         # receive workers run this much nicer than the main process
    filters: dict[str, dict[str, Any]] = field(default_factory=dict)
    dkim_keys: tuple[DKIMKeyConfig, ...] = ()  # [[dkim.keys]]: outbound DKIM signing keys
    auth_backends: tuple[AuthBackendConfig, ...] = ()  # [auth.NAME] sections
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logs: LogsConfig = field(default_factory=LogsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    back_pressure: BackPressureConfig = field(default_factory=BackPressureConfig)
    recipient_list: str | None = None     # addresses of authoritative domains (exmta.receive.recipients)
    # filters' own thread pool and checks in flight (exmta.filters.admission); 451 4.3.2 past a bound
    filter_threads: int = 16
    filter_checks_in_flight: int = 200    # filter runs pending in the process; 0 = no bound
    filter_checks_per_client: int = 10    # per source address (IPv6: /64); 0 = no bound
    # recipient validation against LDAP / AD (exmta.receive.directory): an [auth.NAME] of kind ldap
    recipient_directory: str | None = None
    recipient_cache_ttl: float = 60.0     # seconds an answer (known or unknown) is reused
    tls_policy: TLSPolicyConfig = field(default_factory=TLSPolicyConfig)  # [tls_policy] (exmta.tlspolicy)
    transport_rules: TransportRulesConfig = field(default_factory=TransportRulesConfig)
    source: str = "<embedded default>"    # the file this came from, for messages

    @property
    def main_spool_io(self) -> str:
        """How the main process runs its spool's blocking steps.

        ``auto``: inline (block on its own fsyncs, no thread hand-offs) when
        receive workers take the SMTP load, else in the thread pool, so that
        one process serving everything never stalls on a slow disk. Receive
        workers always run inline.
        """
        if self.spool_io != "auto":
            return self.spool_io
        return "inline" if self.receive_workers else "threads"

    def spool_sync_for(self, worker: bool) -> str:
        """How a process makes its spool durable (exmta.queue.spool ``sync``).

        ``auto``: syncfs in receive workers (one journal commit per round of
        commits, measured +27 % relay throughput), fsync in the main process
        (its removals and claims, measured faster there).
        """
        if self.spool_sync != "auto":
            return self.spool_sync
        return "syncfs" if worker else "fsync"

    def auth_backend(self, name: str) -> AuthBackendConfig | None:
        return next((b for b in self.auth_backends if b.name == name), None)

    def send_connector(self, name: str) -> SendConnectorConfig:
        for s in self.send:
            if s.name == name:
                return s
        raise KeyError(name)

    def accepted_domain(self, domain: str) -> AcceptedDomain | None:
        """The most specific accepted domain that matches, or None."""
        best: AcceptedDomain | None = None
        for ad in self.accepted_domains:
            if ad.matches(domain) and (best is None or len(ad.name) > len(best.name)):
                best = ad
        return best
