"""Several receive connectors on one listen endpoint, chosen by remote IP range.

Exchange binds a receive connector to ``Bindings`` (local address and port)
and ``RemoteIPRanges``; when several connectors share a binding, the one whose
range matches the client most specifically wins (a single address beats a
/24, which beats 0.0.0.0/0). exmta does the same: one listening socket per
endpoint string, and a :class:`DispatchingFactory` on it that sends each new
connection to the connector whose ``remote_ranges`` match its source address
with the longest prefix. A connection that no connector admits gets
``554 5.7.1`` and is closed; one past a connector's connection limits (in
total or from one source address) gets ``421 4.7.0`` and is closed. Both are
logged.

A client on a UNIX socket endpoint has no address: the first connector
listening there serves it.

The choice is made when the connection is made, so that the chosen
connector's banner is the first thing the client sees. Behind a PROXY
protocol (``haproxy:`` endpoints) the client address is only known once the
PROXY header has been read: :mod:`exmta.receive.proxy` holds the SMTP
session back until then.
"""
from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

from exmta.model import Reply

__all__ = [
    "ANY_RANGES", "ConnectionCounter", "ConnectorEntry", "DispatchingFactory", "group_listeners", "ip_in",
    "parse_ip", "parse_ranges", "range_overlaps", "select_connector",
]

log = Logger()

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: the default ``remote_ranges``: every IPv4 and IPv6 client
ANY_RANGES: tuple[str, ...] = ("0.0.0.0/0", "::/0")

NO_CONNECTOR = Reply.make(554, "5.7.1", "Your address is not allowed to connect to this server")


@functools.lru_cache(maxsize=4096)  # called several times per session with the same few peers
def parse_ip(text: str) -> IPAddress | None:
    """``text`` as an address; an IPv4-mapped IPv6 address is the IPv4 one; None when it is no IP."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:192.0.2.1 on a dual-stack socket is 192.0.2.1
    return ip


def ip_in(text: str | None, networks: Sequence[IPNetwork]) -> bool:
    """Whether the address ``text`` (IPv4-mapped IPv6 counts as IPv4) is in one of ``networks``."""
    ip = parse_ip(text) if text else None
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


def parse_ranges(ranges: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDR strings as networks (host bits ignored; a bare address is a /32 or /128)."""
    return tuple(ipaddress.ip_network(r.strip(), strict=False) for r in ranges)


def best_prefix(ip: IPAddress | None, networks: Sequence[IPNetwork]) -> int | None:
    """The longest prefix length among ``networks`` that contain ``ip``, or None."""
    if ip is None:
        return None
    best: int | None = None
    for net in networks:
        if net.version == ip.version and ip in net and (best is None or net.prefixlen > best):
            best = net.prefixlen
    return best


def range_overlaps(a: Sequence[str], b: Sequence[str]) -> list[str]:
    """Ranges listed identically in both (those would make the choice between two connectors a tie)."""
    nets_b = set(parse_ranges(b))
    return [str(n) for n in parse_ranges(a) if n in nets_b]


@functools.lru_cache(maxsize=4096)
def _source(ip: str) -> str:
    """The per-source key: an IPv4 address, or the /64 of an IPv6 one (one host owns a whole /64)."""
    from exmta.auth.lockout import source_key

    return source_key(ip)


class ConnectionCounter:
    """Open connections of one receive connector, in total and per source (IPv6: per /64)."""

    def __init__(self, max_total: int = 0, max_per_ip: int = 0) -> None:
        self.max_total = max_total      # 0 = no limit
        self.max_per_ip = max_per_ip    # 0 = no limit
        self.total = 0
        self.per_ip: dict[str, int] = {}

    def refusal(self, ip: str) -> str | None:
        """Why one more connection from ``ip`` is not allowed, or None."""
        if self.max_total and self.total >= self.max_total:
            return f"too many connections ({self.total}, limit {self.max_total})"
        if self.max_per_ip and self.per_ip.get(_source(ip), 0) >= self.max_per_ip:
            return f"too many connections from {_source(ip)} (limit {self.max_per_ip})"
        return None

    def opened(self, ip: str) -> None:
        self.total += 1
        ip = _source(ip)
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1

    def closed(self, ip: str) -> None:
        self.total = max(0, self.total - 1)
        ip = _source(ip)
        n = self.per_ip.get(ip, 0) - 1
        if n > 0:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)


