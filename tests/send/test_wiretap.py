"""The wiretap of the XOAUTH2 relay tests records only its own client's sessions, and complete ones.

Another test's port probe on 127.0.0.1 never lands in the tap (it listens on
an address of its own), and ``settled()`` is false while a session is still
open before the marker, so checks never read a session half recorded.
"""
from __future__ import annotations

import socket

from support.procs import LOOPBACK, wait_until
from support.wiretap import WireTap


def test_a_probe_on_127_0_0_1_is_not_a_session_and_sessions_settle() -> None:
    target = socket.create_server((LOOPBACK, 0))
    target.settimeout(10)
    tap = WireTap(target.getsockname()[1]).start()
    try:
        assert tap.host != LOOPBACK and tap.host.startswith("127.")
        # another test probing "its" port on 127.0.0.1 (the number bind(0) gave the tap)
        try:
            socket.create_connection((LOOPBACK, tap.port), timeout=2).close()
        except OSError:
            pass
        client = socket.create_connection((tap.host, tap.port), timeout=10)
        server, _ = target.accept()
        client.sendall(b"EHLO x\r\n")
        wait_until(lambda: tap.client_bytes() == b"EHLO x\r\n", 10, "the EHLO recorded")
        assert not tap.settled(until=b"STARTTLS\r\n")  # open, and not past STARTTLS yet
        client.sendall(b"STARTTLS\r\n")
        wait_until(lambda: tap.settled(until=b"STARTTLS\r\n"), 10, "the session past STARTTLS")
        assert not tap.settled()  # still open
        client.close()
        wait_until(tap.settled, 10, "the session closed")
        server.close()
        assert [bytes(up) for up, _ in tap.sessions] == [b"EHLO x\r\nSTARTTLS\r\n"]
    finally:
        tap.stop()
        target.close()
