"""Process helpers for integration tests: start, probe, stop by PID, free ports.

Everything here is bounded: every wait has a deadline, every stop escalates
from SIGTERM to SIGKILL, and only processes started through this module (or
PIDs handed to :func:`stop_pid` explicitly) are ever signalled.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"


class ProcessError(RuntimeError):
    """A managed process failed to start, exited early or would not stop."""


# --------------------------------------------------------------------- ports


def free_port(host: str = LOOPBACK) -> int:
    """Return a port on *host* that was free for TCP and UDP a moment ago."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return *count* distinct ports free for both TCP and UDP (all sockets held until the end).

    UDP matters for the DNS servers the tests start (Knot, unbound): a TCP-free port whose UDP
    twin is held by another process (with SO_REUSEPORT, as unbound and Knot bind) would share
    or lose that server's queries.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(count * 50):  # bounded: a port with a busy UDP twin is skipped
            if len(ports) == count:
                break
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
            port = s.getsockname()[1]
            u = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(u)
            try:
                u.bind((host, port))
            except OSError:
                continue
            ports.append(port)
        if len(ports) < count:
            raise OSError(f"no {count} ports free for both TCP and UDP on {host}")
        return ports
    finally:
        for s in socks:
            s.close()


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            # a port in the ephemeral range with nobody listening can "accept" a TCP self-connect
            # (the kernel picked that very port as our source): that is not a listener
            return s.getsockname() != s.getpeername()
    except OSError:
        return False


# -------------------------------------------------------------------- probes


def _check_alive(proc: subprocess.Popen | None, what: str) -> None:
    if proc is not None and proc.poll() is not None:
        raise ProcessError(f"{what} exited with rc={proc.returncode} before it was ready")


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str = "condition",
    interval: float = 0.02,
    proc: subprocess.Popen | None = None,
) -> None:
    """Poll *predicate* until it is true; raise TimeoutError after *timeout* s.

    Exceptions from *predicate* count as "not yet".  If *proc* exits while
    waiting, raise :class:`ProcessError` at once.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        _check_alive(proc, what)
        try:
            if predicate():
                return
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise TimeoutError(f"{what} not ready after {timeout:.1f} s{detail}")
        time.sleep(interval)


def read_smtp_reply(sock: socket.socket, timeout: float = 10.0) -> tuple[int, list[str]]:
    """Read one (possibly multi-line) SMTP reply; return (code, text lines)."""
    sock.settimeout(timeout)
    lines: list[str] = []
    while True:
        # peek, then consume exactly one line: pipelined replies stay in the socket
        while True:
            peek = sock.recv(4096, socket.MSG_PEEK)
            if not peek:
                raise ConnectionError(f"connection closed in reply after {lines!r}")
            end = peek.find(b"\n")
            if end >= 0:
                break
            if len(peek) >= 4096:
                raise ValueError(f"reply line too long: {peek[:80]!r}")
            time.sleep(0.005)
        line = sock.recv(end + 1)
        text = line.rstrip(b"\r\n").decode("utf-8", "replace")
        if len(text) < 3 or not text[:3].isdigit():
            raise ValueError(f"malformed SMTP reply line {text!r}")
        lines.append(text[4:])
        if len(text) == 3 or text[3] == " ":
            return int(text[:3]), lines


def smtp_banner(host: str, port: int, timeout: float = 5.0) -> tuple[int, list[str]]:
    """Connect, read the greeting, say QUIT; return the greeting."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        reply = read_smtp_reply(s, timeout)
        with contextlib.suppress(OSError):
            s.sendall(b"QUIT\r\n")
            read_smtp_reply(s, timeout)
        return reply


def wait_for_port(
    port: int, host: str = LOOPBACK, timeout: float = 30.0,
    proc: subprocess.Popen | None = None,
) -> None:
    """Wait until host:port accepts a TCP connection."""
    def probe() -> bool:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    wait_until(probe, timeout, f"TCP {host}:{port}", proc=proc)


