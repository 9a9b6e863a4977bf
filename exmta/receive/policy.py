"""The built-in receive policy: accepted domains and relay networks, default deny.

A recipient is accepted when its domain is an accepted domain (Exchange's
authoritative, internal relay or external relay kinds alike) or when the
client may relay (its IP is in a relay network, or it authenticated).
Everything else gets ``554 5.7.1 Relay access denied``.

Anonymous clients are also refused the classic open-relay test tricks
(Postfix's ``allow_untrusted_routing = no`` and the RFC 2505 checks):
sender-specified routing with ``%`` or ``!`` in the local part, a quoted
local part hiding an ``@``, address literals (``user@[192.0.2.1]``) and
domains with a trailing dot, which some resolvers and routers treat
differently from the name without it.

Built from a receive connector's configuration (:meth:`DefaultReceivePolicy.for_connector`)
it also models Exchange's permission groups: each group a client belongs to
grants rights (``submit`` to accepted domains, ``relay`` to any domain,
``accept_org_headers``: the header firewall lets X-MS-Exchange-Organization-*
through), see :data:`GROUP_RIGHTS`. Authoritative recipients are validated
(:mod:`exmta.receive.recipients`), new mail waits under back pressure
(:mod:`exmta.receive.backpressure`), and messages and recipients per minute
are limited per source address and per authenticated user
(:mod:`exmta.receive.ratelimit`).
"""
from __future__ import annotations

import ipaddress
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from exmta.config.schema import AcceptedDomain
from exmta.coroutines import run_coroutine
from exmta.interfaces import IReceivePolicy, ISessionTrust
from exmta.model import Address, Verdict
from exmta.receive.backpressure import BackPressure
from exmta.receive.noderates import take_local
from exmta.receive.ranges import IPNetwork, parse_ip
from exmta.receive.ratelimit import RateCounter
from exmta.receive.recipients import RecipientValidator

__all__ = [
    "DefaultReceivePolicy", "GROUP_RIGHTS", "PERMISSION_GROUPS", "RELAY_DENIED", "is_partner", "routing_trick",
]

log = Logger()

RELAY_DENIED = Verdict.reject(554, "5.7.1", "Relay access denied")
UNKNOWN_RECIPIENT = Verdict.reject(550, "5.1.1", "Recipient address rejected: user unknown")
RECIPIENT_LOOKUP_FAILED = Verdict.tempfail(451, "4.3.0", "Recipient address lookup failed, try again later")
AUTH_REQUIRED = Verdict.reject(530, "5.7.0", "Authentication required")
RATE_CHECK_FAILED = Verdict.tempfail(451, "4.3.0", "Rate limit check failed, try again later")

SUBMIT = "submit"                          # ms-Exch-SMTP-Submit: mail to accepted domains
RELAY = "relay"                            # ms-Exch-SMTP-Accept-Any-Recipient
ORG_HEADERS = "accept_org_headers"         # ms-Exch-Accept-Headers-Organization/-Forest: header firewall bypass

#: Exchange's permission groups and the rights each grants to the clients that belong to it
GROUP_RIGHTS: dict[str, frozenset[str]] = {
    "anonymous": frozenset({SUBMIT}),                          # AnonymousUsers: every client
    "authenticated": frozenset({SUBMIT, RELAY}),               # ExchangeUsers: after SMTP AUTH
    "partners": frozenset({SUBMIT, ORG_HEADERS}),              # Partners: verified TLS client certificate
    "exchange_servers": frozenset({SUBMIT, RELAY, ORG_HEADERS}),  # ExchangeServers, externally secured ranges
}
PERMISSION_GROUPS = tuple(GROUP_RIGHTS)


_parse_ip = parse_ip


def is_partner(session: Any) -> bool:
    """A client whose TLS client certificate was verified and matched the connector's partner names.

    The TLS layer (exmta.tls.verify) fills ``session.tls.partner`` with the
    certificate name that matched ``client_names``; nothing else counts.
    """
    tls = getattr(session, "tls", None)
    return tls is not None and bool(getattr(tls, "partner", None))


