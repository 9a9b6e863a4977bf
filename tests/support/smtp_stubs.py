"""Stand-ins for ESMTP server and client tests: a receive policy, a STARTTLS-capable StringTransport,
and a queue store that records what the server committed."""
from __future__ import annotations

import io
from typing import Any, Iterable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from exmta.interfaces import IMessageWriter, IQueueStore, IReceivePolicy
from exmta.model import Verdict


@implementer(IReceivePolicy)
class StubPolicy:
    """CONTINUE at connect and MAIL; at RCPT accept everyone, or only some.

    With ``local_domains`` and/or ``relay_authenticated`` set, a recipient is
    accepted when its domain is local or the session has authenticated, and
    refused ``554 5.7.1 Relay access denied`` otherwise. ``tls_at_mail``
    records ``session.tls`` as the policy sees it at each MAIL.
    """

    def __init__(self, local_domains: Iterable[str] | None = None, relay_authenticated: bool = False) -> None:
        self.local_domains = None if local_domains is None else frozenset(local_domains)
        self.relay_authenticated = relay_authenticated
        self.tls_at_mail: list[Any] = []

    def check_connect(self, session: Any) -> Verdict:
        return Verdict.CONTINUE

    def check_mail(self, session: Any, sender: Any, params: Any) -> Verdict:
        self.tls_at_mail.append(session.tls)
        return Verdict.CONTINUE

    def authorize_rcpt(self, session: Any, txn: Any, rcpt: Any, params: Any) -> Verdict:
        if self.local_domains is None and not self.relay_authenticated:
            return Verdict.ACCEPT
        if rcpt.domain_key in (self.local_domains or ()):
            return Verdict.ACCEPT
        if self.relay_authenticated and session.auth_identity:
            return Verdict.ACCEPT
        return Verdict.reject(554, "5.7.1", "Relay access denied")


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that offers startTLS and records the context it was given (no handshake)."""

    tls_started_with: Any = None

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        self.tls_started_with = contextFactory


@implementer(IMessageWriter)
class RecordingWriter:
    """An in-memory message writer; ``aborted`` and ``committed`` say how it ended."""

    def __init__(self, store: RecordingStore, queue_id: str) -> None:
        self.store = store
        self.queue_id = queue_id
        self.buf = bytearray()
        self.aborted = False
        self.committed = False

    @property
    def size(self) -> int:
        return len(self.buf)

    def write(self, data: bytes) -> None:
        if self.store.fail_write:
            raise OSError("disk full")
        self.buf += data

    def open_read(self) -> io.BytesIO:
        return io.BytesIO(bytes(self.buf))

    def replace_headers(self, old_length: int, new_header_block: bytes) -> None:
        self.buf[:old_length] = new_header_block

    def abort(self) -> None:
        if not self.committed:
            self.aborted = True


@implementer(IQueueStore)
class RecordingStore:
    """Only what the server uses: open_writer and commit; queue ids are ``prefix`` + a count.

    ``committed`` lists (content, envelope) pairs; ``manual`` holds commits in
    ``pending`` for the test to fire; ``fail_commit``/``fail_write`` make
    commits or writes fail as a full or broken disk would.
    """

    def __init__(self, prefix: str = "Q") -> None:
        self.prefix = prefix
        self.writers: list[RecordingWriter] = []
        self.committed: list[tuple[bytes, Any]] = []
        self.pending: list[tuple[RecordingWriter, Any, Deferred[str]]] = []
        self.manual = False
        self.fail_commit = False
        self.fail_write = False

    def open_writer(self) -> RecordingWriter:
        w = RecordingWriter(self, f"{self.prefix}{len(self.writers) + 1}")
        self.writers.append(w)
        return w

    def commit(self, writer: RecordingWriter, envelope: Any) -> Deferred[str]:
        if self.fail_commit:
            return fail(OSError("fsync failed"))
        if self.manual:
            d: Deferred[Any] = Deferred()
            self.pending.append((writer, envelope, d))
            return d.addCallback(lambda _: self._done(writer, envelope))
        return succeed(self._done(writer, envelope))

    def _done(self, writer: RecordingWriter, envelope: Any) -> str:
        writer.committed = True
        self.committed.append((bytes(writer.buf), envelope))
        return writer.queue_id
