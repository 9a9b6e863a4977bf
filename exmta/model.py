"""Value types shared by every layer: replies, verdicts, sessions, envelopes, results.

These are the nouns of the system. They hold no I/O and import nothing from
Twisted, so every layer (wire, policy, store, scheduler, send) can share them
and be tested alone. Envelopes serialise to JSON (never pickle) for the spool.
"""
from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping


# ---------------------------------------------------------------- replies


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: a 3-digit code, an RFC 3463 enhanced status code and text.

    ``lines`` holds one or more text lines; the wire form uses ``code-`` for
    every line but the last (RFC 5321 section 4.2.1).
    """

    code: int
    status: str | None  # enhanced status code such as "2.1.0"; None where RFC 2034 forbids it
    lines: tuple[str, ...]

    @classmethod
    def make(cls, code: int, status: str | None, *lines: str) -> Reply:
        return cls(code, status, tuple(lines) or ("",))

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def to_bytes(self) -> bytes:
        """The wire form, built once per reply object (the constant replies are sent for every message)."""
        wire = self.__dict__.get("_wire")
        if wire is None:
            wire = self.__dict__["_wire"] = self._encode()  # not a field: equality and hashing ignore it
        return wire

    def _encode(self) -> bytes:
        out = []
        last = len(self.lines) - 1
        for i, line in enumerate(self.lines):
            sep = " " if i == last else "-"
            prefix = f"{self.status} " if self.status else ""
            out.append(f"{self.code}{sep}{prefix}{line}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        status = f" {self.status}" if self.status else ""
        return f"{self.code}{status} {self.text}"

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "status": self.status, "lines": list(self.lines)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Reply | None:
        if data is None:
            return None
        return cls(int(data["code"]), data.get("status"), tuple(data.get("lines", ("",))))


# ---------------------------------------------------------------- verdicts


class Action(enum.Enum):
    CONTINUE = "continue"    # no opinion; the next filter decides
    ACCEPT = "accept"        # policy only: this recipient is allowed
    REJECT = "reject"        # permanent refusal (5xx)
    TEMPFAIL = "tempfail"    # transient refusal (4xx)
    DISCARD = "discard"      # accept, then silently drop (end of data only)
    DISCONNECT = "disconnect"  # reply (421) and close the session


@dataclass(frozen=True)
class Verdict:
    """The answer of a policy or filter at one phase. Never a string."""

    action: Action
    reply: Reply | None = None
    #: the filter that gave this verdict, set by the FilterChain (tracking's AGENTINFO); not part of equality
    filter_name: str | None = field(default=None, compare=False)

    # instances for the argument-less cases are set below the class
    CONTINUE: ClassVar[Verdict]
    ACCEPT: ClassVar[Verdict]

    @classmethod
    def reject(cls, code: int = 550, status: str = "5.7.1", text: str = "Rejected") -> Verdict:
        if not 500 <= code < 600:
            raise ValueError(f"reject needs a 5xx code, not {code}")
        return cls(Action.REJECT, Reply.make(code, status, text))

    @classmethod
    def tempfail(cls, code: int = 451, status: str = "4.7.1", text: str = "Try again later") -> Verdict:
        if not 400 <= code < 500:
            raise ValueError(f"tempfail needs a 4xx code, not {code}")
        return cls(Action.TEMPFAIL, Reply.make(code, status, text))

    @classmethod
    def discard(cls) -> Verdict:
        return cls(Action.DISCARD)

    @classmethod
    def disconnect(cls, code: int = 421, status: str = "4.7.0", text: str = "Closing connection") -> Verdict:
        return cls(Action.DISCONNECT, Reply.make(code, status, text))


Verdict.CONTINUE = Verdict(Action.CONTINUE)
Verdict.ACCEPT = Verdict(Action.ACCEPT)


# ---------------------------------------------------------------- addresses and parameters


@dataclass(frozen=True)
class Address:
    """A parsed envelope mailbox. The null sender is ``Address("", "")``.

    ``local`` keeps its original form (quoted or not, UTF-8 allowed);
    ``domain`` is kept as given but compared in lower case.
    """

    local: str
    domain: str

    NULL: ClassVar[Address]

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def domain_key(self) -> str:
        return self.domain.lower().rstrip(".")

    def __str__(self) -> str:
        if self.is_null:
            return ""
        if not self.domain:
            return self.local
        return f"{self.local}@{self.domain}"

    @classmethod
    def parse_simple(cls, text: str) -> Address:
        """Split ``local@domain`` at the last ``@`` (for config and tests, not the wire)."""
        if not text:
            return NULL_ADDRESS
        local, sep, domain = text.rpartition("@")
        if not sep:
            return cls(text, "")
        return cls(local, domain)

    def is_ascii(self) -> bool:
        return str(self).isascii()


NULL_ADDRESS = Address("", "")
Address.NULL = NULL_ADDRESS


class Body(enum.Enum):
    SEVEN_BIT = "7BIT"
    EIGHT_BIT = "8BITMIME"
    BINARY = "BINARYMIME"


@dataclass(frozen=True)
class MailParams:
    """MAIL FROM parameters (RFC 1870 SIZE, 6152 BODY, 6531 SMTPUTF8, 3461 RET/ENVID, 4954 AUTH)."""

    size: int | None = None
    body: Body = Body.SEVEN_BIT
    smtputf8: bool = False
    ret: str | None = None      # "FULL" | "HDRS"
    envid: str | None = None    # decoded from xtext
    auth: str | None = None     # decoded from xtext; "<>" when the client said so

    def to_json(self) -> dict[str, Any]:
        # the fields in declaration order, as dataclasses.asdict gave them (which was 3% of receive CPU)
        return {"size": self.size, "body": self.body.value, "smtputf8": self.smtputf8, "ret": self.ret,
                "envid": self.envid, "auth": self.auth}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MailParams:
        return cls(
            size=data.get("size"),
            body=Body(data.get("body", "7BIT")),
            smtputf8=bool(data.get("smtputf8", False)),
            ret=data.get("ret"),
            envid=data.get("envid"),
            auth=data.get("auth"),
        )


@dataclass(frozen=True)
class RcptParams:
    """RCPT TO parameters (RFC 3461 NOTIFY and ORCPT)."""

    notify: tuple[str, ...] | None = None  # ("NEVER",) or a subset of SUCCESS, FAILURE, DELAY
    orcpt: str | None = None               # "addr-type;addr" with the address decoded from xtext

    def to_json(self) -> dict[str, Any]:
        return {"notify": list(self.notify) if self.notify is not None else None, "orcpt": self.orcpt}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RcptParams:
        notify = data.get("notify")
        return cls(tuple(notify) if notify is not None else None, data.get("orcpt"))


# ---------------------------------------------------------------- session and transaction


@dataclass
class TLSInfo:
    version: str
    cipher: str
    peer_certificate_subject: str | None = None
    #: filled by exmta.tls.verify on connectors that ask for a client certificate
    peer_certificate_names: tuple[str, ...] = ()   # subject CN and SAN DNS names
    peer_certificate_verified: bool = False        # the chain verified against the client CA
    partner: str | None = None                     # the certificate name that matched client_names


@dataclass
class Session:
    """One SMTP connection as policy and filters see it (mutable, owned by the protocol)."""

    peer_ip: str
    peer_port: int = 0
    local_ip: str = ""
    local_port: int = 0
    connector: str = "default"
    session_id: str = ""
    helo_name: str | None = None
    esmtp: bool = False
    tls: TLSInfo | None = None
    auth_identity: str | None = None
    started: float = 0.0
    _filter_state: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)

    def state_for(self, owner: object) -> dict[str, Any]:
        """A private namespace for one filter's per-session state."""
        return self._filter_state.setdefault(id(owner), {})

    def reset_for_tls(self) -> None:
        """RFC 3207 4.2: forget everything learnt before STARTTLS."""
        self.helo_name = None
        self.esmtp = False
        self.auth_identity = None
        self._filter_state.clear()


