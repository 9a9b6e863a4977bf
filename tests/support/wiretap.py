"""A TCP relay on 127.0.0.1 that records every byte each way: proof of what crossed the wire in clear.

``WireTap(target_port).start()`` listens on a free port; each accepted
connection is relayed to the target by two threads that keep a copy of the
bytes (``sessions``: one ``[client_to_server, server_to_client]`` pair of
bytearrays per connection).  Sockets time out, threads are daemons, and
``stop()`` closes everything it opened.

The tap listens on an address of its own in 127.0.0.0/8, not on 127.0.0.1:
other tests on the machine pick ports with ``free_port()`` and probe them on
127.0.0.1 until their server is up; when ``bind(0)`` hands the tap such a
port, those probes would land here and be recorded as sessions of the client
under test.  ``settled()`` says whether every connection accepted so far is
recorded and closed or past ``until`` (the checks read complete sessions).
"""
from __future__ import annotations

import random
import socket
import threading

from .procs import LOOPBACK


def private_loopback() -> str:
    """A random address in 127.0.0.0/8 other than 127.0.0.x, where nobody else probes ports."""
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


class WireTap:
    def __init__(self, target_port: int, target_host: str = LOOPBACK, listen_host: str | None = None) -> None:
        self.target = (target_host, target_port)
        self.host = listen_host or private_loopback()
        self.sessions: list[tuple[bytearray, bytearray]] = []
        self._listener = socket.create_server((self.host, 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._accepting = 0  # accepted, not yet in sessions
        self._open: set[int] = set()  # indexes of sessions whose relay threads still run
        self._pumps: dict[int, int] = {}
        self._thread = threading.Thread(target=self._accept, name=f"wiretap:{self.port}", daemon=True)

    @property
    def next_hop(self) -> str:
        return f"[{self.host}]:{self.port}"

    def start(self) -> "WireTap":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()

    def client_bytes(self) -> bytes:
        """Everything the clients sent, all sessions."""
        with self._lock:
            return b"".join(bytes(up) for up, _ in self.sessions)

    def settled(self, until: bytes | None = None) -> bool:
        """True when every accepted connection is in ``sessions`` and is closed or
        (with ``until``) has sent ``until`` upstream."""
        with self._lock:
            if self._accepting:
                return False
            return all(i not in self._open or (until is not None and until in up)
                       for i, (up, _down) in enumerate(self.sessions))

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            with self._lock:
                self._accepting += 1
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                with self._lock:
                    self._accepting -= 1
                continue
            up, down = bytearray(), bytearray()
            with self._lock:
                index = len(self.sessions)
                self.sessions.append((up, down))
                self._sockets += [client, server]
                self._open.add(index)
                self._pumps[index] = 2
                self._accepting -= 1
            for src, dst, record in ((client, server, up), (server, client, down)):
                threading.Thread(target=self._pump, args=(index, src, dst, record), daemon=True).start()

    def _pump(self, index: int, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            self._relay(src, dst, record)
        finally:
            with self._lock:
                self._pumps[index] -= 1
                if not self._pumps[index]:
                    self._open.discard(index)

    def _relay(self, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        src.settimeout(0.5)
        while not self._stopping.is_set():
            try:
                data = src.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            with self._lock:
                record.extend(data)
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "WireTap":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
