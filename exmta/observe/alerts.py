"""Alert rules: evaluated on the injected clock, fired once, repeated, cleared with hysteresis.

An :class:`AlertManager` evaluates every rule each ``interval`` seconds.
A rule whose value crosses its threshold *fires* (notified once); while it
holds it is notified again every ``repeat`` seconds; it *clears* only when
the value is back past the clear threshold (``threshold * clear_ratio`` for
"above" rules, ``threshold / clear_ratio`` for "below" rules), so that a
value hovering at the threshold does not flap.

Every notification is logged; it is also mailed to the postmaster through
exmta's own queue (``store.submit`` of a generated message, so it is durable
and tracked like any other mail) and, when configured, POSTed as JSON to a
webhook with twisted.web's Agent. A notifier that fails is logged and never
stops the others.
"""
from __future__ import annotations

import collections
import email.utils
import json
import os
import ssl
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from exmta.model import Body, Envelope, MailParams, Recipient, new_queue_id

__all__ = [
    "Alert", "AlertManager", "AlertRule", "LogNotifier", "MailNotifier", "RULE_KINDS", "Sources",
    "WebhookNotifier", "build_rules", "cert_days_left",
]

log = Logger()

#: kind -> (direction, unit, what it measures)
RULE_KINDS: dict[str, tuple[str, str, str]] = {
    "queue_length": ("above", "messages", "messages in the queue"),
    "oldest_message": ("above", "seconds", "age of the oldest queued message"),
    "deferral_rate": ("above", "ratio", "share of delivery attempts deferred over the window"),
    "bounce_rate": ("above", "ratio", "share of delivery attempts that bounced over the window"),
    "timeout_rate": ("above", "ratio", "share of SMTP sessions closed by a timeout over the window"),
    "auth_failures": ("above", "count", "failed AUTH attempts over the window"),
    "cert_expiry": ("below", "days", "days until the first of the certificates expires"),
    "disk_space": ("below", "octets", "free space on the queue's file system"),
}


@dataclass(frozen=True)
class AlertRule:
    name: str
    kind: str
    threshold: float
    window: float = 900.0           # rates and counts: seconds looked back
    min_events: int = 20            # rates: fewer attempts in the window never fire
    clear_ratio: float = 0.8        # hysteresis
    certificates: tuple[str, ...] = ()  # cert_expiry: PEM files

    @property
    def direction(self) -> str:
        return RULE_KINDS[self.kind][0]

    def fires(self, value: float) -> bool:
        return value > self.threshold if self.direction == "above" else value < self.threshold

    def clears(self, value: float) -> bool:
        if self.direction == "above":
            return value <= self.threshold * self.clear_ratio
        return value >= self.threshold / self.clear_ratio if self.clear_ratio > 0 else value >= self.threshold


@dataclass
class Alert:
    """An active (fired, not yet cleared) alert."""

    rule: AlertRule
    since: float
    value: float
    last_notified: float
    notifications: int = 1
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.rule.name, "kind": self.rule.kind, "threshold": self.rule.threshold,
            "value": self.value, "since": self.since, "detail": self.detail,
        }


@dataclass
class Sources:
    """Where rules read their values; each is optional (a rule without its source never fires)."""

    snapshot: Callable[[], Any] | None = None         # -> QueueSnapshot | None
    outcomes_since: Callable[[float], dict[str, int]] | None = None
    sessions_total: Callable[[], float] | None = None
    timeouts_total: Callable[[], float] | None = None
    auth_failures_total: Callable[[], float] | None = None
    disk_free: Callable[[], int] | None = None
    now_wall: Callable[[], float] | None = None       # wall time for certificate expiry


def cert_days_left(path: str, now: float) -> float:
    """Days from ``now`` (epoch seconds) until the PEM certificate at ``path`` expires."""
    info = ssl._ssl._test_decode_cert(path)  # the stdlib's own PEM decoder (no extra dependency)
    not_after = ssl.cert_time_to_seconds(info["notAfter"])
    return (not_after - now) / 86400.0


