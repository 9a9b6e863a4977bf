"""Read a TOML file into a validated :class:`~exmta.config.schema.Config`.

Every problem is collected and reported at once, each naming the file, the
key and what is wrong, so that an operator fixes a configuration in one pass.
Nothing here opens sockets or touches the spool. The reader and its converters
are :mod:`exmta.config.reader`; each area reads its own section with them.
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import replace
from typing import Any, Callable

from exmta.admin import config as _ops
from exmta.auth import config as _auth
from exmta.config import abuse as _abuse
from exmta.config import connfilter as _connfilter
from exmta.config.reader import (
    ConfigError,
    Reader,
    config_base,
    config_path,
    endpoints,
    parse_duration,
    parse_size,
    paths_relative_to,
    relative_note,
    relative_paths_note,
    resolve_path,
)
from exmta.config.reader import boolean as _bool
from exmta.config.reader import cidr as _cidr
from exmta.config.reader import choice as _choice
from exmta.config.reader import domain as _domain
from exmta.config.reader import integer as _int
from exmta.config.reader import list_of as _list_of
from exmta.config.reader import nameserver as _nameserver
from exmta.config.reader import nonempty_string as _nonempty_str
from exmta.config.reader import readable_file as _readable_file
from exmta.config.reader import string as _str
from exmta.config.schema import (  # auto_receive_workers: re-exported (``receive_workers = "auto"``)
    AcceptedDomain,
    AlertRuleConfig,
    AlertsConfig,
    BackPressureConfig,
    Config,
    MetricsConfig,
    PostgresConfig,
    QueueConfig,
    ReceiveConnectorConfig,
    RouteConfig,
    SendConnectorConfig,
    auto_receive_workers,
)
from exmta.config.smarthost import smarthost as _smarthost
from exmta.observe.alerts import RULE_KINDS
from exmta.receive.policy import PERMISSION_GROUPS
from exmta.receive.ranges import range_overlaps
from exmta.routing import split as _split
from exmta.rules.config import read_transport_rules
from exmta.send import dkim_sign as _dkim
from exmta.send import oauth2_config as _oauth2
from exmta.tls import config as _tls
from exmta.tlspolicy.config import read_tls_policy

__all__ = [
    "ConfigError", "auto_receive_workers", "config_base", "config_path", "embedded_default", "endpoints",
    "load_config", "parse_config", "parse_duration", "parse_size", "relative_note", "relative_paths_note",
    "resolve_path",
]

_Reader = Reader  # the short names the section readers below use
_DOMAIN_KINDS = ("authoritative", "internal_relay", "external_relay")


def _metrics_listen(v: Any) -> str | tuple[str, ...]:
    """[metrics] listen: a string or a list; one endpoint is kept as a string (as it always was)."""
    eps = endpoints(v)
    if not eps:
        raise ValueError("needs at least one endpoint, e.g. \"tcp:9125:interface=127.0.0.1\" (or leave it out)")
    return eps[0] if len(eps) == 1 else eps


def _receive_workers(v: Any) -> int:
    if v == "auto":
        return auto_receive_workers()
    if isinstance(v, str):
        raise ValueError(f"expected a whole number or \"auto\" (one per CPU), not {v!r}")
    return _int(0)(v)


# ---------------------------------------------------------------- sections


def _read_server(r: _Reader, base: Config) -> dict[str, Any]:
    out = {
        "hostname": r.get("hostname", base.hostname, _domain),
        "data_dir": r.get("data_dir", base.data_dir, config_path),
        "postmaster": r.get("postmaster", base.postmaster, _nonempty_str),
        "pickup_dir": r.get("pickup_dir", base.pickup_dir, config_path),
        "tracking_log": r.get("tracking_log", base.tracking_log, config_path),
        "receive_workers": r.get("receive_workers", base.receive_workers, _receive_workers),
        "spool_io": r.get("spool_io", base.spool_io, _choice("auto", "threads", "inline")),
        "spool_sync": r.get("spool_sync", base.spool_sync, _choice("auto", "fsync", "syncfs")),
        "receive_worker_nice": r.get("receive_worker_nice", base.receive_worker_nice, _int(0, 19)),
        "recipient_list": r.get("recipient_list", base.recipient_list, _readable_file),
        **_abuse.server_abuse_kwargs(r, base),
    }
    r.finish()
    return out


def _read_connector_security(r: _Reader, d: ReceiveConnectorConfig) -> dict[str, Any]:
    """Remote ranges, permission groups and per-client limits of one receive connector."""
    out = {
        "remote_ranges": r.get("remote_ranges", d.remote_ranges, _list_of(_cidr)),
        "permission_groups": r.get("permission_groups", d.permission_groups, _list_of(_choice(*PERMISSION_GROUPS))),
        "externally_secured": r.get("externally_secured", d.externally_secured, _bool),
    }
    for key in ("max_connections", "max_connections_per_ip", "messages_per_minute_per_ip",
                "recipients_per_minute_per_ip", "messages_per_minute_per_user", "recipients_per_minute_per_user"):
        out[key] = r.get(key, getattr(d, key), _int(0))
    if not out["remote_ranges"]:
        r.error("remote_ranges", "needs at least one range (\"0.0.0.0/0\" and \"::/0\" serve everyone)")
    if "exchange_servers" in out["permission_groups"] and not out["externally_secured"]:
        r.error("permission_groups", "exchange_servers needs externally_secured = true and remote_ranges that "
                "list only your own servers (exmta cannot authenticate a server otherwise)")
    if out["externally_secured"] and any(ipaddress.ip_network(n).prefixlen == 0 for n in out["remote_ranges"]):
        r.error("externally_secured", "cannot be true while remote_ranges admits every address: "
                "list the internal servers' ranges")
    return out


def _read_back_pressure(r: _Reader) -> BackPressureConfig:
    d = BackPressureConfig()
    b = BackPressureConfig(
        min_free_disk=r.get("min_free_disk", d.min_free_disk, parse_size),
        max_memory=r.get("max_memory", d.max_memory, parse_size),
        max_queued_messages=r.get("max_queued_messages", d.max_queued_messages, _int(0)),
        check_interval=r.get("check_interval", d.check_interval, parse_duration),
    )
    if b.check_interval <= 0:
        r.error("check_interval", "must be more than 0")
    r.finish()
    return b


def _read_receive(r: _Reader, name: str, hostname: str) -> ReceiveConnectorConfig:
    d = ReceiveConnectorConfig(name=name, hostname=hostname)
    c = ReceiveConnectorConfig(
        name=name,
        listen=r.get("listen", d.listen, endpoints),
        hostname=r.get("hostname", d.hostname, _domain),
        banner=r.get("banner", d.banner, _str),
        max_message_size=r.get("max_message_size", d.max_message_size, parse_size),
        max_recipients=r.get("max_recipients", d.max_recipients, _int(1)),
        max_errors=r.get("max_errors", d.max_errors, _int(1)),
        max_command_line=r.get("max_command_line", d.max_command_line, _int(512)),
        max_text_line=r.get("max_text_line", d.max_text_line, _int(0)),
        command_timeout=r.get("command_timeout", d.command_timeout, parse_duration),
        data_timeout=r.get("data_timeout", d.data_timeout, parse_duration),
        min_data_rate=r.get("min_data_rate", d.min_data_rate, _int(0)),
        bare_lf=r.get("bare_lf", d.bare_lf, _choice("reject", "normalize")),
        relay_networks=r.get("relay_networks", d.relay_networks, _list_of(_cidr)),
        filters=r.get("filters", d.filters, _list_of(_nonempty_str)),
        add_received=r.get("add_received", d.add_received, _bool),
        **_tls.receive_tls_kwargs(r),
    )
    c = replace(c, **_read_connector_security(r, d))
    c = replace(c, **_auth.receive_auth_kwargs(r, d))
    c = replace(c, **_ops.connector_kwargs(r, d))
    c = replace(c, **_abuse.receive_abuse_kwargs(r, d))
    c = replace(c, **_connfilter.receive_kwargs(r, d))
    if not c.listen:
        r.error("listen", "needs at least one endpoint, e.g. \"tcp:25\"")
    if 0 < c.max_text_line < 1000:
        r.error("max_text_line", "must be 0 (no limit) or at least 1000 (RFC 5321 4.5.3.1.6)")
    r.finish()
    return c


def _read_send(r: _Reader, name: str, data_dir: str, source: str = "<string>") -> SendConnectorConfig:
    d = SendConnectorConfig(name=name)
    kind = r.get("type", "smtp", _choice("smtp", "lmtp", "maildir"))
    c = SendConnectorConfig(
        name=name,
        kind=kind,
        smarthosts=r.get("smarthosts", d.smarthosts, _list_of(_smarthost)),
        port=r.get("port", d.port, _int(1)),
        lmtp=r.get("lmtp", d.lmtp, _nonempty_str),
        maildir_root=r.get("root", d.maildir_root, _nonempty_str),
        helo_name=r.get("helo_name", d.helo_name, _domain),
        tls=r.get("tls", d.tls, _choice("none", "opportunistic", "mandatory")),
        connect_timeout=r.get("connect_timeout", d.connect_timeout, parse_duration),
        command_timeout=r.get("command_timeout", d.command_timeout, parse_duration),
        max_per_destination=r.get("max_per_destination", d.max_per_destination, _int(1)),
        max_messages_per_connection=r.get(
            "max_messages_per_connection", d.max_messages_per_connection, _int(1)),
        auth_username=r.get("auth_username", d.auth_username, _nonempty_str),
        auth_password=r.get("auth_password", d.auth_password, _str),
        dns_servers=r.get("dns_servers", d.dns_servers, _list_of(_nameserver)),
        dkim_sign=r.get("dkim_sign", d.dkim_sign, _bool),
        send_organization_headers=r.get("send_organization_headers", d.send_organization_headers, _bool),
        **_tls.read_send_tls(r),
    )
    mx = r.get("mx", None, _bool)
    if kind == "smtp" and mx and c.smarthosts:
        r.error("mx", "cannot be true together with smarthosts (choose DNS MX or smart hosts)")
    if kind == "smtp" and mx is False and not c.smarthosts:
        r.error("smarthosts", "is needed when mx = false")
    if kind == "lmtp" and not c.lmtp:
        r.error("lmtp", "is needed for type = \"lmtp\" (\"host:port\" or \"unix:/path\")")
    if kind == "maildir":
        root = c.maildir_root or "mail"
        c = replace(c, maildir_root=root if os.path.isabs(root) else os.path.join(data_dir, root))
    c = replace(c, **_ops.connector_kwargs(r, d))
    c = replace(c, **_oauth2.read_send_auth(r, source))  # auth = "xoauth2" (exmta.send.oauth2_config)
    if (c.auth_username is None) != (c.auth_password is None):
        r.error("auth_username", "auth_username and auth_password go together")
    _tls.check_send_tls(r, c)
    _oauth2.check_send_auth(r, c)
    r.finish()
    return c


def _read_queue(r: _Reader) -> QueueConfig:
    d = QueueConfig()
    q = QueueConfig(
        retry_schedule=r.get("retry_schedule", d.retry_schedule, _list_of(parse_duration)),
        max_lifetime=r.get("max_lifetime", d.max_lifetime, parse_duration),
        delay_warning=r.get("delay_warning", d.delay_warning, parse_duration),
        max_active=r.get("max_active", d.max_active, _int(1)),
        poison_threshold=r.get("poison_threshold", d.poison_threshold, _int(1)),
        pickup_interval=r.get("pickup_interval", d.pickup_interval, parse_duration),
        store=r.get("store", d.store, _choice("spool", "postgres")),
    )
    if not q.retry_schedule:
        r.error("retry_schedule", "needs at least one interval")
    elif min(q.retry_schedule) <= 0:
        r.error("retry_schedule", "intervals must be positive")
    r.finish()
    return q


def _read_postgres(r: _Reader, store: str) -> PostgresConfig:
    d = PostgresConfig()
    c = PostgresConfig(
        dsn=r.get("dsn", d.dsn, _str),
        node=r.get("node", d.node, _nonempty_str),
        lease=r.get("lease", d.lease, parse_duration),
        pool_size=r.get("pool_size", d.pool_size, _int(1, 200)),
        connect_timeout=r.get("connect_timeout", d.connect_timeout, parse_duration),
        poll_interval=r.get("poll_interval", d.poll_interval, parse_duration),
    )
    if store == "postgres" and not c.dsn.strip():
        r.error("dsn", 'is required with [queue] store = "postgres" (e.g. "host=db1 dbname=exmta user=exmta")')
    if c.lease < 5:
        r.error("lease", "must be at least 5 seconds (a node renews its leases every third of it)")
    if c.poll_interval <= 0:
        r.error("poll_interval", "must be positive")
    r.finish()
    return c


def _read_metrics(r: _Reader) -> MetricsConfig:
    d = MetricsConfig()
    m = MetricsConfig(
        enabled=r.get("enabled", d.enabled, _bool),
        listen=r.get("listen", d.listen, _metrics_listen),
        sample_interval=r.get("sample_interval", d.sample_interval, parse_duration),
        min_free_disk=r.get("min_free_disk", d.min_free_disk, parse_size),
        status_page=r.get("status_page", d.status_page, _bool),
        allowed_networks=r.get("allowed_networks", d.allowed_networks, _list_of(_cidr)),
    )
    if m.sample_interval <= 0:
        r.error("sample_interval", "must be positive")
    r.finish()
    return m


def _read_alerts(r: _Reader) -> AlertsConfig:
    d = AlertsConfig()
    rules = []
    rs = r.sub("rule")
    for name in list(rs.table):
        rs.used.add(name)
        t = rs.sub(name)
        kind = t.get("kind", "", _choice(*RULE_KINDS))
        if "kind" not in t.table:
            t.error("kind", f"is required: one of {', '.join(RULE_KINDS)}")
        threshold = t.get("threshold", None, _threshold(kind))
        if threshold is None and "threshold" not in t.table:
            t.error("threshold", "is required (a number; durations and sizes may use units)")
        rule = AlertRuleConfig(
            name=name, kind=kind, threshold=float(threshold or 0),
            window=t.get("window", 900.0, parse_duration),
            min_events=t.get("min_events", 20, _int(0)),
            clear_ratio=t.get("clear_ratio", 0.8, _ratio),
            certificates=t.get("certificates", (), _list_of(config_path)),
        )
        if rule.window <= 0:
            t.error("window", "must be positive")
        t.finish()
        rules.append(rule)
    a = AlertsConfig(
        interval=r.get("interval", d.interval, parse_duration),
        repeat=r.get("repeat", d.repeat, parse_duration),
        mail_postmaster=r.get("mail_postmaster", d.mail_postmaster, _bool),
        webhook=r.get("webhook", d.webhook, _http_url),
        webhook_timeout=r.get("webhook_timeout", d.webhook_timeout, parse_duration),
        rules=tuple(rules),
    )
    for key in ("interval", "repeat", "webhook_timeout"):
        if getattr(a, key) <= 0:
            r.error(key, "must be positive")
    r.finish()
    return a


def _threshold(kind: str) -> Callable[[Any], float]:
    def convert(v: Any) -> float:
        if kind == "oldest_message":
            return parse_duration(v)
        if kind == "disk_space":
            return float(parse_size(v))
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"expected a number, not {v!r}")
        if v < 0:
            raise ValueError("cannot be negative")
        if kind in ("deferral_rate", "bounce_rate", "timeout_rate") and v > 1:
            raise ValueError(f"is a ratio between 0 and 1, not {v!r}")
        return float(v)
    return convert


def _ratio(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise ValueError(f"expected a number in (0, 1], not {v!r}")
    return float(v)


def _http_url(v: Any) -> str:
    s = _str(v)
    if not re.match(r"^https?://[^/\s]+(/\S*)?$", s):
        raise ValueError(f"expected an http:// or https:// URL, not {s!r}")
    return s


def _filter_common_keys(r: _Reader) -> dict[str, Any]:
    """A [filters.NAME] table with the core's keys checked: ``timeout`` (a duration) and ``on_error``.

    The other keys belong to the plugin, which checks them (exmta.config.check loads it).
    """
    out = dict(r.table)
    if "timeout" in out:
        timeout = r.get("timeout", None, parse_duration)
        if timeout is None:
            del out["timeout"]
        elif timeout <= 0:
            r.error("timeout", "must be more than 0")
            del out["timeout"]
        else:
            out["timeout"] = timeout
    if "on_error" in out:
        out["on_error"] = r.get("on_error", "tempfail", _choice("tempfail", "continue"))
    return out


def _read_routes(problems: list[str], routes: Any) -> tuple[RouteConfig, ...]:
    if not isinstance(routes, list):
        problems.append("route: must be an array of tables ([[route]])")
        return ()
    out = []
    for i, table in enumerate(routes):
        r = _Reader(problems, f"route[{i + 1}]", table)
        domains = r.get("domains", (), _list_of(_domain))
        connector = r.get("connector", "", _nonempty_str)
        cost = r.get("cost", 1, _int(0))
        split = _split.read_split(r)
        if not domains:
            r.error("domains", "needs at least one domain pattern (\"*\" matches everything)")
        if not connector:
            r.error("connector", "is required: the name of a [send.NAME] connector")
        r.finish()
        out.append(RouteConfig(domains, connector, cost, **split))
    return tuple(out)


def _shared_listener_problems(receive: list[ReceiveConnectorConfig]) -> list[str]:
    """Connectors may share a listen endpoint when their remote_ranges tell them apart."""
    problems = []
    seen: dict[str, list[ReceiveConnectorConfig]] = {}
    for rc in receive:
        for ep in rc.listen:
            for other in seen.get(ep, ()):
                same = range_overlaps(rc.remote_ranges, other.remote_ranges)
                if same:
                    problems.append(
                        f"receive.{rc.name}.listen: {ep!r} is also used by receive.{other.name} with the same "
                        f"remote_ranges ({', '.join(same)}); give each connector on one endpoint different ranges")
            seen.setdefault(ep, []).append(rc)
    return problems


# ---------------------------------------------------------------- entry points


def embedded_default(data_dir: str = "./exmta-data") -> Config:
    """The configuration used when no file is given: useful with no outside server.

    Accepts mail on 127.0.0.1:2525 for example.test and localhost, delivers it to
    Maildir folders under ``<data_dir>/mail``, and relays other domains by DNS MX
    for clients on loopback.
    """
    return Config(
        hostname="localhost",
        data_dir=data_dir,
        accepted_domains=(AcceptedDomain("example.test"), AcceptedDomain("localhost")),
        receive=(
            ReceiveConnectorConfig(
                name="default",
                listen=("tcp:2525:interface=127.0.0.1",),
                hostname="localhost",
                relay_networks=("127.0.0.0/8", "::1/128"),
            ),
        ),
        send=(
            SendConnectorConfig(name="local", kind="maildir", maildir_root=os.path.join(data_dir, "mail")),
            SendConnectorConfig(name="internet", kind="smtp"),
        ),
        routes=(
            RouteConfig(("example.test", "localhost"), "local"),
            RouteConfig(("*",), "internet"),
        ),
        receive_workers=auto_receive_workers(),  # the default: one receive worker per CPU
    )


def load_config(path: str, data_dir: str | None = None) -> Config:
    """Read and validate ``path``; raise ConfigError listing every problem."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, ["the file does not exist"]) from None
    except OSError as e:
        raise ConfigError(path, [f"cannot be read: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"is not valid TOML: {e}"]) from None
    return parse_config(raw, source=path, data_dir=data_dir)


def parse_config(raw: dict[str, Any], source: str = "<string>", data_dir: str | None = None) -> Config:
    """Validate ``raw`` (read from ``source``); relative paths are relative to ``source``'s directory."""
    with paths_relative_to(source):
        return _parse_config(raw, source, data_dir)


def _parse_config(raw: dict[str, Any], source: str, data_dir: str | None) -> Config:
    problems: list[str] = []
    top = _Reader(problems, "", raw)
    base = Config(hostname=socket.gethostname().lower() or "localhost")
    server = _read_server(top.sub("server"), base)
    if data_dir is not None:
        server["data_dir"] = data_dir
    hostname = server["hostname"]

    accepted: list[AcceptedDomain] = []
    ad = top.sub("accepted_domains")
    for name in list(ad.table):
        kind = ad.get(name, "authoritative", _choice(*_DOMAIN_KINDS))
        try:
            accepted.append(AcceptedDomain(_domain(name), kind))
        except ValueError as e:
            ad.error(name, str(e))

    receive = []
    rs = top.sub("receive")
    for name in list(rs.table):
        rs.used.add(name)
        receive.append(_read_receive(rs.sub(name), name, hostname))
    receive = _connfilter.read_connection_filter(top.sub("connection_filter"), receive)  # DNS lists

    send = []
    ss = top.sub("send")
    for name in list(ss.table):
        ss.used.add(name)
        send.append(_read_send(ss.sub(name), name, server["data_dir"], source))

    top.used.add("route")
    routes = _read_routes(problems, raw.get("route", []))
    queue = _read_queue(top.sub("queue"))
    postgres = _read_postgres(top.sub("postgres"), queue.store)
    logs = _ops.read_logs(top.sub("logs"))
    admin = _ops.read_admin(top.sub("admin"))
    back_pressure = _read_back_pressure(top.sub("back_pressure"))
    metrics = _read_metrics(top.sub("metrics"))
    alerts = _read_alerts(top.sub("alerts"))
    auth_backends = _auth.read_auth_backends(top.sub("auth"), source)

    dkim_keys = _dkim.read_dkim(top.sub("dkim"), server["data_dir"])
    tls_policy = read_tls_policy(top.sub("tls_policy"), server["data_dir"])  # MTA-STS, DANE, TLS-RPT
    # [transport_rules]: reads and checks the rules file
    transport_rules = read_transport_rules(top.sub("transport_rules"), source, {s.name for s in send},
                                           {b.name: b.kind for b in auth_backends})

    filters: dict[str, dict[str, Any]] = {}
    fs = top.sub("filters")
    for name, table in fs.table.items():
        fs.used.add(name)
        if not isinstance(table, dict):
            fs.error(name, "must be a table with at least plugin = \"...\"")
        elif not isinstance(table.get("plugin"), str):
            fs.error(f"{name}.plugin", "is required: the entry-point name of the filter (group exmta.filters)")
        else:
            filters[name] = _filter_common_keys(_Reader(problems, f"filters.{name}", table))
    top.finish()

    # cross-references
    send_names = {s.name for s in send}
    for i, route in enumerate(routes):
        if route.connector and route.connector not in send_names:
            problems.append(
                f"route[{i + 1}].connector: no [send.{route.connector}] connector "
                f"(defined: {', '.join(sorted(send_names)) or 'none'})"
            )
    routes, split_problems = _split.resolve_split(routes, accepted, send_names)
    problems += split_problems
    for rc in receive:
        for f in rc.filters:
            if f not in filters:
                problems.append(f"receive.{rc.name}.filters: no [filters.{f}] section")
    if not receive:
        problems.append("receive: at least one [receive.NAME] connector is needed")
    problems += _shared_listener_problems(receive)
    receive, auth_problems = _auth.resolve_references(receive, auth_backends, source)
    problems += auth_problems
    problems += _abuse.directory_problems(server["recipient_directory"], auth_backends)

    if problems:
        raise ConfigError(source, problems)
    return Config(
        hostname=hostname,
        data_dir=server["data_dir"],
        postmaster=server["postmaster"],
        accepted_domains=tuple(accepted),
        receive=tuple(receive),
        send=tuple(send),
        routes=routes,
        queue=queue,
        postgres=postgres,
        logs=logs,
        admin=admin,
        pickup_dir=server["pickup_dir"],
        tracking_log=server["tracking_log"],
        receive_workers=server["receive_workers"],
        spool_io=server["spool_io"],
        spool_sync=server["spool_sync"],
        receive_worker_nice=server["receive_worker_nice"],
        back_pressure=back_pressure,
        recipient_list=server["recipient_list"],
        **{key: server[key] for key in _abuse.SERVER_KEYS},
        filters=filters,
        dkim_keys=dkim_keys,
        tls_policy=tls_policy,
        metrics=metrics,
        alerts=alerts,
        auth_backends=auth_backends,
        transport_rules=transport_rules,
        source=source,
    )
