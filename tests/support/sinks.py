"""An aiosmtpd sink on a free loopback port that records every transaction.

It runs in aiosmtpd's own thread (``Controller``), which is fine for
integration tests: the test thread waits on :meth:`SmtpSink.wait_for`.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller

from .procs import LOOPBACK, free_port


@dataclass
class Received:
    """One message as the sink saw it (``mail_from`` is "" for ``MAIL FROM:<>``)."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str] = field(default_factory=list)
    rcpt_options: list[str] = field(default_factory=list)
    peer: Any = None
    helo: str | None = None
    at: float = 0.0

    def message(self) -> EmailMessage:
        """The content parsed with the default (strict, RFC 5322) policy."""
        return message_from_bytes(self.content, policy=policy.default)  # type: ignore[return-value]


#: Decides the reply for one recipient: return None to accept, or an SMTP
#: reply line such as "550 5.1.1 no such user" / "451 4.3.0 try later".
RcptPolicy = Callable[[str], str | None]
#: Decides the reply to the end of DATA (same convention).
DataPolicy = Callable[["Received"], str | None]


class _Handler:
    def __init__(self, sink: "SmtpSink") -> None:
        self.sink = sink

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: ANN001
        reply = self.sink.rcpt_policy(address) if self.sink.rcpt_policy else None
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001
        got = Received(
            # aiosmtpd reports the null reverse-path as "<>"; we use ""
            mail_from="" if envelope.mail_from in ("<>", None) else envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            content=bytes(envelope.original_content or envelope.content or b""),
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            peer=session.peer,
            helo=session.host_name,
            at=time.time(),
        )
        reply = self.sink.data_policy(got) if self.sink.data_policy else None
        if reply:
            with self.sink._cond:
                self.sink.rejected.append(got)
                self.sink._cond.notify_all()
            return reply
        with self.sink._cond:
            self.sink.messages.append(got)
            self.sink._cond.notify_all()
        return "250 2.0.0 OK: stored"


class SmtpSink:
    """aiosmtpd Controller on 127.0.0.1:<free port>, recording messages.

    Use as a context manager or call :meth:`start` / :meth:`stop`.
    ``rcpt_policy`` / ``data_policy`` may reject or tempfail selectively.
    """

    def __init__(
        self,
        host: str = LOOPBACK,
        port: int | None = None,
        rcpt_policy: RcptPolicy | None = None,
        data_policy: DataPolicy | None = None,
        **server_kwargs: Any,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.rcpt_policy = rcpt_policy
        self.data_policy = data_policy
        self.messages: list[Received] = []
        self.rejected: list[Received] = []
        self._cond = threading.Condition()
        kwargs: dict[str, Any] = {
            "enable_SMTPUTF8": True, "decode_data": False, "server_hostname": "sink.test",
        }
        kwargs.update(server_kwargs)
        # SMTP keyword arguments are passed straight through (server_kwargs= is deprecated)
        self.controller = Controller(
            _Handler(self), hostname=host, port=self.port, ready_timeout=10.0, **kwargs,
        )
        self._started = False

    @property
    def next_hop(self) -> str:
        """The sink as a Postfix-style next hop: ``[127.0.0.1]:PORT``."""
        return f"[{self.host}]:{self.port}"

    def start(self) -> "SmtpSink":
        """Start the controller thread; returns once the port answers."""
        self.controller.start()
        self._started = True
        return self

    def stop(self) -> None:
        """Stop the controller thread (idempotent)."""
        if self._started:
            self._started = False
            self.controller.stop()

    def wait_for(self, count: int = 1, timeout: float = 30.0) -> list[Received]:
        """Block until at least *count* messages were stored; return them all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"sink on port {self.port}: {len(self.messages)} of {count} "
                        f"message(s) after {timeout:.1f} s")
                self._cond.wait(left)
            return list(self.messages)

    def wait_for_rcpts(
        self, rcpts: list[str] | tuple[str, ...], timeout: float = 30.0,
    ) -> list[Received]:
        """Block until every address in *rcpts* was delivered (in any transactions)."""
        want = {r.lower() for r in rcpts}
        deadline = time.monotonic() + timeout
        with self._cond:
            while not want <= {r.lower() for m in self.messages for r in m.rcpt_tos}:
                left = deadline - time.monotonic()
                if left <= 0:
                    have = sorted({r for m in self.messages for r in m.rcpt_tos})
                    raise TimeoutError(f"sink on port {self.port}: wanted {sorted(want)}, "
                                       f"got {have} after {timeout:.1f} s")
                self._cond.wait(left)
            return list(self.messages)

    def clear(self) -> None:
        """Forget everything received so far."""
        with self._cond:
            self.messages.clear()
            self.rejected.clear()

    def __enter__(self) -> "SmtpSink":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
