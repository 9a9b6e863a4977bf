"""Receive worker processes: SMTP acceptance on more than one core.

One Twisted reactor runs on one core. With ``receive_workers = N`` (by
default "auto": one per CPU) the main process binds every listening socket
itself (so port 25 is bound before twistd drops root), then starts N worker
processes that inherit those sockets and accept SMTP on them, committing
into the same spool directory.
The main process keeps the scheduler and delivery. A worker tells the main
process about each committed message by writing its queue id on a line to
its stdout; the spool's own scan of incoming/ is the safety net for a lost
line. A worker that dies is started again after a short pause.

A worker writes ``!ready`` on its stdout once it accepts connections:
:meth:`WorkerPool.readiness` (a ``/readyz`` check) passes only while every
worker has, and :meth:`WorkerPool.reload` sends SIGHUP to each ready worker
(a worker still starting gets it once ready) after the main process has
applied a new configuration file (exmta.observe.reload).

A line starting with ``?`` asks the main process to check and count a
connection or rate limit for the whole node (exmta.receive.noderates); the
answer goes to the worker's stdin.

Only ``tcp:``, ``tcp6:`` and ``haproxy:tcp:`` endpoints can be shared this way;
other endpoints stay in the main process.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger

log = Logger()


@dataclass(frozen=True)
class ListenSpec:
    """A parsed endpoint string that workers can share."""

    connector: str          # the listener's index in exmta.receive.wiring.make_dispatchers
    endpoint: str
    family: int
    host: str
    port: int
    backlog: int
    haproxy: bool


def parse_shareable(connector: str, endpoint: str) -> ListenSpec | None:
    """The socket parameters of ``endpoint``, or None when it cannot be shared."""
    desc = endpoint
    haproxy = False
    if desc.startswith("haproxy:"):
        haproxy, desc = True, desc[len("haproxy:"):]
    kind = desc.split(":", 1)[0]
    if kind not in ("tcp", "tcp6"):
        return None
    args, kwargs = endpoints._parse(desc)  # Twisted's own parser for endpoint strings
    if len(args) < 2:
        return None
    port = int(args[1])
    family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
    host = kwargs.get("interface", "::" if family == socket.AF_INET6 else "0.0.0.0")
    return ListenSpec(connector, endpoint, family, host, port, int(kwargs.get("backlog", 511)), haproxy)


def bind_socket(spec: ListenSpec) -> socket.socket:
    """A listening, non-blocking, inheritable socket for ``spec``."""
    sock = socket.socket(spec.family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if spec.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((spec.host, spec.port))
    sock.listen(spec.backlog)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


class _WorkerProtocol(protocol.ProcessProtocol):
    """Reads committed queue ids from a worker's stdout and relays its log."""

    def __init__(self, owner: WorkerPool, index: int) -> None:
        self.owner = owner
        self.index = index
        self.buffer = b""
        self.err_buffer = b""
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        answers = []
        for line in lines:
            if line.startswith(b"{"):  # a metrics event (exmta.observe.worker_metrics)
                self.owner.on_event(line)
                continue
            if line.startswith(b"?"):  # a rate check (exmta.receive.noderates): answered on the worker's stdin
                if self.owner.node is not None:
                    answers.append(self.owner.node.answer(line[1:], self.index))
                continue
            if line.startswith(b"!"):  # a state line (exmta.receive.worker.READY_LINE)
                if line.strip() == b"!ready":
                    self.owner.worker_ready(self)
                continue
            queue_id = line.strip().decode("ascii", "replace")
            if queue_id:
                self.owner.on_committed(queue_id)
        if answers and self.transport is not None:
            self.transport.writeToChild(0, b"".join(answers))

    def errReceived(self, data: bytes) -> None:
        *lines, self.err_buffer = (self.err_buffer + data).split(b"\n")  # a line may span two reads
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if line.strip():
                # the format is the finished text (braces escaped): observers do not parse fields again
                text = f"worker[{self.index}] {line}".replace("{", "{{").replace("}", "}}")
                log.info(text, index=self.index, line=line)

    def processExited(self, reason: Any) -> None:
        # nothing reads the worker's stdin any more: close our end. Seen: once the rate and session answers
        # had been written to it, Twisted no longer watched it for the worker's close, and the stop waited
        # for processEnded until killed
        if self.transport is not None:
            self.transport.closeStdin()

    def processEnded(self, reason: Any) -> None:
        self.owner.ended(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """Starts, watches and stops the receive worker processes."""

    restart_delay = 1.0
    stop_deadline = 20.0

    def __init__(self, reactor: Any, count: int, sockets: list[tuple[ListenSpec, socket.socket | None]],
                 worker_args: list[str], on_committed: Callable[[str], None],
                 on_event: Callable[[bytes], None] | None = None, node: Any = None,
                 serve_here: Callable[[ListenSpec], Any] | None = None) -> None:
        self.reactor = reactor
        self.count = count
        #: (spec, socket); a None socket is bound at privilegedStartService (before twistd drops root), as
        #: Twisted's own listeners are: building the service graph (a check, a test, a reload) binds nothing
        self.sockets = sockets
        self.worker_args = worker_args
        self.on_committed = on_committed
        self.on_event = on_event or (lambda line: None)
        self.node = node  # exmta.receive.noderates.NodeRates: answers the workers' limit checks
        #: the protocol factory of a shared socket, for the main process to accept on it itself when a
        #: worker cannot be started at all (e.g. twistd --uid to a user that may not run the interpreter)
        self.serve_here = serve_here
        self.local_ports: list[Any] = []
        self.procs: dict[int, tuple[Any, _WorkerProtocol]] = {}
        self.ready: set[int] = set()          # workers that said they accept connections
        self.reload_pending: set[int] = set()  # started before a reload, not ready yet: signalled when ready
        self.stopping = False

    def _spawn(self, index: int) -> None:
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        fd_args = []
        for n, (spec, sock) in enumerate(self._bound()):
            child_fd = 3 + n
            child_fds[child_fd] = sock.fileno()
            fd_args.append(f"{child_fd}={spec.connector}={spec.family}={int(spec.haproxy)}")
        args = [sys.executable, "-m", "exmta.receive.worker", *self.worker_args, "--fds", ",".join(fd_args),
                "--index", str(index)]
        proto = _WorkerProtocol(self, index)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            transport = self.reactor.spawnProcess(proto, sys.executable, args, env=env, childFDs=child_fds)
        except OSError as e:
            self._accept_here(index, e)
            return
        self.procs[index] = (transport, proto)
        log.info("exmta: receive worker {index} started, pid {pid}", index=index, pid=transport.pid)

    def privilegedStartService(self) -> None:
        self.sockets = [(spec, sock if sock is not None else bind_socket(spec)) for spec, sock in self.sockets]
        super().privilegedStartService()

    def _bound(self) -> list[tuple[ListenSpec, socket.socket]]:
        if any(sock is None for _spec, sock in self.sockets):
            self.privilegedStartService()  # started without the privileged step (e.g. a test)
        return [(spec, sock) for spec, sock in self.sockets if sock is not None]

    def startService(self) -> None:
        self._bound()
        super().startService()
        for i in range(self.count):
            self._spawn(i)

    def _accept_here(self, index: int, error: OSError) -> None:
        """A worker cannot be started: the main process accepts on the shared sockets itself (once)."""
        log.error("exmta: receive worker {index} cannot be started ({error}); the main process accepts SMTP "
                  "itself. Let the service user run {python}, or set receive_workers = 0",
                  index=index, error=str(error), python=sys.executable)
        if self.serve_here is None or self.local_ports:
            return
        for spec, sock in self._bound():
            self.local_ports.append(self.reactor.adoptStreamPort(sock.fileno(), spec.family, self.serve_here(spec)))

    def worker_ready(self, proto: _WorkerProtocol) -> None:
        if self.procs.get(proto.index, (None, None))[1] is not proto:
            return
        self.ready.add(proto.index)
        if proto.index in self.reload_pending:
            self.reload_pending.discard(proto.index)
            self._signal(proto.index, "HUP")

    def reload(self) -> int:
        """Ask every worker to apply the configuration file again (SIGHUP); -> how many were asked.

        A worker that is still starting gets the signal once it is ready (it
        may have read the file before it changed).
        """
        asked = 0
        if self.stopping:
            return asked
        for index in list(self.procs):
            if index in self.ready:
                self._signal(index, "HUP")
            else:
                self.reload_pending.add(index)
            asked += 1
        return asked

    def _signal(self, index: int, name: str) -> None:
        entry = self.procs.get(index)
        if entry is None:
            return
        try:
            entry[0].signalProcess(name)
        except Exception:  # it has just ended: its replacement reads the file anew
            pass

    def readiness(self) -> tuple[bool, str]:
        """The /readyz check (exmta.observe.health): every worker process runs and accepts connections."""
        ready = len(self.ready)
        if self.stopping:
            return False, "stopping"
        detail = f"{ready} of {self.count} receive worker process(es) running and ready"
        if self.local_ports:  # degraded but accepting: the error is in the log
            return True, detail + "; the main process accepts SMTP itself"
        return ready >= self.count, detail

    def ended(self, proto: _WorkerProtocol, reason: Any) -> None:
        if self.procs.get(proto.index, (None, None))[1] is proto:
            if self.node is not None:
                self.node.worker_ended(proto.index)  # its sessions are gone with it
            self.procs.pop(proto.index, None)
            self.ready.discard(proto.index)
            self.reload_pending.discard(proto.index)
        if not self.stopping:
            log.warn("exmta: receive worker {index} ended ({reason}); starting it again",
                     index=proto.index, reason=reason.getErrorMessage())
            self.reactor.callLater(self.restart_delay, self._respawn, proto.index)

    def _respawn(self, index: int) -> None:
        if not self.stopping and index not in self.procs:
            self._spawn(index)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self.stopping = True
        waits = []
        for transport, proto in list(self.procs.values()):
            try:
                transport.signalProcess("TERM")
            except Exception:
                pass
            d = proto.ended
            d.addTimeout(self.stop_deadline, self.reactor, onTimeoutCancel=lambda *_a, t=transport: _kill(t))
            waits.append(d)
        for port in self.local_ports:
            waits.append(defer.maybeDeferred(port.stopListening))
        for _spec, sock in self.sockets:
            if sock is not None:
                sock.close()
        return defer.DeferredList(waits, consumeErrors=True)


def _kill(transport: Any) -> None:
    try:
        transport.signalProcess("KILL")
    except Exception:
        pass