@dataclass
class Transaction:
    """The envelope being built between MAIL and end of data (the server's own; filters get a view)."""

    sender: Address
    params: MailParams = field(default_factory=MailParams)
    recipients: list[tuple[Address, RcptParams]] = field(default_factory=list)

    def view(self) -> TransactionView:
        """A frozen snapshot for policies and filters: they read the envelope, they cannot change it."""
        return TransactionView(self.sender, self.params, tuple(self.recipients))


@dataclass(frozen=True)
class TransactionView:
    """What policies and filters see of a transaction: immutable, so the queued envelope is
    always the recipients the server acknowledged (filters never accept, exmta.interfaces)."""

    sender: Address
    params: MailParams
    recipients: tuple[tuple[Address, RcptParams], ...]


# ---------------------------------------------------------------- queued messages


class RecipientStatus(enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"      # permanent failure (bounced when NOTIFY allows)
    EXPIRED = "expired"    # lifetime ran out (bounced when NOTIFY allows)


@dataclass
class Recipient:
    """One recipient of a queued message and its delivery state."""

    address: str
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    status: RecipientStatus = RecipientStatus.PENDING
    attempts: int = 0
    last_reply: Reply | None = None
    last_attempt: float | None = None
    next_attempt: float | None = None
    delay_notified: bool = False
    route: str | None = None  # connector name used last
    # a DSN owed for this recipient ("failed", "delayed", "delivered", "relayed") and not yet
    # committed: the message is kept, and the DSN retried, until it is (issue 10 item 2)
    dsn_due: str | None = None

    @property
    def is_final(self) -> bool:
        return self.status is not RecipientStatus.PENDING

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "notify": list(self.notify) if self.notify is not None else None,
            "orcpt": self.orcpt,
            "status": self.status.value,
            "attempts": self.attempts,
            "last_reply": self.last_reply.to_json() if self.last_reply else None,
            "last_attempt": self.last_attempt,
            "next_attempt": self.next_attempt,
            "delay_notified": self.delay_notified,
            "route": self.route,
            **({"dsn_due": self.dsn_due} if self.dsn_due else {}),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Recipient:
        notify = d.get("notify")
        return cls(
            address=d["address"],
            notify=tuple(notify) if notify is not None else None,
            orcpt=d.get("orcpt"),
            status=RecipientStatus(d.get("status", "pending")),
            attempts=int(d.get("attempts", 0)),
            last_reply=Reply.from_json(d.get("last_reply")),
            last_attempt=d.get("last_attempt"),
            next_attempt=d.get("next_attempt"),
            delay_notified=bool(d.get("delay_notified", False)),
            route=d.get("route"),
            dsn_due=d.get("dsn_due"),
        )


ENVELOPE_VERSION = 1


@dataclass
class Envelope:
    """Everything about a queued message except its content. Stored as JSON."""

    sender: str
    recipients: list[Recipient]
    params: MailParams = field(default_factory=MailParams)
    queue_id: str = ""
    received_at: float = 0.0
    connector: str = ""
    client_ip: str | None = None
    client_helo: str | None = None
    auth_identity: str | None = None
    message_id: str | None = None
    size: int = 0
    kind: str = "message"  # "message" | "dsn" (a report we generated: never bounced)
    crashes: int = 0       # delivery attempts that raised (poison detection)
    held_reason: str | None = None
    #: set by a transport rule (exmta.rules): this send connector for every recipient, TLS required next hop
    route_connector: str | None = None
    require_tls: bool = False

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if not r.is_final]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": ENVELOPE_VERSION,
            "queue_id": self.queue_id,
            "sender": self.sender,
            "params": self.params.to_json(),
            "recipients": [r.to_json() for r in self.recipients],
            "received_at": self.received_at,
            "connector": self.connector,
            "client_ip": self.client_ip,
            "client_helo": self.client_helo,
            "auth_identity": self.auth_identity,
            "message_id": self.message_id,
            "size": self.size,
            "kind": self.kind,
            "crashes": self.crashes,
            "held_reason": self.held_reason,
            **({"route_connector": self.route_connector} if self.route_connector else {}),
            **({"require_tls": True} if self.require_tls else {}),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Envelope:
        if d.get("version") != ENVELOPE_VERSION:
            raise ValueError(f"unsupported envelope version {d.get('version')!r}")
        return cls(
            sender=d["sender"],
            recipients=[Recipient.from_json(r) for r in d["recipients"]],
            params=MailParams.from_json(d.get("params", {})),
            queue_id=d.get("queue_id", ""),
            received_at=float(d.get("received_at", 0.0)),
            connector=d.get("connector", ""),
            client_ip=d.get("client_ip"),
            client_helo=d.get("client_helo"),
            auth_identity=d.get("auth_identity"),
            message_id=d.get("message_id"),
            size=int(d.get("size", 0)),
            kind=d.get("kind", "message"),
            crashes=int(d.get("crashes", 0)),
            held_reason=d.get("held_reason"),
            route_connector=d.get("route_connector"),
            require_tls=bool(d.get("require_tls", False)),
        )


