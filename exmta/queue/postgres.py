"""The PostgreSQL queue store: one queue shared by several nodes, so a node lost for good loses nothing.

Every message lives in the database: its envelope (the same JSON as the
spool's), its content in chunks with a SHA-256 checked before delivery, and
its state (``incoming``, ``active``, ``deferred``, ``hold``). ``commit``
fires only after the transaction holding all of that has committed with
``synchronous_commit = on``, so a 250 means every node can deliver it.

Claiming is by lease: ``claim`` takes due messages with ``FOR UPDATE SKIP
LOCKED`` (new mail, deferred mail whose time has come, and active mail whose
owner's lease expired), gives each a fencing token from a sequence and a
lease that this node renews while it works. ``update`` records a result only
where the token still matches: a node that was cut off and comes back after
its lease expired cannot overwrite the new owner's result; its result is
dropped and counted (``lost_leases``): that recipient may be delivered twice
(at-least-once, the documented duplicate window).

Blocking psycopg calls run on the store's own bounded thread pool (never
the spool's, filters' or deliveries' pool), each taking a connection from a
small pool of connections (:class:`~exmta.queue.pgpool.Connections`) that makes a new one as soon as PostgreSQL is
back after a restart.
Content of a claimed message is copied to a local cache file (checksum
verified) so that ``open_content`` stays synchronous and cheap for the
delivery path, as the IQueueStore contract wants.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from exmta.coroutines import run_coroutine
from exmta.interfaces import IIncomingFeed, IMessageWriter, IQueueAdmin, IQueueStore
from exmta.model import Envelope, QueueEntry, new_queue_id
from exmta.queue.errors import ContentCorrupt, StoreUnavailable
from exmta.queue.pgpool import Connections
from exmta.queue.pgservice import PostgresService
from exmta.queue.pgschema import migrate_dsn, status_dsn

T = TypeVar("T")

STATES = ("incoming", "active", "deferred", "hold")
CHUNK = 1024 * 1024          # content is stored in chunks of this many octets
_READ_BUFFER = 64 * 1024


def _encode(envelope: Envelope) -> str:
    return json.dumps(envelope.to_json(), separators=(",", ":"), ensure_ascii=False)


def _decode(text: str, queue_id: str) -> Envelope:
    envelope = Envelope.from_json(json.loads(text))
    envelope.queue_id = queue_id
    return envelope


def _map_error(e: BaseException) -> BaseException:
    """psycopg errors as the core understands them: disk full is ENOSPC (452 4.3.1), the rest temporary."""
    sqlstate = getattr(e, "sqlstate", None)
    if sqlstate in ("53100", "53200"):  # disk_full, out_of_memory
        return OSError(errno.ENOSPC, f"PostgreSQL: {e}")
    if isinstance(e, (KeyError, ValueError, LookupError)):
        return e
    return StoreUnavailable(f"PostgreSQL: {type(e).__name__}: {e}")


@implementer(IMessageWriter)
class PostgresWriter:
    """A message being received: a local temp file until commit copies it into the database."""

    def __init__(self, store: PostgresStore, queue_id: str, path: str) -> None:
        self.queue_id = queue_id
        self.size = 0
        self._store = store
        self._path = path
        self._file: BinaryIO | None = None
        self._state = "open"  # open, committing, committed, aborted

    def _f(self) -> BinaryIO:
        if self._file is None:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self._file = os.fdopen(fd, "w+b", buffering=_READ_BUFFER)
        return self._file

    def _require_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"writer {self.queue_id} is {self._state}")

    def write(self, data: bytes) -> None:
        self._require_open()
        self._f().write(data)
        self.size += len(data)

    def open_read(self) -> BinaryIO:
        f = self._f()
        f.flush()
        return open(self._path, "rb", buffering=_READ_BUFFER)

    def replace_headers(self, old_length: int, new_header_block: bytes) -> None:
        self._require_open()
        if not 0 <= old_length <= self.size:
            raise ValueError(f"old_length {old_length} outside 0..{self.size}")
        f = self._f()
        f.flush()
        f.seek(old_length)
        rest = f.read()
        f.seek(0)
        f.write(new_header_block)
        f.write(rest)
        f.truncate()
        self.size = len(new_header_block) + len(rest)

    def _close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def abort(self) -> None:
        if self._state == "committed":
            return
        self._state = "aborted"
        self._close()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass


@dataclass
class _Lease:
    token: int
    cache: str | None = None


@dataclass
class NodeStatus:
    name: str
    started_at: str
    heartbeat: str
    heartbeat_age: float
    pid: int
    draining: bool
    received: int
    lost_leases: int
    claimed: int = 0
    receive_rate: float = 0.0   # messages per second received over the last heartbeat interval
    extra: dict[str, Any] = field(default_factory=dict)


@implementer(IQueueStore, IQueueAdmin, IIncomingFeed)
class PostgresStore:
    """IQueueStore and IQueueAdmin on PostgreSQL (psycopg 3)."""

    log = Logger(namespace="exmta.queue.postgres")

    def __init__(self, dsn: str, node: str, work_dir: str, reactor: Any, *, clock: Any = None,
                 lease: float = 60.0, pool_size: int = 8, connect_timeout: float = 10.0,
                 poll_interval: float = 1.0, threadpool: Any = None) -> None:
        self.dsn = dsn
        self.node = node
        self.lease = float(lease)
        self.poll_interval = poll_interval
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._tmp = os.path.join(work_dir, "tmp")
        self._cache = os.path.join(work_dir, "cache")
        for d in (work_dir, self._tmp, self._cache):
            os.makedirs(d, mode=0o700, exist_ok=True)
        # its own bounded pool: a slow database never takes the spool's, filters' or deliveries' threads
        self._own_threads = threadpool is None
        self._threads = threadpool if threadpool is not None else ThreadPool(1, pool_size, name="exmta-postgres")
        self._connect_timeout = connect_timeout
        self._pool = Connections(dsn, pool_size, connect_timeout, f"exmta {node}")
        self._leases: dict[str, _Lease] = {}
        self._listeners: list[Callable[[str], Any]] = []
        self.received = 0        # messages committed by this node since start
        self.lost_leases = 0     # results dropped because another node owned the message by then
        self.takeovers = 0       # messages claimed from a node whose lease had expired
        self.draining = False    # set from the database by the heartbeat (exmta cluster drain)
        self._rate_mark: tuple[float, int] | None = None  # (time, received) at the last heartbeat
        self.service = PostgresService(self)

    # ------------------------------------------------------------ plumbing

    def open(self) -> None:
        if self._own_threads:
            self._threads.start()

    def close(self) -> None:
        if self._own_threads:
            self._threads.stop()
        self._pool.close()

    def _in_pool(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        def call() -> T:
            try:
                return f(*args)
            except BaseException as e:
                mapped = _map_error(e)
                if mapped is e:
                    raise
                raise mapped from e
        return deferToThreadPool(self._reactor, self._threads, call)

    def _tx(self, work: Callable[[Any], T]) -> T:
        """Run work(cursor) in one transaction on a pooled connection (in a thread)."""
        with self._pool.connection() as conn:
            with conn.transaction():
                with conn.cursor() as cur:
                    return work(cur)

    def _notify(self, queue_id: str) -> None:
        for callback in list(self._listeners):
            try:
                callback(queue_id)
            except Exception:
                self.log.failure("queue listener failed for {queue_id}", queue_id=queue_id)

    def add_listener(self, callback: Callable[[str], Any]) -> None:
        """callback(queue_id) after each commit or submit here, a release, and every poll_interval
        (with an empty id) so that mail committed by other nodes, or left by a dead one, is seen."""
        self._listeners.append(callback)

    # ------------------------------------------------------------ several processes (as the spool offers)

    def notice(self, queue_id: str) -> None:
        """A receive worker of this node committed queue_id: wake the scheduler."""
        self._notify(queue_id)

    def scan_incoming(self) -> Deferred[int]:
        """Nothing to index: the database is the index, and the poll sees every node's mail."""
        return succeed(0)

    # ------------------------------------------------------------ writing

    def open_writer(self) -> PostgresWriter:
        queue_id = new_queue_id(self._clock.seconds())
        path = os.path.join(self._tmp, f"{queue_id}.{random.getrandbits(32):08x}.msg")
        return PostgresWriter(self, queue_id, path)

    def commit(self, writer: PostgresWriter, envelope: Envelope) -> Deferred[str]:
        if not isinstance(writer, PostgresWriter) or writer._store is not self:
            raise TypeError("commit() needs a writer from this store's open_writer()")
        writer._require_open()
        envelope.queue_id = writer.queue_id
        if not envelope.size:
            envelope.size = writer.size
        state = "hold" if envelope.held_reason else "incoming"
        writer._state = "committing"
        if writer._file is not None:
            writer._file.flush()
        else:
            writer._f().flush()
        text = _encode(envelope)

        def work() -> None:
            writer._close()
            with open(writer._path, "rb", buffering=_READ_BUFFER) as f:
                self._insert(writer.queue_id, state, text, envelope.size, f)

        def done(_: object) -> str:
            writer._state = "committed"
            _unlink_quiet(writer._path)
            self.received += 1
            if state == "incoming":
                self._notify(writer.queue_id)
            else:
                self.log.info("{queue_id} committed to hold (quarantine)", queue_id=writer.queue_id)
            return writer.queue_id

        def failed(failure: Any) -> Any:
            writer._state = "aborted"
            _unlink_quiet(writer._path)
            return failure

        return self._in_pool(work).addCallbacks(done, failed)

    def _insert(self, queue_id: str, state: str, text: str, size: int, content: BinaryIO) -> None:
        def work(cur: Any) -> None:
            digest = hashlib.sha256()
            seq = 0
            rows = []
            while True:
                chunk = content.read(CHUNK)
                if not chunk and seq:
                    break
                digest.update(chunk)
                rows.append((queue_id, seq, chunk))
                seq += 1
                if not chunk:
                    break
            cur.execute(
                "INSERT INTO exmta_message (queue_id, state, envelope, next_attempt, size, sha256, chunks,"
                " committed_by) VALUES (%s, %s, %s, 0, %s, %s, %s, %s)",
                (queue_id, state, text, size, digest.digest(), len(rows), self.node))
            cur.executemany("INSERT INTO exmta_content (queue_id, seq, data) VALUES (%s, %s, %s)", rows)
        self._tx(work)

    def submit(self, content: bytes, envelope: Envelope) -> Deferred[str]:
        writer = self.open_writer()
        try:
            writer.write(content)
        except BaseException:
            writer.abort()
            raise
        return self.commit(writer, envelope)

    # ------------------------------------------------------------ claiming

    def next_due(self) -> Deferred[float | None]:
        """The earliest time anything may become claimable: deferred mail's retry time, a foreign
        lease's expiry, or now for unclaimed new mail (which other nodes may hold locked)."""
        def work(cur: Any) -> float | None:
            cur.execute(
                "SELECT min(CASE state WHEN 'incoming' THEN 0"
                " WHEN 'active' THEN extract(epoch FROM lease_expires)::float8 ELSE next_attempt END)"
                " FROM exmta_message WHERE state IN ('incoming', 'deferred')"
                " OR (state = 'active' AND lease_owner IS DISTINCT FROM %s)", (self.node,))
            row = cur.fetchone()
            return None if row[0] is None else float(row[0])
        return self._in_pool(self._tx, work)

    def claim(self, now: float, limit: int) -> Deferred[list[QueueEntry]]:
        """Lease up to ``limit`` due messages: new, deferred whose time has come, or orphaned by a
        node whose lease expired (a takeover, counted as a crash of that attempt). A draining node
        claims nothing: it finishes what it holds and the other nodes deliver the rest."""
        if limit <= 0 or self.draining:
            return succeed([])
        return self._in_pool(self._claim, float(now), int(limit))

    def _claim(self, now: float, limit: int) -> list[QueueEntry]:
        # never our own messages still in hand: a lease of ours that ran out while the database was away is
        # renewed (same token) or taken by another node, not handed to our scheduler a second time
        ours = list(self._leases)

        def work(cur: Any) -> list[tuple[Any, ...]]:
            cur.execute(
                "WITH picked AS ("
                " SELECT queue_id, state, lease_owner FROM exmta_message"
                " WHERE (state = 'incoming' OR (state = 'deferred' AND next_attempt <= %(now)s)"
                "    OR (state = 'active' AND lease_expires < now())) AND NOT (queue_id = ANY(%(ours)s))"
                " ORDER BY next_attempt, queue_id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                " UPDATE exmta_message m SET state = 'active', lease_owner = %(node)s,"
                "  lease_token = nextval('exmta_lease_token'),"
                "  lease_expires = now() + make_interval(secs => %(lease)s)"
                " FROM picked WHERE m.queue_id = picked.queue_id"
                " RETURNING m.queue_id, m.envelope, m.lease_token, picked.state, picked.lease_owner,"
                "  m.sha256, m.chunks",
                {"now": now, "limit": limit, "node": self.node, "lease": self.lease, "ours": ours})
            return list(cur.fetchall())

        rows = self._tx(work)
        entries = []
        for queue_id, text, token, old_state, old_owner, sha256, chunks in rows:
            lease = _Lease(int(token))
            self._leases[queue_id] = lease
            try:
                envelope = _decode(text, queue_id)
                if old_state == "active":
                    # the owner's lease ran out mid-attempt: its process died or lost the database
                    envelope.crashes += 1
                    self.takeovers += 1
                    self.log.warn("took over {queue_id} from node {owner} (lease expired)",
                                  queue_id=queue_id, owner=old_owner)
                lease.cache = self._fetch_to_cache(queue_id, bytes(sha256), chunks)
            except (ContentCorrupt, ValueError, KeyError, TypeError) as e:
                self.log.error("{queue_id} cannot be delivered ({error}); moving it to hold",
                               queue_id=queue_id, error=str(e))
                self._leases.pop(queue_id, None)
                self._hold_now(queue_id, int(token), f"corrupt: {e}")
                continue
            except Exception as e:
                # the database went away while we read the content: hand the lease back (or let it expire)
                self.log.warn("{queue_id}: could not read its content ({error}); left for a later claim",
                              queue_id=queue_id, error=str(e))
                self._leases.pop(queue_id, None)
                self._unclaim(queue_id, int(token))
                continue
            entries.append(QueueEntry(queue_id, envelope))
        return entries

    def _fetch_to_cache(self, queue_id: str, sha256: bytes, chunks: int) -> str:
        path = os.path.join(self._cache, queue_id + ".msg")
        tmp = path + f".{random.getrandbits(32):08x}"
        digest = hashlib.sha256()
        count = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb", buffering=_READ_BUFFER) as f:
                with self._pool.connection() as conn:
                    with conn.cursor() as cur:
                        cur.execute("SELECT data FROM exmta_content WHERE queue_id = %s ORDER BY seq",
                                    (queue_id,))
                        for (data,) in cur:
                            data = bytes(data)
                            digest.update(data)
                            f.write(data)
                            count += 1
                    conn.rollback()
            if count != chunks or digest.digest() != sha256:
                raise ContentCorrupt(f"content checksum mismatch ({count} of {chunks} chunks)")
            os.replace(tmp, path)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        return path

    def _unclaim(self, queue_id: str, token: int) -> None:
        def work(cur: Any) -> None:
            cur.execute("UPDATE exmta_message SET state = 'incoming', lease_owner = NULL, lease_token = NULL,"
                        " lease_expires = NULL WHERE queue_id = %s AND lease_token = %s", (queue_id, token))
        try:
            self._tx(work)
        except Exception as e:
            self.log.warn("{queue_id}: could not hand back its lease ({error}); it expires in {lease}s",
                          queue_id=queue_id, error=str(e), lease=self.lease)

    def _hold_now(self, queue_id: str, token: int, reason: str) -> None:
        def work(cur: Any) -> None:
            cur.execute("SELECT envelope FROM exmta_message WHERE queue_id = %s AND lease_token = %s FOR UPDATE",
                        (queue_id, token))
            row = cur.fetchone()
            envelope = text = None
            if row is not None:
                try:
                    envelope = _decode(row[0], queue_id)
                    envelope.held_reason = reason
                    text = _encode(envelope)
                except Exception:
                    text = row[0]
            cur.execute("UPDATE exmta_message SET state = 'hold', lease_owner = NULL, lease_expires = NULL,"
                        " envelope = coalesce(%s, envelope) WHERE queue_id = %s AND lease_token = %s",
                        (text, queue_id, token))
        try:
            self._tx(work)
        except Exception as e:
            self.log.error("could not hold {queue_id} ({error}); its lease expires and it is checked again",
                           queue_id=queue_id, error=str(e))

    # ------------------------------------------------------------ results

    def update(self, queue_id: str, envelope: Envelope, next_attempt: float | None) -> Deferred[None]:
        """Record an attempt's result, only under this node's lease token (fencing)."""
        lease = self._leases.get(queue_id)
        if lease is None:
            return fail(KeyError(queue_id))
        envelope.queue_id = queue_id
        text = _encode(envelope)

        def work(cur: Any) -> bool:
            cur.execute("SELECT state FROM exmta_message WHERE queue_id = %s AND lease_token = %s FOR UPDATE",
                        (queue_id, lease.token))
            row = cur.fetchone()
            if row is None:
                return False
            if next_attempt is None:
                cur.execute("DELETE FROM exmta_message WHERE queue_id = %s", (queue_id,))
                return True
            if row[0] == "hold":  # held by an operator during the attempt: stays held
                if not envelope.held_reason:
                    envelope.held_reason = "held during delivery"
                cur.execute("UPDATE exmta_message SET envelope = %s, lease_owner = NULL, lease_expires = NULL"
                            " WHERE queue_id = %s", (_encode(envelope), queue_id))
                return True
            cur.execute("UPDATE exmta_message SET state = 'deferred', envelope = %s, next_attempt = %s,"
                        " lease_owner = NULL, lease_expires = NULL WHERE queue_id = %s",
                        (text, float(next_attempt), queue_id))
            return True

        def done(recorded: bool) -> None:
            self._drop_lease(queue_id)
            if not recorded:
                self._lease_lost(queue_id)

        return self._in_pool(self._tx, work).addCallback(done)

    def _lease_lost(self, queue_id: str) -> None:
        self.lost_leases += 1
        self.log.warn("{queue_id}: lease lost to another node before the result was stored; the result is "
                      "dropped and the new owner tries again (a recipient may receive it twice)",
                      queue_id=queue_id)

        def count(cur: Any) -> None:
            cur.execute("UPDATE exmta_node SET lost_leases = lost_leases + 1 WHERE name = %s", (self.node,))
        self._in_pool(self._tx, count).addErrback(lambda f: None)

    def _drop_lease(self, queue_id: str) -> None:
        lease = self._leases.pop(queue_id, None)
        if lease is not None and lease.cache:
            _unlink_quiet(lease.cache)

    def hold(self, queue_id: str, envelope: Envelope | None, reason: str) -> Deferred[None]:
        """Move a message, wherever it is, to hold with ``reason``; envelope None keeps the stored one."""
        text = None
        if envelope is not None:
            envelope.queue_id = queue_id
            envelope.held_reason = reason
            text = _encode(envelope)
        ours = envelope is not None and queue_id in self._leases

        def work(cur: Any) -> None:
            cur.execute("SELECT envelope FROM exmta_message WHERE queue_id = %s FOR UPDATE", (queue_id,))
            row = cur.fetchone()
            if row is None:
                raise KeyError(queue_id)
            new = text
            if new is None:
                stored = _decode(row[0], queue_id)
                stored.held_reason = reason
                new = _encode(stored)
            cur.execute("UPDATE exmta_message SET state = 'hold', envelope = %s"
                        + (", lease_owner = NULL, lease_expires = NULL" if ours else "")
                        + " WHERE queue_id = %s", (new, queue_id))

        def done(_: object) -> None:
            if ours:  # the scheduler's own hold ends its attempt
                self._drop_lease(queue_id)
        return self._in_pool(self._tx, work).addCallback(done)

    def release(self, queue_id: str) -> Deferred[None]:
        return self._release(queue_id, None)

    def release_now(self, queue_id: str, when: float) -> Deferred[None]:
        return self._release(queue_id, when)

    def _release(self, queue_id: str, when: float | None) -> Deferred[None]:
        def work(cur: Any) -> None:
            cur.execute("SELECT state, envelope FROM exmta_message WHERE queue_id = %s FOR UPDATE", (queue_id,))
            row = cur.fetchone()
            if row is None:
                raise KeyError(queue_id)
            if row[0] != "hold":
                raise ValueError(f"{queue_id} is {row[0]}, not hold")
            envelope = _decode(row[1], queue_id)
            envelope.held_reason = None
            envelope.crashes = 0
            if when is not None:
                for r in envelope.pending():
                    r.next_attempt = when
            cur.execute("UPDATE exmta_message SET state = 'incoming', envelope = %s, next_attempt = 0,"
                        " lease_owner = NULL, lease_token = NULL, lease_expires = NULL WHERE queue_id = %s",
                        (_encode(envelope), queue_id))

        return self._in_pool(self._tx, work).addCallback(lambda _: self._notify(queue_id))

    # ------------------------------------------------------------ reading

    def open_content(self, queue_id: str) -> BinaryIO:
        """The content: the verified local copy of a message this node claimed, else read from the
        database (blocking: callers outside the delivery path call it from a thread)."""
        lease = self._leases.get(queue_id)
        if lease is not None and lease.cache:
            return open(lease.cache, "rb", buffering=_READ_BUFFER)

        def work(cur: Any) -> bytes:
            cur.execute("SELECT data FROM exmta_content WHERE queue_id = %s ORDER BY seq", (queue_id,))
            parts = [bytes(row[0]) for row in cur]
            if not parts:
                raise FileNotFoundError(errno.ENOENT, f"no content for {queue_id}")
            return b"".join(parts)
        return io.BytesIO(self._tx(work))

    def list_messages(self, queue: str) -> Deferred[list[Envelope]]:
        if queue not in STATES:
            return fail(ValueError(f"unknown queue {queue!r}"))

        def work(cur: Any) -> list[Envelope]:
            cur.execute("SELECT queue_id, envelope FROM exmta_message WHERE state = %s ORDER BY queue_id",
                        (queue,))
            out = []
            for queue_id, text in cur.fetchall():
                try:
                    out.append(_decode(text, queue_id))
                except (ValueError, KeyError, TypeError) as e:
                    self.log.warn("list_messages skipped {queue_id}: {error}", queue_id=queue_id, error=str(e))
            return out
        return self._in_pool(self._tx, work)

    def read(self, queue_id: str) -> Deferred[tuple[str, Envelope]]:
        def work(cur: Any) -> tuple[str, Envelope]:
            cur.execute("SELECT state, envelope FROM exmta_message WHERE queue_id = %s", (queue_id,))
            row = cur.fetchone()
            if row is None:
                raise KeyError(queue_id)
            return row[0], _decode(row[1], queue_id)
        return self._in_pool(self._tx, work)

    def remove(self, queue_id: str) -> Deferred[Envelope]:
        def work(cur: Any) -> Envelope:
            cur.execute("SELECT state, envelope FROM exmta_message WHERE queue_id = %s FOR UPDATE", (queue_id,))
            row = cur.fetchone()
            if row is None:
                raise KeyError(queue_id)
            if row[0] == "active":
                raise ValueError(f"{queue_id} is being delivered right now; try again in a moment")
            cur.execute("DELETE FROM exmta_message WHERE queue_id = %s", (queue_id,))
            return _decode(row[1], queue_id)
        return self._in_pool(self._tx, work)

    def reschedule(self, queue_id: str, when: float) -> Deferred[bool]:
        def work(cur: Any) -> bool:
            cur.execute("SELECT state, envelope FROM exmta_message WHERE queue_id = %s FOR UPDATE", (queue_id,))
            row = cur.fetchone()
            if row is None:
                raise KeyError(queue_id)
            if row[0] != "deferred":
                return False
            envelope = _decode(row[1], queue_id)
            for r in envelope.pending():
                if r.next_attempt is None or r.next_attempt > when:
                    r.next_attempt = when
            cur.execute("UPDATE exmta_message SET envelope = %s, next_attempt = %s WHERE queue_id = %s",
                        (_encode(envelope), when, queue_id))
            return True

        def done(moved: bool) -> bool:
            if moved:
                self._notify(queue_id)
            return moved
        return self._in_pool(self._tx, work).addCallback(done)

    # ------------------------------------------------------------ recovery and leases

    def recover(self) -> Deferred[int]:
        """On start: this node's own leases (left by its previous process) go back to incoming,
        each counted as a crash; the local temp and cache files are removed (the database holds
        every committed message, so none of them is needed)."""
        return run_coroutine(self._recover())

    async def _recover(self) -> int:
        def work(cur: Any) -> int:
            cur.execute("SELECT queue_id, envelope FROM exmta_message WHERE state = 'active' AND lease_owner = %s"
                        " FOR UPDATE", (self.node,))
            rows = cur.fetchall()
            for queue_id, text in rows:
                try:
                    envelope = _decode(text, queue_id)
                    envelope.crashes += 1
                    text = _encode(envelope)
                except Exception:
                    pass
                cur.execute("UPDATE exmta_message SET state = 'incoming', envelope = %s, lease_owner = NULL,"
                            " lease_token = NULL, lease_expires = NULL WHERE queue_id = %s", (text, queue_id))
            for queue_id, _ in rows:  # whatever this process held before is void now
                self._drop_lease(queue_id)
            return len(rows)

        def clean() -> int:
            removed = 0
            for d in (self._tmp, self._cache):
                for name in os.listdir(d):
                    if _unlink_quiet(os.path.join(d, name)):
                        removed += 1
            return removed

        removed = await self._in_pool(clean)
        returned = await self._in_pool(self._tx, work)
        self.log.info("PostgreSQL queue: node {node} returned {returned} message(s) it had claimed, removed "
                      "{removed} local temp/cache file(s)", node=self.node, returned=returned, removed=removed)
        return returned

    def release_leases(self) -> Deferred[int]:
        """Return every message this node still holds to incoming, due now, for any node (at stop)."""
        leases = {q: lease.token for q, lease in self._leases.items()}
        if not leases:
            return succeed(0)

        def work(cur: Any) -> int:
            cur.execute("UPDATE exmta_message SET state = 'incoming', lease_owner = NULL, lease_token = NULL,"
                        " lease_expires = NULL WHERE state = 'active' AND queue_id = ANY(%s)"
                        " AND lease_token = ANY(%s)", (list(leases), list(leases.values())))
            return cur.rowcount

        def done(count: int) -> int:
            for queue_id in leases:
                self._drop_lease(queue_id)
            self.log.info("handed {count} claimed message(s) back to the cluster", count=count)
            return count
        return self._in_pool(self._tx, work).addCallback(done)

    def claimed(self) -> list[str]:
        return sorted(self._leases)

    def renew_leases(self) -> Deferred[int]:
        """Extend the lease of every message this node works on; fires with the count renewed."""
        leases = dict((q, lease.token) for q, lease in self._leases.items())
        if not leases:
            return succeed(0)

        def work(cur: Any) -> int:
            cur.execute("UPDATE exmta_message SET lease_expires = now() + make_interval(secs => %s)"
                        " WHERE lease_owner = %s AND queue_id = ANY(%s) AND lease_token = ANY(%s)",
                        (self.lease, self.node, list(leases), list(leases.values())))
            return cur.rowcount
        return self._in_pool(self._tx, work)

    def heartbeat(self) -> Deferred[bool]:
        """Store this node's heartbeat and receive rate; fires with its draining flag (`exmta cluster drain`)."""
        received, now = self.received, self._clock.seconds()
        mark, self._rate_mark = self._rate_mark, (now, received)
        rate = (received - mark[1]) / (now - mark[0]) if mark is not None and now > mark[0] else 0.0

        def work(cur: Any) -> bool:
            cur.execute(
                "INSERT INTO exmta_node (name, started_at, heartbeat, pid, received, receive_rate)"
                " VALUES (%s, now(), now(), %s, %s, %s) ON CONFLICT (name) DO UPDATE SET heartbeat = now(),"
                " pid = excluded.pid, received = excluded.received, receive_rate = excluded.receive_rate"
                " RETURNING draining", (self.node, os.getpid(), received, rate))
            return bool(cur.fetchone()[0])

        def done(draining: bool) -> bool:
            self.draining = draining
            return draining
        return self._in_pool(self._tx, work).addCallback(done)

    def set_draining(self, node: str, draining: bool) -> Deferred[bool]:
        """Mark a node draining (or not); fires False when there is no such node."""
        def work(cur: Any) -> bool:
            cur.execute("UPDATE exmta_node SET draining = %s WHERE name = %s", (draining, node))
            return cur.rowcount == 1
        return self._in_pool(self._tx, work)

    def nodes(self) -> Deferred[list[NodeStatus]]:
        """The cluster: each node's heartbeat, and how many messages it holds claimed."""
        def work(cur: Any) -> list[NodeStatus]:
            cur.execute(
                "SELECT n.name, n.started_at::text, n.heartbeat::text,"
                " extract(epoch FROM now() - n.heartbeat)::float8, n.pid, n.draining, n.received,"
                " n.lost_leases, (SELECT count(*) FROM exmta_message m WHERE m.state = 'active'"
                " AND m.lease_owner = n.name AND m.lease_expires > now()), n.receive_rate"
                " FROM exmta_node n ORDER BY n.name")
            return [NodeStatus(*row[:8], claimed=int(row[8]), receive_rate=float(row[9]))
                    for row in cur.fetchall()]
        return self._in_pool(self._tx, work)

    def counts(self) -> Deferred[dict[str, int]]:
        def work(cur: Any) -> dict[str, int]:
            cur.execute("SELECT state, count(*) FROM exmta_message GROUP BY state")
            out = {s: 0 for s in STATES}
            out.update({state: int(n) for state, n in cur.fetchall()})
            return out
        return self._in_pool(self._tx, work)


def _unlink_quiet(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


__all__ = ["Connections", "NodeStatus", "PostgresStore", "PostgresWriter", "StoreUnavailable", "migrate_dsn",
           "status_dsn"]