class AlertManager:
    """Evaluates ``rules`` on ``clock`` and sends each state change to ``notifiers``."""

    def __init__(self, clock: Any, rules: Iterable[AlertRule], sources: Sources,
                 notifiers: Iterable[Any] = (), interval: float = 30.0, repeat: float = 3600.0,
                 history: int = 200) -> None:
        self.clock = clock
        self.rules = list(rules)
        self.sources = sources
        self.notifiers = list(notifiers)
        self.interval = interval
        self.repeat = repeat
        self.active: dict[str, Alert] = {}
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=history)
        self._counters: collections.deque[tuple[float, float, float, float]] = collections.deque()
        self._call: Any = None
        self._inflight: set[defer.Deferred] = set()

    # ------------------------------------------------------------ running

    def start(self) -> None:
        if self._call is None:
            self._call = self.clock.callLater(self.interval, self._tick)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _tick(self) -> None:
        self._call = self.clock.callLater(self.interval, self._tick)
        self.evaluate()

    def set_rules(self, rules: Iterable[AlertRule]) -> None:
        """Configuration reload: alerts of rules that are gone are dropped (and logged)."""
        self.rules = list(rules)
        names = {r.name for r in self.rules}
        for name in [n for n in self.active if n not in names]:
            log.info("alert {alert} dropped: its rule was removed", alert=name)
            del self.active[name]

    # ------------------------------------------------------------ evaluation

    def evaluate(self) -> None:
        """Evaluate every rule once now."""
        now = self.clock.seconds()
        self._sample_counters(now)
        for rule in self.rules:
            try:
                measured = self.measure(rule, now)
            except Exception:
                log.failure("alert rule {alert} could not be evaluated", alert=rule.name)
                continue
            if measured is None:
                continue
            value, detail = measured
            alert = self.active.get(rule.name)
            if alert is None:
                if rule.fires(value):
                    alert = Alert(rule, now, value, now, detail=detail)
                    self.active[rule.name] = alert
                    self._notify("firing", alert, now)
            elif rule.clears(value):
                alert.value, alert.detail = value, detail
                del self.active[rule.name]
                self._notify("cleared", alert, now)
            else:
                alert.value, alert.detail = value, detail
                if now - alert.last_notified >= self.repeat:
                    alert.last_notified = now
                    alert.notifications += 1
                    self._notify("repeat", alert, now)

    def _sample_counters(self, now: float) -> None:
        s = self.sources
        sessions = s.sessions_total() if s.sessions_total else 0.0
        timeouts = s.timeouts_total() if s.timeouts_total else 0.0
        auth = s.auth_failures_total() if s.auth_failures_total else 0.0
        self._counters.append((now, sessions, timeouts, auth))
        longest = max((r.window for r in self.rules), default=0.0)
        while len(self._counters) > 2 and self._counters[1][0] <= now - longest:
            self._counters.popleft()

    def _delta(self, window: float, now: float) -> tuple[float, float, float]:
        """Counter increases over the last ``window`` seconds (from the oldest sample inside it)."""
        base = self._counters[0]
        for sample in self._counters:
            if sample[0] > now - window:
                break
            base = sample
        last = self._counters[-1]
        return last[1] - base[1], last[2] - base[2], last[3] - base[3]

    def measure(self, rule: AlertRule, now: float) -> tuple[float, str] | None:
        """-> (value, detail) for ``rule`` now, or None when its source is missing."""
        s = self.sources
        kind = rule.kind
        if kind in ("queue_length", "oldest_message"):
            snap = s.snapshot() if s.snapshot else None
            if snap is None:
                return None
            if kind == "queue_length":
                hops = ", ".join(f"{h}: {n}" for h, n in sorted(snap.by_nexthop.items(), key=lambda x: -x[1])[:5])
                return float(snap.total), f"{snap.total} message(s) queued ({hops or 'none waiting'})"
            age = snap.oldest_age(now)
            return age, f"oldest message queued {age:.0f}s ago"
        if kind in ("deferral_rate", "bounce_rate"):
            if s.outcomes_since is None:
                return None
            counts = s.outcomes_since(now - rule.window)
            attempts = sum(counts.values())
            part = counts["deferred" if kind == "deferral_rate" else "bounced"]
            if attempts < rule.min_events:
                return 0.0, f"{attempts} attempt(s) in {rule.window:.0f}s, fewer than min_events {rule.min_events}"
            return part / attempts, f"{part} of {attempts} attempts in {rule.window:.0f}s"
        if kind == "timeout_rate":
            if s.timeouts_total is None or s.sessions_total is None:
                return None
            sessions, timeouts, _ = self._delta(rule.window, now)
            if sessions < rule.min_events:
                return 0.0, f"{sessions:.0f} session(s) in {rule.window:.0f}s"
            return timeouts / sessions, f"{timeouts:.0f} of {sessions:.0f} sessions timed out in {rule.window:.0f}s"
        if kind == "auth_failures":
            if s.auth_failures_total is None:
                return None
            _, _, failures = self._delta(rule.window, now)
            return failures, f"{failures:.0f} failed AUTH attempt(s) in {rule.window:.0f}s"
        if kind == "disk_space":
            if s.disk_free is None:
                return None
            free = float(s.disk_free())
            return free, f"{free / 1048576:.0f} MiB free on the queue's file system"
        if kind == "cert_expiry":
            wall = s.now_wall() if s.now_wall else now
            worst: tuple[float, str] | None = None
            for path in rule.certificates:
                try:
                    days = cert_days_left(path, wall)
                except Exception as e:
                    days, path = -1.0, f"{path} (unreadable: {e})"
                if worst is None or days < worst[0]:
                    worst = (days, path)
            if worst is None:
                return None
            return worst[0], f"{worst[1]} expires in {worst[0]:.1f} days"
        raise ValueError(f"unknown rule kind {kind!r}")

    # ------------------------------------------------------------ notifying

    def _notify(self, state: str, alert: Alert, now: float) -> None:
        record = {"state": state, "at": now, **alert.to_json()}
        self.history.append(record)
        for notifier in self.notifiers:
            d = defer.maybeDeferred(notifier.notify, state, alert, now)
            d.addErrback(lambda f, n=notifier: log.failure("alert notifier {notifier!r} failed", f, notifier=n))
            if not d.called:
                self._inflight.add(d)
                d.addBoth(lambda r, d=d: (self._inflight.discard(d), r)[1])

    def wait(self) -> defer.Deferred:
        """-> Deferred firing when every notification sent so far has finished (or failed)."""
        return defer.DeferredList(list(self._inflight), consumeErrors=True)