@dataclass
class QueueEntry:
    """A claimed message: its envelope and where to read its content."""

    queue_id: str
    envelope: Envelope


# ---------------------------------------------------------------- routing and delivery


@dataclass(frozen=True)
class Route:
    """Where some recipients of a message go: a send connector and an optional next hop."""

    connector: str
    recipients: tuple[str, ...]
    nexthop: str | None = None  # e.g. a domain for MX, or None to let the connector decide
    split: str | None = None    # set by a route that splits recipients by set (exmta.routing.split)


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"   # transient; retry later
    FAILED = "failed"       # permanent


@dataclass(frozen=True)
class RecipientResult:
    """What one delivery attempt did for one recipient."""

    recipient: str
    outcome: Outcome
    reply: Reply
    remote_host: str | None = None   # "mx.example.net[192.0.2.1]:25"
    tls: str | None = None           # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"
    peer_dsn: bool | None = None     # did the SMTP next hop offer DSN (None: not an SMTP hop)


@dataclass
class DeliveryRequest:
    """One message, some of its recipients, handed to a send connector."""

    queue_id: str
    envelope: Envelope
    recipients: tuple[Recipient, ...]
    open_content: Callable[[], Any]  # -> a binary file object positioned at 0
    nexthop: str | None = None


# ---------------------------------------------------------------- tracking


