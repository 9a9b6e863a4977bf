"""A TCP relay on 127.0.0.1 that records every byte each way: proof of what crossed the wire in clear.

``WireTap(target_port).start()`` listens on a free port; each accepted
connection is relayed to the target by two threads that keep a copy of the
bytes (``sessions``: one ``[client_to_server, server_to_client]`` pair of
bytearrays per connection).  Sockets time out, threads are daemons, and
``stop()`` closes everything it opened.
"""
from __future__ import annotations

import socket
import threading

from .procs import LOOPBACK


class WireTap:
    def __init__(self, target_port: int, target_host: str = LOOPBACK) -> None:
        self.target = (target_host, target_port)
        self.sessions: list[tuple[bytearray, bytearray]] = []
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name=f"wiretap:{self.port}", daemon=True)

    @property
    def next_hop(self) -> str:
        return f"[{LOOPBACK}]:{self.port}"

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

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            up, down = bytearray(), bytearray()
            with self._lock:
                self.sessions.append((up, down))
                self._sockets += [client, server]
            for src, dst, record in ((client, server, up), (server, client, down)):
                threading.Thread(target=self._pump, args=(src, dst, record), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
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
