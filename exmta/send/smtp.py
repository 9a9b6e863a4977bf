"""SMTP (and LMTP) send connector: smart hosts or MX, connection reuse, per-recipient results.

Where a message goes:

* ``smarthosts`` configured: try them in order; the next one on a failed
  connection, a refused greeting/EHLO, a TLS failure or a timeout;
* otherwise the request's ``nexthop`` ("[host]" or "[host]:port" connects
  directly, a domain is looked up) or the recipients' domain: MX hosts in
  preference order, each host's addresses in turn;
* ``kind = "lmtp"``: the single ``lmtp`` target ("host:port" or "unix:/path").

Once a session is up, its answers are final for this attempt.  A connector
never errbacks for remote, DNS or TLS failures: those are DEFERRED or FAILED
results.  Idle connections are kept for a short time per destination and
reused (RSET first) up to ``max_messages_per_connection`` messages.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator

from twisted.internet import defer
from twisted.internet.endpoints import (
    HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint, connectProtocol,
)
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from exmta.config.schema import SendConnectorConfig
from exmta.coroutines import run_coroutine
from exmta.interfaces import ISendConnector
from exmta.model import DeliveryRequest, Outcome, Recipient, RecipientResult, Reply
from exmta.send.dkim_sign import SigningDeferred
from exmta.routing.dns import DNSError, DNSPermanentError, DNSResolver
from exmta.smtp.client import (
    ClientError, ClientTimeouts, SessionFailure, SMTPClientProtocol, StaleConnection,
)

__all__ = ["SMTPSendConnector", "Target", "default_tls_context"]

MAX_ADDRESS_ATTEMPTS = 10   # connections tried per delivery (Postfix: smtp_mx_address_limit)


@dataclass(frozen=True)
class Target:
    """One place to connect to: a name for logs and TLS, an address or unix path, a port."""

    name: str
    address: str | None      # IP address, or None to let HostnameEndpoint resolve ``name``
    port: int = 25
    unix_path: str | None = None
    policy: Any = None       # exmta.tlspolicy.engine.HostPolicy: MTA-STS/DANE TLS for this MX host
    report: Any = None       # exmta.tlspolicy.nopolicy.NoPolicySession: TLS-RPT "no-policy-found"

    @property
    def label(self) -> str:
        if self.unix_path:
            return f"unix:{self.unix_path}"
        return f"{self.name}[{self.address or '?'}]:{self.port}"


@dataclass(frozen=True)
class _TLSFailed:
    """Opportunistic TLS failed with this host (handshake or post-STARTTLS EHLO)."""

    reply: Reply


def default_tls_context(mode: str, hostname: str) -> Any:
    """Opportunistic: encrypt without verifying (RFC 7435). Mandatory: verify the host name."""
    from twisted.internet import ssl

    if mode == "mandatory":
        return ssl.optionsForClientTLS(hostname)
    return ssl.CertificateOptions(verify=False)


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _parse_bracketed(nexthop: str, default_port: int) -> tuple[str, int] | None:
    """ "[host]" or "[host]:port" -> (host, port); anything else -> None."""
    if not nexthop.startswith("["):
        return None
    host, _, rest = nexthop[1:].partition("]")
    port = int(rest[1:]) if rest.startswith(":") else default_port
    return host, port


@implementer(ISendConnector)
class SMTPSendConnector:
    """ISendConnector over SMTP (or LMTP when ``config.kind == "lmtp"``).

    ``tls_context`` is either a context factory used for every host, or a
    callable ``(hostname) -> context factory``; None builds the default one
    for ``config.tls`` (see :func:`default_tls_context`).
    """

    log = Logger()

    def __init__(
        self,
        config: SendConnectorConfig,
        reactor: Any,
        clock: IReactorTime,
        resolver: DNSResolver | None,
        hostname: str,
        tls_context: Any = None,
        *,
        timeouts: ClientTimeouts | None = None,
        idle_timeout: float = 10.0,
    ) -> None:
        self.config = config
        self.name = config.name
        self.reactor = reactor
        self.clock = clock
        self.resolver = resolver
        self.helo_name = config.helo_name or hostname
        self.tls_context = tls_context
        self.lmtp = config.kind == "lmtp"
        self.timeouts = timeouts or _timeouts_for(config)
        #: exmta.observe.protocol.ProtocolLog for this connector, None when off
        self.protocol_log: Any = None
        #: exmta.send.oauth2.XOAuth2Relay when the connector has auth = "xoauth2"
        self.xoauth2: Any = None
        self.idle_timeout = idle_timeout
        #: exmta.send.dkim_sign.DKIMSigner when the connector has dkim_sign = true
        self.signer: Any = None
        #: exmta.send.header_firewall.OutboundHeaderFirewall unless send_organization_headers = true
        self.header_firewall: Any = None
        #: exmta.tlspolicy.engine.TLSPolicyEngine (MTA-STS, DANE) for MX delivery, None when off
        self.tls_policy: Any = None
        self._idle: dict[tuple[str, ...], OrderedDict[SMTPClientProtocol, IDelayedCall]] = {}
        self._closing: set[defer.Deferred[None]] = set()

    # ------------------------------------------------------------ ISendConnector

    def deliver(self, request: DeliveryRequest) -> defer.Deferred[list[RecipientResult]]:
        return run_coroutine(self._deliver(request))

    async def _deliver(self, request: DeliveryRequest) -> list[RecipientResult]:
        if self.header_firewall is not None:  # organisation headers only toward trusted hops
            request = await self.header_firewall.prepare(request)
        if self.signer is not None:  # DKIM signing: the last change to the bytes (exmta.send.dkim_sign)
            try:
                request = await self.signer.prepare(request)
            except SigningDeferred as e:  # a key's on_failure = "defer": not sent unsigned
                return [RecipientResult(r.address, Outcome.DEFERRED, e.reply) for r in request.recipients]
        if self.lmtp or self.config.smarthosts or request.nexthop:
            groups = [(request.nexthop, request.recipients)]
        else:
            by_domain: dict[str, list[Recipient]] = {}
            for r in request.recipients:
                by_domain.setdefault(_domain_of(r.address), []).append(r)
            groups = [(domain, tuple(rcpts)) for domain, rcpts in by_domain.items()]
        results: dict[str, RecipientResult] = {}
        for nexthop, rcpts in groups:
            for result in await self._deliver_group(request, nexthop, tuple(rcpts)):
                results[result.recipient] = result
        return [results[r.address] for r in request.recipients]

    def close(self) -> defer.Deferred[None]:
        """QUIT every idle connection (service stop); fires when all are closed, those already
        quitting included (each bounded by the quit timeout)."""
        for key in list(self._idle):
            for proto, timer in list(self._idle.pop(key).items()):
                if timer.active():
                    timer.cancel()
                self._quit(proto)
        return defer.gatherResults(list(self._closing)).addCallback(lambda _: None)

    def _quit(self, proto: SMTPClientProtocol) -> None:
        """QUIT in the background, remembered so that close() can wait for it."""
        d = proto.quit()
        self._closing.add(d)

        def done(result: object) -> None:
            self._closing.discard(d)

        d.addBoth(done)

    # ------------------------------------------------------------ one destination

    def _key(self, nexthop: str | None, rcpts: tuple[Recipient, ...]) -> tuple[str, ...]:
        if self.lmtp:
            return ("lmtp",)
        if self.config.smarthosts:
            return ("smarthost",)
        if nexthop:
            return ("nexthop", nexthop.lower())
        return ("mx", _domain_of(rcpts[0].address))

    async def _deliver_group(self, request: DeliveryRequest, nexthop: str | None,
                             rcpts: tuple[Recipient, ...]) -> list[RecipientResult]:
        if not rcpts:
            return []
        key = self._key(nexthop, rcpts)
        # RFC 8460 5.3: our TLS reports go out despite TLS failures (no MTA-STS/DANE, not reported), on
        # connections of their own: none of them is pooled for, or taken from, policy-protected mail
        use_policy = self.tls_policy is None or not self.tls_policy.exempt(request.envelope)
        if not use_policy:
            key += ("tls-report",)
        if self.xoauth2 is not None:  # a session is logged in as one mailbox: reuse it only for that one
            key += ("xoauth2", self.xoauth2.user_for(request).lower())
        # a host that deferred every recipient: RFC 5321 5.1 has the next address tried, as after a
        # connection failure (issue 10 item 5); its answer is the result if no other host takes the mail
        tempfailed: list[RecipientResult] | None = None
        tempfailed_host: str | None = None
        # 1. an idle connection to the same destination
        while (proto := self._take_idle(key)) is not None:
            try:
                results = await proto.deliver(request, rcpts)
            except StaleConnection:
                proto.transport.loseConnection()
                continue
            if _all_deferred(results):
                tempfailed, tempfailed_host = results, proto.remote_host
                self._quit(proto)
                break
            self._release(key, proto)
            return results
        if self.xoauth2 is not None:  # no token, no session: defer with the reason (exmta.send.oauth2)
            refusal = await self.xoauth2.ready()
            if refusal is not None:
                return [RecipientResult(r.address, Outcome.DEFERRED, refusal) for r in rcpts]
        # 2. new connections, in order, until one session comes up
        last: Reply | None = None
        last_host: str | None = None
        attempts = 0
        try:
            async for target in self._targets(nexthop, rcpts, use_policy):
                if target.label == tempfailed_host:
                    continue  # its cached connection just deferred everything
                attempts += 1
                if attempts > MAX_ADDRESS_ATTEMPTS:
                    break
                outcome = await self._try_target(target, request, rcpts)
                if isinstance(outcome, Reply):
                    last, last_host = outcome, target.label
                    continue
                results, proto = outcome
                if _all_deferred(results):
                    self.log.info("{remote} deferred every recipient of {queue_id} ({reply}); trying the next "
                                  "address", remote=target.label, queue_id=request.queue_id,
                                  reply=str(results[0].reply))
                    tempfailed, tempfailed_host = results, target.label
                    self._quit(proto)
                    continue
                self._release(key, proto)
                return results
        except DNSError as exc:
            outcome_kind = Outcome.FAILED if isinstance(exc, DNSPermanentError) else Outcome.DEFERRED
            self.log.info("DNS for {queue_id}: {reply}", queue_id=request.queue_id, reply=str(exc.reply))
            return [RecipientResult(r.address, outcome_kind, exc.reply) for r in rcpts]
        if tempfailed is not None:
            return tempfailed
        if last is None:
            last = Reply.make(451, "4.4.4", "No route to any next hop")
        elif not last.is_transient:
            # every host refused the session: not a statement about the recipients, retry later
            status = "4" + last.status[1:] if last.status else "4.4.2"
            last = Reply.make(451, status, f"All next hops refused the session; last said: {last}")
        return [RecipientResult(r.address, Outcome.DEFERRED, last, remote_host=last_host) for r in rcpts]

    async def _try_target(self, target: Target, request: DeliveryRequest,
                          rcpts: tuple[Recipient, ...]) -> Reply | tuple[list[RecipientResult], SMTPClientProtocol]:
        tls_mode = self._tls_mode(target)
        if getattr(request.envelope, "require_tls", False):  # a transport rule's RouteMessageOutboundRequireTls
            tls_mode = "mandatory"
        outcome = await self._try_target_once(target, request, rcpts, tls_mode)
        if isinstance(outcome, _TLSFailed):
            # RFC 7435: opportunistic TLS that fails falls back to plaintext (a new connection)
            self.log.info("TLS with {remote} failed; retrying without TLS", remote=target.label)
            # the failure is reported (TLS-RPT); the clear-text retry is our choice, not another result
            plain = dataclasses.replace(target, policy=None, report=None)
            outcome = await self._try_target_once(plain, request, rcpts, "none")
            if isinstance(outcome, _TLSFailed):  # cannot happen without TLS
                return outcome.reply
        return outcome

    async def _try_target_once(self, target: Target, request: DeliveryRequest, rcpts: tuple[Recipient, ...],
                               tls_mode: str) -> Any:
        proto = SMTPClientProtocol(
            self.clock, self.helo_name, lmtp=self.lmtp, tls_mode=tls_mode,
            tls_context=self._context_for(target, tls_mode), username=self.config.auth_username,
            password=self.config.auth_password, timeouts=self.timeouts, remote_host=target.label,
            protocol_log=self.protocol_log,
            sasl=self.xoauth2.login(request) if self.xoauth2 is not None else None,
        )
        if target.policy is not None:  # its certificate check, told the connection's addresses (TLS-RPT)
            policy = target.policy
            proto.tls_verifier = lambda conn: policy.verify(conn, proto.addresses)
        try:
            await connectProtocol(self._endpoint(target), proto)
        except (ConnectError, ConnectingCancelledError, OSError) as exc:
            self.log.info("Connect to {remote} failed: {error}", remote=target.label, error=str(exc))
            return Reply.make(451, "4.4.1", f"Connection to {target.label} failed: {exc.__class__.__name__}")
        try:
            await proto.establish()
        except ClientError as exc:
            phase = exc.phase if isinstance(exc, SessionFailure) else "session"
            self.log.info("Session with {remote} failed at {phase}: {reply}",
                          remote=target.label, phase=phase, reply=str(exc.reply))
            if proto.transport is not None:
                proto.transport.loseConnection()
            reply = exc.reply
            if target.label not in reply.text:
                reply = Reply(reply.code, reply.status, reply.lines[:-1] + (f"{reply.lines[-1]} ({target.label})",))
            if target.policy is not None:  # TLS-RPT, and the policy named in the reply
                reply = target.policy.after_session(proto, False, reply, phase)
            elif target.report is not None:  # TLS-RPT without a policy
                target.report.after_session(proto, False, phase, exc.reply.text, tls_mode)
            if phase == "STARTTLS" and tls_mode == "opportunistic":
                return _TLSFailed(reply)
            return reply
        self.log.info("Connected to {remote} (tls={tls})", remote=target.label, tls=proto.tls)
        if target.policy is not None:
            target.policy.after_session(proto, True, None)
        elif target.report is not None:
            target.report.after_session(proto, True, None, "", tls_mode)
        try:
            results = await proto.deliver(request, rcpts)
        except StaleConnection as exc:  # lost between the greeting exchange and MAIL
            return Reply.make(451, "4.4.2", f"Connection to {target.label} lost before MAIL: {exc}")
        return results, proto

    def _tls_mode(self, target: Target) -> str:
        if target.policy is not None:
            return str(target.policy.tls_mode(self.config.tls))
        if target.unix_path is not None:
            return "none" if self.config.tls != "mandatory" else "mandatory"
        return self.config.tls

    def _context_for(self, target: Target, tls_mode: str | None = None) -> Any:
        if target.policy is not None:  # MTA-STS or DANE: the policy's own context (exmta.tlspolicy)
            return target.policy.context()
        mode = "mandatory" if tls_mode == "mandatory" else self.config.tls
        if mode == "none":
            return None
        if self.tls_context is None:
            return default_tls_context(mode, target.name)
        if callable(self.tls_context) and not hasattr(self.tls_context, "getContext") \
                and not hasattr(self.tls_context, "clientConnectionForTLS"):
            return self.tls_context(target.name)
        return self.tls_context

    def _endpoint(self, target: Target) -> IStreamClientEndpoint:
        timeout = self.config.connect_timeout
        if target.unix_path is not None:
            return UNIXClientEndpoint(self.reactor, target.unix_path, timeout=timeout)
        if target.address is None:
            return HostnameEndpoint(self.reactor, target.name.encode("idna"), target.port, timeout=timeout)
        if ":" in target.address:
            return TCP6ClientEndpoint(self.reactor, target.address, target.port, timeout=timeout)
        return TCP4ClientEndpoint(self.reactor, target.address, target.port, timeout=timeout)

    # ------------------------------------------------------------ where to connect

    async def _targets(self, nexthop: str | None, rcpts: tuple[Recipient, ...],
                       use_policy: bool = True) -> AsyncIterator[Target]:
        if self.lmtp:
            yield self._lmtp_target()
            return
        if self.config.smarthosts:
            for sh in self.config.smarthosts:
                async for t in self._host_targets(sh.host, sh.port, fail_soft=True):
                    yield t
            return
        domain = (nexthop or _domain_of(rcpts[0].address)).lower().rstrip(".")
        bracketed = _parse_bracketed(domain, self.config.port)
        if bracketed is not None:
            # "[host]:port" next hop or an address literal "user@[192.0.2.1]": no MX lookup
            host = bracketed[0]
            if host.startswith("ipv6:"):
                host = host[5:]
            async for t in self._host_targets(host, bracketed[1], fail_soft=False):
                yield t
            return
        if self.resolver is None:
            # no resolver: the domain itself, resolved by the reactor
            yield Target(domain, None, self.config.port)
            return
        mxs = await self.resolver.resolve_mx(domain)
        # MTA-STS / DANE (exmta.tlspolicy): which MX hosts, and which TLS with each
        policy = await self.tls_policy.for_domain(domain) if self.tls_policy is not None and use_policy else None
        last_error: DNSError | None = None
        yielded = False
        for _pref, host in mxs:
            host_policy = await policy.host(host) if policy is not None else None
            report = policy.no_policy(host) if policy is not None and host_policy is None else None
            if host_policy is not None and not hasattr(host_policy, "verify"):  # Skip: policy forbids it
                self.log.info("MX {host} of {domain} skipped: {reason}", host=host, domain=domain,
                              reason=host_policy.reason)
                continue
            try:
                addresses = await self.resolver.resolve_addresses(host)
            except DNSError as exc:
                self.log.info("MX {host} of {domain}: {reply}", host=host, domain=domain, reply=str(exc.reply))
                last_error = exc
                continue
            for addr in addresses:
                yielded = True
                yield Target(host, addr, self.config.port, policy=host_policy, report=report)
        if not yielded and policy is not None and policy.skipped:
            raise policy.deferral()
        if not yielded and last_error is not None:
            raise last_error

    async def _host_targets(self, host: str, port: int, fail_soft: bool) -> AsyncIterator[Target]:
        if _is_ip(host):
            yield Target(host, host, port)
            return
        if self.resolver is None:
            yield Target(host, None, port)
            return
        try:
            addresses = await self.resolver.resolve_addresses(host)
        except DNSError as exc:
            if not fail_soft:
                raise
            # a smart host that does not resolve: try the next one
            self.log.info("Smart host {host}: {reply}", host=host, reply=str(exc.reply))
            return
        for addr in addresses:
            yield Target(host, addr, port)

    def _lmtp_target(self) -> Target:
        spec = self.config.lmtp or ""
        if spec.startswith("unix:"):
            return Target("localhost", None, 0, unix_path=spec[5:])
        if spec.startswith("["):
            host, _, rest = spec[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else 24
        else:
            host, _, p = spec.rpartition(":")
            port = int(p) if p else 24
        return Target(host, host if _is_ip(host) else None, port)

    # ------------------------------------------------------------ connection cache

    def _take_idle(self, key: tuple[str, ...]) -> SMTPClientProtocol | None:
        pool = self._idle.get(key)
        while pool:
            proto, timer = pool.popitem(last=False)
            if timer.active():
                timer.cancel()
            if proto.usable:
                return proto
        return None

    def _release(self, key: tuple[str, ...], proto: SMTPClientProtocol) -> None:
        """Keep a usable connection for the next message to the same place, or close it."""
        pool = self._idle.setdefault(key, OrderedDict())
        if (not proto.usable or proto.messages_sent >= self.config.max_messages_per_connection
                or len(pool) >= self.config.max_per_destination or self.idle_timeout <= 0):
            if proto.usable:
                self._quit(proto)
            elif proto.transport is not None:
                proto.transport.loseConnection()
            return

        def expire() -> None:
            if pool.pop(proto, None) is not None:
                self._quit(proto)

        pool[proto] = self.clock.callLater(self.idle_timeout, expire)

        def gone(_: object) -> None:
            timer = pool.pop(proto, None)
            if timer is not None and timer.active():
                timer.cancel()

        proto.closed.addCallback(gone)

    @property
    def idle_connections(self) -> int:
        return sum(len(pool) for pool in self._idle.values())


def _all_deferred(results: list[RecipientResult]) -> bool:
    """Did the host defer every recipient (a 4xx to MAIL, to every RCPT, or at the end of data)?"""
    return bool(results) and all(r.outcome is Outcome.DEFERRED for r in results)


def _timeouts_for(config: SendConnectorConfig) -> ClientTimeouts:
    """RFC 5321 defaults, capped by the connector's command_timeout (data end keeps its 10 min)."""
    base = ClientTimeouts()
    cap = config.command_timeout
    return ClientTimeouts(
        greeting=min(base.greeting, cap), ehlo=min(base.ehlo, cap), starttls=min(base.starttls, cap),
        auth=min(base.auth, cap), mail=min(base.mail, cap), rcpt=min(base.rcpt, cap),
        data_init=min(base.data_init, cap), data_block=min(base.data_block, cap),
        data_end=base.data_end if cap >= base.mail else cap * 2, rset=min(base.rset, cap),
        quit=min(base.quit, cap),
    )

