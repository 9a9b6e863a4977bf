"""What the sessions of one receive connector share, and their graceful shutdown.

:class:`ConnectorFactory` holds a connector's collaborators (policy, filter chain, store, tracker,
TLS, AUTH, header firewall, hop limit, transport rules, protocol log, metrics), which a reload may
swap while sessions run, and the set of live sessions that ``shutdown(grace)`` drains. The SMTP
session itself is :class:`exmta.smtp.server.ESMTPServer`, built by its subclass
:class:`exmta.smtp.server.ESMTPServerFactory`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from exmta.config.schema import ReceiveConnectorConfig
from exmta.filters.base import FilterChain
from exmta.interfaces import IMessageTracker, IQueueStore, IReceivePolicy
from exmta.model import Session
from exmta.smtp.header_checks import FIREWALLED_HEADER_PREFIXES

if TYPE_CHECKING:
    from exmta.smtp.server import ESMTPServer

__all__ = ["ConnectorFactory"]


def _no_local_domains(domain: str) -> bool:
    return False


def _untrusted(session: Session) -> bool:
    return False


class ConnectorFactory(Factory):
    """The collaborators and the live sessions of one receive connector (see the module docstring)."""

    log = Logger()
    noisy = False

    def __init__(
        self,
        config: ReceiveConnectorConfig,
        policy: IReceivePolicy,
        filters: FilterChain,
        store: IQueueStore,
        clock: IReactorTime,
        tracker: IMessageTracker | None = None,
        postmaster: str = "postmaster",
        local_domain: Callable[[str], bool] = _no_local_domains,
        tls_context_factory: Any = None,
        postmaster_domain: str | None = None,
    ) -> None:
        """``postmaster_domain`` qualifies a bare ``RCPT TO:<postmaster>`` (default: the hostname)."""
        self.config = config
        self.policy = policy
        self.filters = filters if filters is not None else FilterChain((), clock)
        self.store = store
        self.clock = clock
        self.tracker = tracker
        self.postmaster = postmaster
        self.local_domain = local_domain
        self.tls_context_factory = tls_context_factory
        #: TLS from the first byte (the listener is wrapped by exmta.tls.context.listening_factory)
        self.implicit_tls = False
        #: exmta.tls.verify.TLSGate: require_tls and client certificate checks, or None
        self.tls_gate: Any = None
        #: exmta.auth.smtp.Authenticator: SMTP AUTH and send-as for this connector, or None (no AUTH)
        self.authenticator: Any = None
        self.postmaster_domain = postmaster_domain
        #: header firewall (Exchange): these header families are removed from messages of sessions
        #: that ``trusted`` does not accept; by default a session is trusted when the policy lets it relay
        self.firewalled_header_prefixes: tuple[str, ...] = FIREWALLED_HEADER_PREFIXES
        #: (asks the current policy, so a policy swapped by a reload counts: its ``trusted``, from its
        #: permission groups, else its relay right)
        self.trusted: Callable[[Session], bool] = self._policy_trusts
        #: a message with more Received fields than this (ours included) is a mail loop: 554 5.4.6
        #: (Exchange MaxHopCount 30; 0 = no check)
        self.max_hops = 30
        #: EHLO keywords not to advertise, e.g. {"CHUNKING", "BINARYMIME"} (Exchange's ChunkingEnabled
        #: = false); BDAT itself stays accepted from clients that use it anyway
        self.disabled_extensions: set[str] = set()
        #: exmta.rules.hook.TransportRules run at end of data, or None (no rules file)
        self.transport_rules: Any = None
        #: protocol log of this connector (exmta.observe.protocol.ProtocolLog), None when off
        self.protocol_log: Any = None
        self.sessions: set[ESMTPServer] = set()
        self.shutting_down = False
        self._shutdown_waiters: list[Deferred[None]] = []
        self._grace_call: IDelayedCall | None = None
        #: metrics (exmta.observe.metrics.Metrics): session_opened / session_timed_out / tls_started /
        #: auth_failed (connector, ...) are called on it when set
        self.session_observer: Any = None

    def _policy_trusts(self, session: Session) -> bool:
        judge = getattr(self.policy, "trusted", None) or getattr(self.policy, "may_relay", None) or _untrusted
        return bool(judge(session))

    def shutdown(self, grace: float) -> Deferred[None]:
        """Stop taking commands; after ``grace`` seconds send 421 4.3.2 to whoever is left.

        Idle sessions are closed at once; a session in a transaction may
        finish it. Fires when every session is closed.
        """
        self.shutting_down = True
        if not self.sessions:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._shutdown_waiters.append(d)
        for session in list(self.sessions):
            session.shutdown_requested()
        if self.sessions and self._grace_call is None:
            self._grace_call = self.clock.callLater(grace, self._grace_over)
        return d

    def _grace_over(self) -> None:
        self._grace_call = None
        self.log.info("shutdown grace over: closing {count} session(s)", count=len(self.sessions))
        for session in list(self.sessions):
            session.force_close()

    def _session_closed(self, session: ESMTPServer) -> None:
        self.sessions.discard(session)
        if self.shutting_down and not self.sessions:
            if self._grace_call is not None and self._grace_call.active():
                self._grace_call.cancel()
            self._grace_call = None
            waiters, self._shutdown_waiters = self._shutdown_waiters, []
            for d in waiters:
                d.callback(None)
