"""Real milters from Debian on loopback: OpenDKIM (signing) and clamav-milter (in front of a test clamd).

Both are started with their own config written under the test's directory,
run in the foreground, are probed by connecting to their TCP port, and are
stopped by PID (opendkim with SIGINT: SIGTERM takes 5 s).
"""
from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

from support.procs import ManagedProcess, free_port

OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"
OPENDKIM_GENKEY = shutil.which("opendkim-genkey") or "/usr/sbin/opendkim-genkey"
CLAMAV_MILTER = shutil.which("clamav-milter") or "/usr/sbin/clamav-milter"


def opendkim_available() -> bool:
    return Path(OPENDKIM).exists() and Path(OPENDKIM_GENKEY).exists()


def clamav_milter_available() -> bool:
    return Path(CLAMAV_MILTER).exists()


class OpenDKIM:
    """An OpenDKIM signer for ``domain`` with selector ``selector``; ``record`` is the key's TXT text."""

    def __init__(self, directory: Path, domain: str = "example.test", selector: str = "sel1") -> None:
        self.dir = Path(directory).resolve()
        self.domain = domain
        self.selector = selector
        self.port = 0
        self.process: ManagedProcess | None = None

    @property
    def socket(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def keygen(self) -> str:
        keys = self.dir / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        subprocess.run([OPENDKIM_GENKEY, "-D", str(keys), "-d", self.domain, "-s", self.selector, "-b", "2048"],
                       check=True, timeout=60)
        return (keys / f"{self.selector}.txt").read_text()

    def start(self) -> OpenDKIM:
        record = self.keygen()
        # the TXT record as one string (opendkim-genkey writes it split in BIND's parentheses)
        self.txt = "".join(part for part in record.split('"')[1::2])
        (self.dir / "testdns.txt").write_text(f"{self.selector}._domainkey.{self.domain} {self.txt}\n")
        for _attempt in range(3):
            self.port = free_port()
            conf = self.dir / "opendkim.conf"
            conf.write_text(
                f"Mode s\nSyslog no\nDomain {self.domain}\nSelector {self.selector}\n"
                f"KeyFile {self.dir}/keys/{self.selector}.private\nCanonicalization relaxed/relaxed\n"
                f"SignatureAlgorithm rsa-sha256\nSocket inet:{self.port}@127.0.0.1\n"
                f"PidFile {self.dir}/opendkim.pid\nTestDNSData file:{self.dir}/testdns.txt\n"
                "RequireSafeKeys no\nUMask 002\n")
            self.process = ManagedProcess([OPENDKIM, "-f", "-x", str(conf)], log_path=self.dir / "opendkim.log",
                                          name="opendkim", stop_signal=signal.SIGINT, stop_timeout=10).start()
            try:
                self.process.wait_port(self.port, timeout=30)
                return self
            except Exception:
                self.process.stop()
        raise RuntimeError(f"opendkim did not start: {self.process.log_tail() if self.process else ''}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class ClamavMilter:
    """clamav-milter on loopback TCP in front of the clamd at ``clamd_socket`` ("unix:/path")."""

    def __init__(self, directory: Path, clamd_socket: str, on_infected: str = "Reject") -> None:
        self.dir = Path(directory).resolve()
        self.clamd_socket = clamd_socket
        self.on_infected = on_infected
        self.port = 0
        self.process: ManagedProcess | None = None

    @property
    def socket(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def start(self) -> ClamavMilter:
        for _attempt in range(3):
            self.port = free_port()
            conf = self.dir / "clamav-milter.conf"
            conf.write_text(
                f"MilterSocket inet:{self.port}@127.0.0.1\nForeground yes\nPidFile {self.dir}/clamav-milter.pid\n"
                f"ClamdSocket {self.clamd_socket}\nOnClean Accept\nOnInfected {self.on_infected}\nOnFail Defer\n"
                "AddHeader Replace\nLogSyslog false\nLogVerbose true\nLogInfected Basic\n"
                f"LogFile {self.dir}/clamav-milter.log\nTemporaryDirectory {self.dir}\nMaxFileSize 25M\n"
                "ReadTimeout 60\n")
            self.process = ManagedProcess([CLAMAV_MILTER, f"--config-file={conf}"],
                                          log_path=self.dir / "clamav-milter.out", name="clamav-milter",
                                          stop_timeout=10).start()
            try:
                self.process.wait_port(self.port, timeout=30)
                return self
            except Exception:
                self.process.stop()
        raise RuntimeError("clamav-milter did not start: "
                           f"{(self.dir / 'clamav-milter.log').read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
