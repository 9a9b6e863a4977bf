"""Child process for the kill -9 test of SpoolStore (tests/queue/test_spool_crash.py).

``python spool_crash_child.py ROOT [CONCURRENCY]`` commits messages into the
spool at ROOT on a real reactor, CONCURRENCY at a time, and prints each queue
id (one line, flushed) only after its commit Deferred fired. Every third
committed message is also claimed and deferred by an hour, so a kill can land
in the middle of a claim or an envelope rewrite too. Bounded: stops by itself
after 20 s or 100 000 messages.
"""
from __future__ import annotations

import hashlib
import sys
import time

from exmta.model import Envelope, Recipient

MAX_SECONDS = 20.0
MAX_MESSAGES = 100_000


def expected_content(queue_id: str) -> bytes:
    """The content the child writes for queue_id: 0 to ~40 KiB, derived from the id."""
    lines = int(queue_id[-4:], 16) % 500
    head = f"X-Crash-Test: {queue_id}\r\nSubject: crash test\r\n\r\n".encode()
    body = b"".join(b"%05d %s\r\n" % (i, queue_id.encode() * 3) for i in range(lines))
    return head + body


def digest_id(content: bytes) -> str:
    """The Message-ID the child stores: it names the SHA-256 of the content."""
    return f"<{hashlib.sha256(content).hexdigest()}@crash.test>"


def main(argv: list[str]) -> int:
    from twisted.internet import reactor
    from twisted.python.threadpool import ThreadPool

    from exmta.queue.spool import SpoolStore

    root = argv[1]
    concurrency = int(argv[2]) if len(argv) > 2 else 8
    pool = ThreadPool(minthreads=2, maxthreads=8, name="spool")
    pool.start()
    store = SpoolStore(root, reactor, pool)
    started = time.monotonic()
    count = 0

    def one() -> None:
        nonlocal count
        if count >= MAX_MESSAGES or time.monotonic() - started > MAX_SECONDS:
            if reactor.running:
                reactor.stop()
            return
        count += 1
        writer = store.open_writer()
        content = expected_content(writer.queue_id)
        for i in range(0, len(content), 4096):  # streamed in chunks, as SMTP would
            writer.write(content[i:i + 4096])
        env = Envelope(
            sender="crash@example.com",
            recipients=[Recipient("rcpt@example.net")],
            message_id=digest_id(content),
            size=len(content),
        )
        d = store.commit(writer, env)
        d.addCallback(committed)
        d.addErrback(failed)

    def committed(queue_id: str) -> None:
        sys.stdout.write(queue_id + "\n")
        sys.stdout.flush()
        if int(queue_id[-2:], 16) % 3 == 0:
            d = store.claim(time.time(), 1)
            d.addCallback(defer_claimed)
            d.addErrback(failed)
        one()

    def defer_claimed(entries: list) -> None:
        for entry in entries:
            entry.envelope.recipients[0].attempts += 1
            store.update(entry.queue_id, entry.envelope, time.time() + 3600).addErrback(failed)

    def failed(f: object) -> None:
        sys.stderr.write(f"error: {f}\n")
        if reactor.running:
            reactor.stop()

    for _ in range(concurrency):
        reactor.callWhenRunning(one)
    reactor.run()
    pool.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