class TrackingEventId(enum.Enum):
    """Exchange's message tracking event ids (a subset, more come with operations)."""

    RECEIVE = "RECEIVE"
    SUBMIT = "SUBMIT"            # pickup directory
    SEND = "SEND"                # handed to a remote SMTP host
    DELIVER = "DELIVER"          # delivered to a local mailbox (Maildir/LMTP)
    DEFER = "DEFER"
    FAIL = "FAIL"
    DSN = "DSN"                  # a delivery status notification was generated
    EXPIRE = "EXPIRE"
    DROP = "DROP"
    POISONMESSAGE = "POISONMESSAGE"
    RESUBMIT = "RESUBMIT"
    REJECT = "REJECT"            # refused at the SMTP layer (not queued)
    EXPAND = "EXPAND"            # a distribution group was expanded
    REDIRECT = "REDIRECT"        # an operator redirected (drained) the queue to another host
    AGENTINFO = "AGENTINFO"      # a filter (transport agent) or rule verdict
    TRANSFER = "TRANSFER"        # recipients forked: one message per recipient set (exmta.routing.split)


@dataclass(frozen=True)
class TrackingEvent:
    event_id: TrackingEventId
    queue_id: str
    timestamp: float
    sender: str = ""
    recipients: tuple[str, ...] = ()
    message_id: str | None = None
    size: int | None = None
    connector: str | None = None
    source: str | None = None          # "SMTP", "PICKUP", "DSN", ...
    remote_host: str | None = None
    reply: str | None = None
    tls: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "timestamp": self.timestamp,
            "event_id": self.event_id.value,
            "queue_id": self.queue_id,
            "sender": self.sender,
            "recipients": list(self.recipients),
        }
        for key in ("message_id", "size", "connector", "source", "remote_host", "reply", "tls"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        if self.details:
            d.update(self.details)
        return d


# ---------------------------------------------------------------- queue ids

def new_queue_id(now: float | None = None) -> str:
    """A time-ordered, unique, filename-safe queue id: 13 hex digits of microseconds + 8 random."""
    micros = int((time.time() if now is None else now) * 1_000_000)
    # random, not os.urandom: unique, not secret, and no getrandom() system call per message
    return f"{micros:013X}{random.getrandbits(32):08X}"


__all__ = [
    "Action", "Address", "Body", "DeliveryRequest", "Envelope", "MailParams", "NULL_ADDRESS",
    "Outcome", "QueueEntry", "RcptParams", "Recipient", "RecipientResult", "RecipientStatus",
    "Reply", "Route", "Session", "TLSInfo", "TrackingEvent", "TrackingEventId", "Transaction",
    "Verdict", "new_queue_id",
]
