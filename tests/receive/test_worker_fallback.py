"""A receive worker that cannot be started (twistd --uid to a user that may not run the interpreter): the main
process accepts on the shared sockets itself instead of leaving them unserved."""
from __future__ import annotations

import socket
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from exmta.receive.workers import ListenSpec, WorkerPool


class Reactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.adopted: list[tuple[int, int, Any]] = []

    def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", "/root/venv/bin/python")

    def adoptStreamPort(self, fd: int, family: int, factory: Any) -> Any:
        self.adopted.append((fd, family, factory))

        class Port:
            stopped = False

            def stopListening(self) -> None:
                Port.stopped = True
        return Port()


def test_the_main_process_accepts_itself_when_no_worker_can_start() -> None:
    reactor = Reactor()
    spec = ListenSpec("0", "tcp:0:interface=127.0.0.1", socket.AF_INET, "127.0.0.1", 0, 5, False)
    sock = socket.socket()
    factory = object()
    pool = WorkerPool(reactor, 2, [(spec, sock)], [], lambda q: None, serve_here=lambda s: factory)
    with capturedLogs() as events:
        pool.startService()
    assert reactor.adopted == [(sock.fileno(), socket.AF_INET, factory)]  # once, not once per worker
    errors = [e for e in events if e["log_level"] is LogLevel.error]
    assert len(errors) == 2 and "cannot be started" in errors[0]["log_format"]
    ready, detail = pool.readiness()
    assert ready and detail.endswith("the main process accepts SMTP itself")
    pool.stopService()
    assert sock.fileno() == -1