def wait_for_smtp(
    port: int, host: str = LOOPBACK, timeout: float = 30.0,
    proc: subprocess.Popen | None = None, code: int = 220,
) -> list[str]:
    """Wait until host:port greets with *code* (default 220); return its text."""
    result: list[str] = []

    def probe() -> bool:
        got, text = smtp_banner(host, port, timeout=2.0)
        if got != code:
            raise ValueError(f"greeting {got} {text}")
        result[:] = text
        return True
    wait_until(probe, timeout, f"SMTP {host}:{port}", proc=proc, interval=0.03)
    return result


# ------------------------------------------------------------ stop by PID


def _proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of *pid*, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] == b"Z":
        return None  # a zombie counts as gone
    return int(fields[19])


def descendants(pid: int) -> list[tuple[int, int]]:
    """All live descendants of *pid* as (pid, start_time), found via /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            data = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        ppid = int(data[data.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[tuple[int, int]] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        start = _proc_start_time(child)
        if start is not None:
            out.append((child, start))
        todo.extend(children.get(child, []))
    return out


def process_group(pgid: int) -> list[tuple[int, int]]:
    """Live (non-zombie) members of process group *pgid* as (pid, start_time).

    Unlike descendants(), this still finds a daemon's children after the daemon died and they
    were reparented, and children it forked after a snapshot was taken."""
    out: list[tuple[int, int]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            data = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            out.append((int(entry), int(fields[19])))
    return out


def listeners(port: int) -> list[int]:
    """PIDs holding a TCP socket that listens on *port* (any address), found via /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    pids.append(int(entry))
                    break
            except OSError:
                continue
    return pids