@dataclass
class ConnectorEntry:
    """One receive connector as the dispatcher sees it.

    ``config_source`` (the connector's ESMTPServerFactory) is asked for its
    ``config`` before each choice: when a reload (SIGHUP) gave it a new
    ReceiveConnectorConfig, the new remote_ranges and connection limits apply
    to the next connection.
    """

    name: str
    factory: Any                         # builds the SMTP session (its listening factory)
    ranges: tuple[IPNetwork, ...]
    counter: ConnectionCounter = field(default_factory=ConnectionCounter)
    hostname: str = "localhost"
    config_source: Any = None
    _config: Any = None
    table: Any = None                    # ranges as integers (select_connector), built from table_of
    table_of: Any = None

    @classmethod
    def from_config(cls, rc: Any, factory: Any, config_source: Any = None) -> ConnectorEntry:
        entry = cls(rc.name, factory, (), ConnectionCounter(), rc.hostname, config_source)
        entry.apply(rc)
        return entry

    def apply(self, rc: Any) -> None:
        """Take ranges, limits and hostname from ``rc`` (open connections stay counted)."""
        self._config = rc
        self.ranges = parse_ranges(getattr(rc, "remote_ranges", ANY_RANGES))
        self.counter.max_total = getattr(rc, "max_connections", 0)
        self.counter.max_per_ip = getattr(rc, "max_connections_per_ip", 0)
        self.hostname = rc.hostname

    def refresh(self) -> None:
        rc = getattr(self.config_source, "config", None)
        if rc is not None and rc is not self._config:
            try:
                self.apply(rc)
            except ValueError:
                log.failure("receive.{connector}: new remote_ranges not usable, the old ones stay", connector=self.name)
                self._config = rc


def _table(ranges: Sequence[IPNetwork]) -> tuple[tuple[int, int, int, int], ...]:
    """(version, network as int, netmask as int, prefix length) for quick matching."""
    return tuple((n.version, int(n.network_address), int(n.netmask), n.prefixlen) for n in ranges)


def select_connector(entries: Sequence[ConnectorEntry], peer_ip: str) -> ConnectorEntry | None:
    """The entry whose ranges match ``peer_ip`` most specifically; the first listed wins a tie."""
    ip = parse_ip(peer_ip)
    if ip is None:
        return None
    version, value = ip.version, int(ip)
    chosen, chosen_len = None, -1
    for entry in entries:
        table = entry.table
        if table is None or entry.table_of is not entry.ranges:
            table = entry.table = _table(entry.ranges)
            entry.table_of = entry.ranges
        for v, net, mask, length in table:
            if v == version and length > chosen_len and value & mask == net:
                chosen, chosen_len = entry, length
    return chosen


