"""Small threaded TCP helpers for fault tests: a proxy that can cut a node off, and a next hop that stalls.

``CuttableProxy`` listens on 127.0.0.1:<free port> and forwards each
connection to a Unix socket or TCP address; ``cut()`` closes every open
connection and refuses new ones until ``restore()``. ``StallingServer``
accepts SMTP connections and says nothing until ``release()``, which closes
them: a next hop that holds a delivery (and so its lease) open.
"""
from __future__ import annotations

import socket
import threading
from typing import Any

from .procs import LOOPBACK


class CuttableProxy:
    def __init__(self, target: str | tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._cut = False
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _connect(self) -> socket.socket:
        if isinstance(self.target, str):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.target)
            return s
        return socket.create_connection(self.target, timeout=10)

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                cut = self._cut
            if cut:
                client.close()
                continue
            try:
                upstream = self._connect()
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Drop every connection and refuse new ones (the node is cut off from the database)."""
        with self._lock:
            self._cut = True
            conns, self._open = self._open, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._stopped = True
        self.cut()
        self._listener.close()


class StallingServer:
    """Accepts connections and never answers until release() closes them all."""

    def __init__(self) -> None:
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def next_hop(self) -> str:
        return f"[{LOOPBACK}]:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._held.append(conn)
                self.accepted += 1

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, []
        for conn in held:
            conn.close()

    def close(self) -> None:
        self._listener.close()
        self.release()

    def __enter__(self) -> StallingServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
