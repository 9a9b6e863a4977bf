"""A real clamd (Debian's clamav-daemon) on a Unix socket or loopback TCP, with a hand-made database.

The database has two body signatures: EICAR (the string is built from two
halves, so no file in the tree holds it) and a custom marker. No freshclam,
no network. Started with Popen, probed with zPING, stopped by its own PID.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from support.procs import free_port

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
CUSTOM = b"exmta custom malware marker 7f3a9c"
CLAMD = shutil.which("clamd") or "/usr/sbin/clamd"


def available() -> bool:
    return os.path.exists(CLAMD)


class Clamd:
    """One clamd; ``endpoint`` is the Twisted client endpoint string for it."""

    def __init__(self, directory: Path, tcp: bool = False, stream_max: str = "1M") -> None:
        self.dir = directory
        # a Unix socket path must be short (108 octets): its own short directory under /tmp
        self.sockdir = tempfile.mkdtemp(prefix="clamd", dir="/tmp")
        self.socket = os.path.join(self.sockdir, "clamd.sock")
        self.tcp = tcp
        self.stream_max = stream_max
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port}" if self.tcp else f"unix:{self.socket}"

    def _write(self) -> Path:
        db = self.dir / "db"
        db.mkdir(exist_ok=True)
        (db / "exmta.ndb").write_text(f"Exmta.Test.EICAR:0:*:{EICAR.hex()}\nExmta.Test.Custom:0:*:{CUSTOM.hex()}\n")
        listen = f"TCPSocket {self.port}\nTCPAddr 127.0.0.1\n" if self.tcp else f"LocalSocket {self.socket}\n"
        conf = self.dir / "clamd.conf"
        conf.write_text(f"Foreground yes\n{listen}DatabaseDirectory {db}\nPidFile {self.dir}/clamd.pid\n"
                        f"LogFile {self.dir}/clamd.log\nLogTime yes\nStreamMaxLength {self.stream_max}\n"
                        "MaxThreads 4\n")
        return conf

    def probe(self) -> bool:
        family = socket.AF_INET if self.tcp else socket.AF_UNIX
        address = ("127.0.0.1", self.port) if self.tcp else self.socket
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(address)
            s.sendall(b"zPING\0")
            return s.recv(16).startswith(b"PONG")

    def start(self, deadline: float = 60.0) -> Clamd:
        for _attempt in range(3):  # a TCP port picked free may be taken by another test meanwhile
            if self.tcp:
                self.port = free_port()
            conf = self._write()
            self.proc = subprocess.Popen([CLAMD, f"--config-file={conf}"], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            end = time.monotonic() + deadline
            while time.monotonic() < end and self.proc.poll() is None:
                try:
                    if self.probe():
                        return self
                except OSError:
                    pass
                time.sleep(0.02)
            self.stop()
        raise RuntimeError(f"clamd did not start: {(self.dir / 'clamd.log').read_text(errors='replace')[-2000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(20)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.sockdir, ignore_errors=True)