def routing_trick(rcpt: Address) -> str | None:
    """Why ``rcpt`` looks like sender-specified routing or an evasion, or None when it is plain."""
    local = rcpt.local
    if local.startswith('"'):
        inner = local[1:-1]
        if "@" in inner:
            return "quoted local part containing @"
        if "%" in inner or "!" in inner:
            return "quoted local part containing routing characters"
    else:
        if "%" in local:
            return "percent hack"
        if "!" in local:
            return "bang path"
    if rcpt.domain.startswith("["):
        return "address literal"
    if rcpt.domain.endswith("."):
        return "trailing dot in domain"
    return None


@implementer(IReceivePolicy, ISessionTrust)
class DefaultReceivePolicy:
    """Accepted domains, relay networks and permission groups; see the module docstring.

    ``accepted_domain`` maps a domain (lower case, no trailing dot) to its
    AcceptedDomain or None, e.g. ``Config.accepted_domain``.
    ``relay_networks`` are CIDRs (v4 or v6; a bare address is a /32 or /128)
    whose clients get the relay right.
    ``permission_groups`` None keeps the behaviour from before permission
    groups: everyone may submit, authenticated clients and relay networks may
    relay, and whoever may relay is trusted by the header firewall.
    ``externally_secured``: every client of the connector (its
    ``remote_ranges``) belongs to ``exchange_servers`` when that group is listed.
    """

    def __init__(
        self,
        accepted_domain: Callable[[str], AcceptedDomain | None],
        relay_networks: Sequence[str],
        relay_authenticated: bool = True,
        *,
        permission_groups: Sequence[str] | None = None,
        externally_secured: bool = False,
        recipients: RecipientValidator | None = None,
        back_pressure: BackPressure | None = None,
        clock: Any = None,
        messages_per_minute_per_ip: int = 0,
        recipients_per_minute_per_ip: int = 0,
        messages_per_minute_per_user: int = 0,
        recipients_per_minute_per_user: int = 0,
        connector: str = "",
        rates: Any = None,
    ) -> None:
        self.accepted_domain = accepted_domain
        self.relay_networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(n.strip(), strict=False) for n in relay_networks
        )
        self._relay_ip_cache: dict[str, bool] = {}
        self.relay_authenticated = relay_authenticated
        if permission_groups is not None:
            unknown = set(permission_groups) - set(GROUP_RIGHTS)
            if unknown:
                raise ValueError(f"unknown permission group(s): {', '.join(sorted(unknown))}")
            permission_groups = tuple(permission_groups)
        self.permission_groups = permission_groups
        self.externally_secured = externally_secured
        self.recipients = recipients
        self.back_pressure = back_pressure
        self.connector = connector
        limits = (messages_per_minute_per_ip, recipients_per_minute_per_ip,
                  messages_per_minute_per_user, recipients_per_minute_per_user)
        if any(limits) and clock is None:
            raise ValueError("rate limits need a clock")
        # rates: counters shared beyond this policy: every process of the node (exmta.receive.noderates,
        # NodeRates in the main process, RemoteRates in a receive worker) or of the cluster
        # (exmta.receive.sharedrates.RateExchange with the PostgreSQL queue)
        self.rates = rates
        def counter(name: str, limit: int) -> RateCounter:
            return rates.counter(f"{connector}/{name}", limit) if rates is not None else RateCounter(limit, clock)
        self.messages_per_ip = counter("messages_per_ip", messages_per_minute_per_ip)
        self.recipients_per_ip = counter("recipients_per_ip", recipients_per_minute_per_ip)
        self.messages_per_user = counter("messages_per_user", messages_per_minute_per_user)
        self.recipients_per_user = counter("recipients_per_user", recipients_per_minute_per_user)

    @classmethod
    def for_connector(cls, config: Any, rc: Any, clock: Any, recipients: RecipientValidator | None = None,
                      back_pressure: BackPressure | None = None, rates: Any = None) -> DefaultReceivePolicy:
        """The policy of receive connector ``rc`` (a ReceiveConnectorConfig) in ``config``."""
        return cls(
            config.accepted_domain, rc.relay_networks,
            permission_groups=rc.permission_groups, externally_secured=rc.externally_secured,
            recipients=recipients, back_pressure=back_pressure, clock=clock,
            messages_per_minute_per_ip=rc.messages_per_minute_per_ip,
            recipients_per_minute_per_ip=rc.recipients_per_minute_per_ip,
            messages_per_minute_per_user=rc.messages_per_minute_per_user,
            recipients_per_minute_per_user=rc.recipients_per_minute_per_user,
            connector=rc.name, rates=rates,
        )

    # ------------------------------------------------------------ rights

    def _in_relay_networks(self, session: Any) -> bool:
        peer = getattr(session, "peer_ip", "") or ""
        known = self._relay_ip_cache.get(peer)
        if known is None:  # (asked several times per message: parse and scan once per address)
            ip = _parse_ip(peer)
            known = ip is not None and any(ip.version == net.version and ip in net for net in self.relay_networks)
            if len(self._relay_ip_cache) >= 4096:
                self._relay_ip_cache.clear()
            self._relay_ip_cache[peer] = known
        return known

    def groups(self, session: Any) -> tuple[str, ...]:
        """The permission groups of this connector that ``session`` belongs to."""
        if self.permission_groups is None:
            return ()
        member = {
            "anonymous": True,
            "authenticated": bool(getattr(session, "auth_identity", None)),
            "partners": is_partner(session),
            "exchange_servers": self.externally_secured,
        }
        return tuple(g for g in self.permission_groups if member[g])

    def rights(self, session: Any) -> frozenset[str]:
        """What ``session`` may do: a set of SUBMIT, RELAY and ORG_HEADERS."""
        if self.permission_groups is None:
            may_relay = (self.relay_authenticated and bool(getattr(session, "auth_identity", None))) \
                or self._in_relay_networks(session)
            return frozenset({SUBMIT, RELAY, ORG_HEADERS}) if may_relay else frozenset({SUBMIT})
        rights: set[str] = set()
        for group in self.groups(session):
            rights |= GROUP_RIGHTS[group]
        if self._in_relay_networks(session):
            rights |= {SUBMIT, RELAY}  # a range granted relay (Exchange: Accept-Any-Recipient for Anonymous)
        return frozenset(rights)

    def may_relay(self, session: Any) -> bool:
        """Whether this client may send to any domain."""
        return RELAY in self.rights(session)

    def trusted(self, session: Any) -> bool:
        """Whether the header firewall lets this client's organization headers through."""
        return ORG_HEADERS in self.rights(session)

    # ------------------------------------------------------------ phases

    def check_connect(self, session: Any) -> Verdict:
        return Verdict.CONTINUE  # ranges and connection limits: exmta.receive.ranges, before the session

    def check_mail(self, session: Any, sender: Address, params: Any) -> Verdict | Deferred[Verdict]:
        if self.back_pressure is not None:
            reply = self.back_pressure.refusal(getattr(params, "size", None))  # SIZE= must fit too
            if reply is not None:
                log.info("session {session_id}: MAIL from {peer_ip} refused: back pressure ({why})",
                         session_id=session.session_id, peer_ip=session.peer_ip,
                         why=(self.back_pressure.reasons or (reply.text,))[0])
                return Verdict.tempfail(reply.code, reply.status, reply.text)
        if SUBMIT not in self.rights(session):
            log.info("session {session_id}: MAIL from {peer_ip} refused: not authenticated on {connector}",
                     session_id=session.session_id, peer_ip=session.peer_ip, connector=self.connector)
            return AUTH_REQUIRED
        ip, user = session.peer_ip, getattr(session, "auth_identity", None)

        def refusal(counter: Any) -> Verdict:
            who = ip if counter is self.messages_per_ip else user
            return self._rate_refusal(session, 450, "4.7.1", f"too much mail from {who}", counter.limit, "messages")
        pairs = [(self.messages_per_ip, ip)] + ([(self.messages_per_user, user)] if user else [])
        return self._take(session, pairs, Verdict.CONTINUE, refusal)

    def _take(self, session: Any, pairs: list[tuple[Any, str]], ok: Verdict,
              refusal: Callable[[Any], Verdict]) -> Verdict | Deferred[Verdict]:
        """``ok`` and one event counted on each (counter, key) when all allow it, else ``refusal(counter)``.

        A receive worker asks the main process, which counts for the whole
        node (exmta.receive.noderates): then the answer is a Deferred.
        """
        pairs = [(counter, key) for counter, key in pairs if counter.limit]
        if not pairs:
            return ok
        remote = getattr(self.rates, "take", None)
        if remote is None:
            refused = take_local(pairs)
            return ok if refused is None else refusal(refused)

        def failed(f: Any) -> Verdict:
            log.warn("session {session_id}: rate limit check failed: {error}",
                     session_id=session.session_id, error=f.getErrorMessage())
            return RATE_CHECK_FAILED
        d: Deferred[Any] = remote(pairs)
        return d.addCallbacks(lambda refused: ok if refused is None else refusal(refused), failed)

    def _rate_refusal(self, session: Any, code: int, status: str, what: str, limit: int, unit: str) -> Verdict:
        log.info("session {session_id}: rate limit: {what} (limit {limit} {unit} per minute)",
                 session_id=session.session_id, what=what, limit=limit, unit=unit, peer_ip=session.peer_ip)
        return Verdict.tempfail(code, status, f"Error: {what}, limit {limit} {unit} per minute; try again later")

    def authorize_rcpt(self, session: Any, txn: Any, rcpt: Address, params: Any) -> Verdict | Deferred[Verdict]:
        may_relay = self.may_relay(session)
        if not may_relay:
            trick = routing_trick(rcpt)
            if trick is not None:
                log.info(
                    "session {session_id}: recipient <{rcpt}> refused for {peer_ip}: {trick}",
                    session_id=session.session_id, rcpt=str(rcpt), peer_ip=session.peer_ip, trick=trick,
                )
                return RELAY_DENIED
        domain = self.accepted_domain(rcpt.domain_key) if rcpt.domain else None
        if domain is None and not may_relay:
            log.info(
                "session {session_id}: relay denied for {peer_ip} to <{rcpt}>",
                session_id=session.session_id, rcpt=str(rcpt), peer_ip=session.peer_ip,
            )
            return RELAY_DENIED
        if domain is not None and self.recipients is not None and self.recipients.validates(domain.kind):
            return run_coroutine(self._validate(session, rcpt, domain.kind))
        return self._count_recipient(session)

    async def _validate(self, session: Any, rcpt: Address, kind: str = "authoritative") -> Verdict:
        """A recipient of ours: known (then the rate limits), unknown (550 5.1.1) or no answer (451)."""
        assert self.recipients is not None
        try:
            exists = await self.recipients.exists(rcpt, kind)
        except Exception:
            log.failure("session {session_id}: recipient lookup for <{rcpt}> failed",
                        session_id=session.session_id, rcpt=str(rcpt))
            return RECIPIENT_LOOKUP_FAILED
        if exists is None:
            log.warn("session {session_id}: no recipient list or directory answered for <{rcpt}>",
                     session_id=session.session_id, rcpt=str(rcpt))
            return RECIPIENT_LOOKUP_FAILED
        if not exists:
            log.info("session {session_id}: unknown recipient <{rcpt}> from {peer_ip}",
                     session_id=session.session_id, rcpt=str(rcpt), peer_ip=session.peer_ip)
            return UNKNOWN_RECIPIENT
        verdict = self._count_recipient(session)
        return (await verdict) if isinstance(verdict, Deferred) else verdict

    def _count_recipient(self, session: Any) -> Verdict | Deferred[Verdict]:
        """ACCEPT within the recipient rate limits (and count it), else 452 4.5.3."""
        ip, user = session.peer_ip, getattr(session, "auth_identity", None)

        def refusal(counter: Any) -> Verdict:
            who = ip if counter is self.recipients_per_ip else user
            return self._rate_refusal(session, 452, "4.5.3", f"too many recipients from {who}", counter.limit,
                                      "recipients")
        pairs = [(self.recipients_per_ip, ip)] + ([(self.recipients_per_user, user)] if user else [])
        return self._take(session, pairs, Verdict.ACCEPT, refusal)