def describe(state: str, alert: Alert) -> str:
    rule = alert.rule
    unit = RULE_KINDS[rule.kind][1]
    words = {"firing": "FIRING", "repeat": "STILL FIRING", "cleared": "CLEARED"}[state]
    sign = ">" if rule.direction == "above" else "<"
    return (f"[{words}] {rule.name}: {RULE_KINDS[rule.kind][2]} is {alert.value:g} {unit} "
            f"(threshold {sign} {rule.threshold:g}): {alert.detail}")


class LogNotifier:
    """Writes each alert state change to the log (warn when firing, info when cleared)."""

    def notify(self, state: str, alert: Alert, now: float) -> None:
        text = describe(state, alert)
        if state == "cleared":
            log.info("alert {alert} cleared: {text}", alert=alert.rule.name, alert_state=state, text=text)
        else:
            log.warn("alert {alert} {alert_state}: {text}", alert=alert.rule.name, alert_state=state, text=text)


class MailNotifier:
    """Mails each alert state change to the postmaster through exmta's own queue."""

    def __init__(self, store: Any, postmaster: str, hostname: str, clock: Any) -> None:
        self.store = store
        self.postmaster = postmaster
        self.hostname = hostname
        self.clock = clock

    def message(self, state: str, alert: Alert, now: float) -> tuple[bytes, Envelope]:
        subject = describe(state, alert).split(":")[0]
        msgid = f"<alert.{os.urandom(8).hex()}@{self.hostname}>"
        body = (
            f"{describe(state, alert)}\r\n\r\n"
            f"Rule:      {alert.rule.name} ({alert.rule.kind})\r\n"
            f"Threshold: {alert.rule.threshold:g}\r\n"
            f"Value:     {alert.value:g}\r\n"
            f"Since:     {email.utils.formatdate(alert.since, usegmt=True)}\r\n"
            f"Server:    {self.hostname}\r\n"
        )
        headers = (
            f"From: exmta alerts <MAILER-DAEMON@{self.hostname}>\r\n"
            f"To: <{self.postmaster}>\r\n"
            f"Subject: exmta alert {subject}\r\n"
            f"Date: {email.utils.formatdate(now, usegmt=True)}\r\n"
            f"Message-ID: {msgid}\r\n"
            "Auto-Submitted: auto-generated\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n"
            "\r\n"
        )
        data = (headers + body).encode("utf-8")
        env = Envelope(
            sender="",  # null sender: an alert is never bounced (RFC 3834 spirit)
            recipients=[Recipient(address=self.postmaster, notify=("NEVER",))],
            params=MailParams(size=len(data), body=Body.SEVEN_BIT if data.isascii() else Body.EIGHT_BIT),
            queue_id=new_queue_id(now),
            received_at=now,
            connector="alerts",
            message_id=msgid,
            size=len(data),
            kind="dsn",  # a report we generated: never bounced
        )
        return data, env

    def notify(self, state: str, alert: Alert, now: float) -> defer.Deferred:
        data, env = self.message(state, alert, now)
        return defer.maybeDeferred(self.store.submit, data, env)