def stop_group(pgid: int, grace: float = 5.0) -> None:
    """Wait for every member of process group *pgid* to exit: *grace* s, then SIGTERM, then SIGKILL."""
    for sig in (0, signal.SIGTERM, signal.SIGKILL):
        members = process_group(pgid)
        for pid, start in members:
            if sig and pid_alive(pid, start):
                _signal(pid, sig)
        if not _wait_gone(members, grace):
            return


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """True if *pid* runs (and, if given, still has that start time)."""
    now = _proc_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(procs: list[tuple[int, int]], seconds: float) -> list[tuple[int, int]]:
    """Wait up to *seconds* for (pid, start) entries to exit; return those alive."""
    deadline = time.monotonic() + seconds
    while True:
        alive = [(p, st) for p, st in procs if pid_alive(p, st)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def stop_pid(
    pid: int, timeout: float = 10.0, sig: int = signal.SIGTERM,
    proc: subprocess.Popen | None = None, kill_descendants: bool = True,
) -> int | None:
    """Stop *pid*: *sig*, wait up to *timeout*, then SIGKILL.

    Descendants recorded before signalling (pid + start time, so a reused PID
    is never hit) that outlive the parent get SIGTERM/SIGKILL too.  Returns
    the exit code when *proc* (the Popen for *pid*) is given.
    """
    kids = descendants(pid) if kill_descendants else []
    start = _proc_start_time(pid)

    def gone() -> bool:
        if proc is not None:
            return proc.poll() is not None
        return not pid_alive(pid, start)

    if not gone():
        _signal(pid, sig)
        deadline = time.monotonic() + timeout
        while not gone() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not gone():
            _signal(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while not gone() and time.monotonic() < deadline:
                time.sleep(0.02)
    # Children usually exit on their own once the parent is gone (Postfix,
    # Dovecot): give them a moment, then SIGTERM, then SIGKILL, and wait, so
    # that their listening sockets are closed when this returns.
    for kid_sig, grace in ((0, 1.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        kids = _wait_gone(kids, 0.0)
        for kid, st in kids:
            if kid_sig and pid_alive(kid, st):
                _signal(kid, kid_sig)
        kids = _wait_gone(kids, grace)
        if not kids:
            break
    if proc is not None:
        try:
            return proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired as exc:
            raise ProcessError(f"PID {pid} did not exit after SIGKILL") from exc
    return None


# ------------------------------------------------------------ managed process


class ManagedProcess:
    """A subprocess with its output in a log file, stopped by its own PID.

    >>> p = ManagedProcess(["sleep", "60"], log_path=tmp / "sleep.log").start()
    >>> p.stop()
    """

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        log_path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stop_signal: int = signal.SIGTERM,
        stop_timeout: float = 10.0,
        name: str | None = None,
    ) -> None:
        self.argv = [os.fspath(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        if log_path is None:
            fd, tmp = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
            os.close(fd)
            log_path = tmp
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        """PID of the running process."""
        if self.proc is None:
            raise ProcessError(f"{self.name} was not started")
        return self.proc.pid

    def start(self) -> "ManagedProcess":
        """Start the process with stdout+stderr appended to the log file."""
        if self.proc is not None:
            raise ProcessError(f"{self.name} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd,
            )
        return self

    def running(self) -> bool:
        """True while the process has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def wait_smtp(self, port: int, host: str = LOOPBACK, timeout: float = 30.0) -> list[str]:
        """Wait for a 220 greeting; on failure include the log tail."""
        try:
            return wait_for_smtp(port, host, timeout, proc=self.proc)
        except (TimeoutError, ProcessError) as exc:
            raise ProcessError(f"{self.name}: {exc}\n--- log tail ---\n{self.log_tail()}") from exc

    def wait_port(self, port: int, host: str = LOOPBACK, timeout: float = 30.0) -> None:
        """Wait until the port accepts; on failure include the log tail."""
        try:
            wait_for_port(port, host, timeout, proc=self.proc)
        except (TimeoutError, ProcessError) as exc:
            raise ProcessError(f"{self.name}: {exc}\n--- log tail ---\n{self.log_tail()}") from exc

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop by PID (stop signal, then SIGKILL); return the exit code."""
        if self.proc is None:
            return None
        if self.returncode is None:
            self.returncode = stop_pid(
                self.proc.pid, self.stop_timeout if timeout is None else timeout,
                sig=self.stop_signal, proc=self.proc,
            )
        return self.returncode

    def log_text(self) -> str:
        """The whole log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last *lines* lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> "ManagedProcess":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running(argv: Sequence[str | os.PathLike[str]], **kw: object) -> Iterator[ManagedProcess]:
    """Context manager: start *argv* as a :class:`ManagedProcess`, stop it after."""
    p = ManagedProcess(argv, **kw)  # type: ignore[arg-type]
    p.start()
    try:
        yield p
    finally:
        p.stop()


# ------------------------------------------------------------------- misc


def make_traversable(
    path: str | os.PathLike[str], stop_at: str | os.PathLike[str] | None = None,
) -> None:
    """Give "others" search (x) permission on *path* and its parents.

    Daemons that drop privileges (Postfix, Dovecot) must traverse the per-test
    directory; pytest makes its base temp dir 0700.  Stops below *stop_at*
    (default: the system temp dir) and only touches directories we own.
    """
    top = Path(stop_at or tempfile.gettempdir()).resolve()
    p = Path(path).resolve()
    uid = os.getuid()
    while p != top and p != p.parent:
        try:
            st = p.stat()
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                p = p.parent
                continue
            raise
        if st.st_uid == uid and not st.st_mode & stat.S_IXOTH:
            p.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXGRP | stat.S_IXOTH)
        if top not in p.parents:
            break
        p = p.parent


def swaks(
    port: int, mail_from: str, to: str | Sequence[str], *extra: str,
    host: str = LOOPBACK, timeout: float = 60.0, check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Send one message with swaks (``--server host:port``); return the result.

    *extra* are further swaks arguments, e.g. ``"--header", "Subject: x"``,
    ``"--body", "text"``, ``"--protocol", "LMTP"``, ``"-tls"``.
    """
    rcpts = ",".join([to] if isinstance(to, str) else list(to))
    argv = ["swaks", "--server", f"{host}:{port}", "--from", mail_from, "--to", rcpts,
            "--helo", "swaks.example.test", "--timeout", str(int(timeout)), *extra]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10,
                       stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise ProcessError(f"swaks rc={r.returncode}\n{r.stdout}\n{r.stderr}")
    return r