class _Refuse(Protocol):
    """Sends one reply and closes: for connections no connector may take."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def connectionMade(self) -> None:
        self.transport.write(self.reply.to_bytes())
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass  # nothing the client says changes anything


class _Admission(Protocol):
    """A receive worker's new session, held until the main process admits it (node-wide connection limits).

    What the client says meanwhile is kept and handed to the session once it
    starts; a refusal is the same 421 as a local one.
    """

    def __init__(self, dispatcher: DispatchingFactory, conn: _Dispatch, entry: ConnectorEntry) -> None:
        self.dispatcher = dispatcher
        self.conn = conn
        self.entry = entry
        self.buffered: list[bytes] = []
        self.lost = False

    def connectionMade(self) -> None:
        node, counter = self.dispatcher.node, self.entry.counter
        d = node.open_connection(self.entry.name, self.conn.peer_ip, counter.max_total, counter.max_per_ip)
        d.addCallbacks(self._answered, self._failed)

    def dataReceived(self, data: bytes) -> None:
        self.buffered.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True

    def _close(self, reply: Reply) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(reply.to_bytes())
        transport.loseConnection()

    def _answered(self, why: str | None) -> None:
        node, ip = self.dispatcher.node, self.conn.peer_ip
        if why is not None:
            if not self.lost:
                self._close(self.dispatcher._limit_refusal(ip, self.entry, why))
            return
        if self.lost:
            node.close_connection(self.entry.name, ip)
            return
        self.conn.admitted = (node, self.entry.name)  # released when the session ends
        session = self.entry.factory.buildProtocol(self.conn.addr)
        self.conn.wrappedProtocol = session
        session.makeConnection(self.conn)
        for data in self.buffered:
            session.dataReceived(data)
        self.buffered = []

    def _failed(self, failure: Any) -> None:
        log.warn("connection from {peer_ip} to connector {connector}: no answer from the main process on the "
                 "node's connection limits: {error}", peer_ip=self.conn.peer_ip, connector=self.entry.name,
                 error=failure.getErrorMessage())
        if not self.lost:
            self._close(Reply.make(421, "4.3.2", f"{self.entry.hostname} Service busy, try again later"))


class _Dispatch(ProtocolWrapper):
    """Picks the connector when the connection is made, then passes everything through."""

    def __init__(self, factory: DispatchingFactory, addr: IAddress) -> None:
        super().__init__(factory, Protocol())
        self.addr = addr
        self.entry: ConnectorEntry | None = None
        self.peer_ip = ""
        self.local_socket = False
        self.budget: ConnectionCounter | None = None
        self.admitted: tuple[Any, str] | None = None  # (the main process's counters, connector): a worker's session

    def makeConnection(self, transport: Any) -> None:
        peer = transport.getPeer()
        self.peer_ip = getattr(peer, "host", "") or ""
        self.local_socket = isinstance(peer, UNIXAddress)
        self.wrappedProtocol = self.factory.choose(self)
        super().makeConnection(transport)

    def connectionLost(self, reason: Any) -> None:
        if self.entry is not None:
            self.entry.counter.closed(self.peer_ip)
            self.entry = None
        if self.budget is not None:
            self.budget.closed(self.peer_ip)
            self.budget = None
        if self.admitted is not None:
            node, connector = self.admitted
            self.admitted = None
            node.close_connection(connector, self.peer_ip)
        super().connectionLost(reason)


class DispatchingFactory(WrappingFactory):
    """The factory on one listening socket shared by one or more receive connectors."""

    protocol = _Dispatch
    noisy = False

    def __init__(self, entries: Sequence[ConnectorEntry], endpoint: str = "") -> None:
        super().__init__(None)
        self.entries = list(entries)
        self.endpoint = endpoint
        self.refused = 0  # connections that no connector admitted, for an operator's metric
        #: sessions of the whole process (shared by every dispatcher): kept below RLIMIT_NOFILE
        self.budget: ConnectionCounter | None = None
        self.clock: Any = None  # for the PROXY header timeout (the reactor when None)
        #: in a receive worker: the main process's counters (exmta.receive.noderates.RemoteRates), which
        #: admit each session against the connector's limits for the whole node
        self.node: Any = None

    def buildProtocol(self, addr: IAddress) -> _Dispatch:
        return _Dispatch(self, addr)

    def logPrefix(self) -> str:
        return "exmta-receive"

    def choose(self, conn: _Dispatch) -> Any:
        """The protocol to run for ``conn``: a connector's SMTP session or a refusal."""
        ip = conn.peer_ip
        for candidate in self.entries:
            candidate.refresh()
        if conn.local_socket:
            entry = self.entries[0]  # a UNIX socket has no address to match: its first connector serves it
        else:
            entry = select_connector(self.entries, ip)
        if entry is None:
            self.refused += 1
            log.warn("connection from {peer_ip} on {endpoint} refused: no receive connector admits this address",
                     peer_ip=ip, endpoint=self.endpoint)
            self._track_refusal(ip, None, NO_CONNECTOR, "no receive connector admits this address")
            return _Refuse(NO_CONNECTOR)
        why = entry.counter.refusal(ip)
        if why is None and self.budget is not None:
            why = self.budget.refusal(ip)  # the process's open files (exmta.receive.fdlimit)
        if why is not None:
            return _Refuse(self._limit_refusal(ip, entry, why))
        entry.counter.opened(ip)
        if self.budget is not None:
            self.budget.opened(ip)
            conn.budget = self.budget
        conn.entry = entry
        if self.node is not None and (entry.counter.max_total or entry.counter.max_per_ip):
            return _Admission(self, conn, entry)  # a receive worker: the limits count every process of the node
        return entry.factory.buildProtocol(conn.addr)

    def _limit_refusal(self, ip: str, entry: ConnectorEntry, why: str) -> Reply:
        """The 421 for a connection over a limit (logged and tracked)."""
        log.warn("connection from {peer_ip} to connector {connector} refused: {why}",
                 peer_ip=ip, connector=entry.name, why=why)
        reply = Reply.make(421, "4.7.0", f"{entry.hostname} {why[0].upper()}{why[1:]}, try again later")
        self._track_refusal(ip, entry.name, reply, why)
        return reply

    def _track_refusal(self, ip: str, connector: str | None, reply: Reply, why: str) -> None:
        """A REJECT tracking event for a refused connection (Exchange's protocol log shows them too).

        The tracker and clock are the sessions' own (each entry's ESMTPServerFactory), so a
        receive worker's refusals reach the main process's log like its messages do.
        """
        source = next((e.config_source for e in self.entries if getattr(e.config_source, "tracker", None)), None)
        if source is None:
            return
        from exmta.model import TrackingEvent, TrackingEventId

        try:
            source.tracker.track(TrackingEvent(
                TrackingEventId.REJECT, "", source.clock.seconds(), connector=connector, source="SMTP",
                remote_host=ip, reply=str(reply), details={"reason": f"connection refused: {why}",
                                                           "endpoint": self.endpoint}))
        except Exception:
            log.failure("tracker failed for a refused connection")

    def doStart(self) -> None:  # the wrapped factories are started by the service tree, not per port
        pass

    def doStop(self) -> None:
        pass


# ---------------------------------------------------------------- wiring


def group_listeners(connectors: Sequence[Any]) -> list[tuple[str, list[Any]]]:
    """Endpoint strings in first-seen order, each with the connector configs listening on it."""
    groups: dict[str, list[Any]] = {}
    for rc in connectors:
        for endpoint in rc.listen:
            groups.setdefault(endpoint, []).append(rc)
    return list(groups.items())