class WebhookNotifier:
    """POSTs each alert state change as JSON to ``url`` (twisted.web.client.Agent), with a timeout."""

    def __init__(self, reactor: Any, url: str, timeout: float = 10.0, agent: Any = None) -> None:
        from twisted.web.client import Agent

        self.url = url
        self.timeout = timeout
        self.reactor = reactor
        self.agent = agent if agent is not None else Agent(reactor)
        self.sent = 0

    def notify(self, state: str, alert: Alert, now: float) -> defer.Deferred:
        from twisted.web.http_headers import Headers

        payload = {"state": state, "text": describe(state, alert), "at": now, **alert.to_json()}
        body = _JSONBody(json.dumps(payload).encode("utf-8"))
        d = self.agent.request(b"POST", self.url.encode("ascii"),
                               Headers({b"content-type": [b"application/json"], b"user-agent": [b"exmta-alerts"]}),
                               body)
        d.addTimeout(self.timeout, self.reactor)

        def got(response: Any) -> defer.Deferred:
            if not 200 <= response.code < 300:
                log.warn("alert webhook {url} answered {code}", url=self.url, code=response.code)
            done: defer.Deferred = defer.Deferred()
            response.deliverBody(_Drain(done))
            return done.addCallback(lambda _: self._sent(response.code))

        return d.addCallback(got)

    def _sent(self, code: int) -> int:
        self.sent += 1
        return code


class _Drain(Protocol):
    """Reads and discards a (small) response body; fires ``done`` at its end."""

    def __init__(self, done: defer.Deferred) -> None:
        self.done = done
        self.received = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > 65536 and self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(None)


@implementer(IBodyProducer)
class _JSONBody:
    """A small in-memory request body (no cooperator, no global reactor)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> defer.Deferred:
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def build_rules(tables: Iterable[Any]) -> list[AlertRule]:
    """AlertRules from the config's AlertRuleConfig objects (same field names)."""
    return [AlertRule(name=t.name, kind=t.kind, threshold=t.threshold, window=t.window,
                      min_events=t.min_events, clear_ratio=t.clear_ratio,
                      certificates=tuple(t.certificates)) for t in tables]

