"""A real rspamd (Debian's) on loopback with a private configuration: no network, a test rule.

Debian's ``/etc/rspamd/rspamd.conf`` is used as it is, with its variables
pointed at a private directory (``LOCAL_CONFDIR``, ``DBDIR``, ``RUNDIR``,
``LOGDIR``). The private ``local.d`` (see ../shared/COMPONENTS.md):

* the normal worker (the HTTP ``/checkv2`` API) on a free loopback port or a
  Unix socket; the controller is off; the proxy worker in milter mode on a
  free port when ``milter=True`` (rspamd as a milter, for the milter client);
* DNS aimed at a loopback port where nothing listens (the host resolver is not
  on loopback), and every module that fetches maps or asks DNS block lists off;
* actions at rspamd's defaults (greylist 4, add header 6, rewrite subject 8,
  reject 15), milter_headers adding X-Spam-Status and friends for every source;
* a Lua rule, ``EXMTA_TEST_SCORE``: the text ``EXMTA-TEST-SCORE=N`` anywhere in
  the message adds N to the score, so a test picks its verdict; and
  ``EXMTA-TEST-SOFT-REJECT`` forces rspamd's ``soft reject``.

A cold start compiles hyperscan databases for ~10-30 s; the compiled files
are copied to and from ``cache_dir`` (pytest's cache), so later starts take
about a second. Started in its own process group (the main process has
workers): stopped, paused or killed by that group only, bounded waits.
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

RSPAMD = shutil.which("rspamd") or "/usr/bin/rspamd"
SPAM_MARK = "EXMTA-TEST-SCORE={score}"
SOFT_REJECT_MARK = "EXMTA-TEST-SOFT-REJECT"
#: modules that would fetch maps over HTTPS or ask DNS lists: off
OFF = ("rbl", "fuzzy_check", "phishing", "multimap", "whitelist", "mime_types", "mid", "asn", "hfilter",
       "emails", "surbl", "url_redirector", "rspamd_update", "spf", "dmarc", "dkim_signing", "arc",
       "reputation", "neural", "ratelimit", "greylist", "replies", "history_redis", "dcc", "p0f")

RULES = r"""
rspamd_config:register_symbol({
  name = 'EXMTA_TEST_SCORE',
  score = 1.0,
  group = 'exmta',
  description = 'EXMTA-TEST-SCORE=N in the message adds N (exmta tests)',
  callback = function(task)
    local content = tostring(task:get_content())
    local value = string.match(content, 'EXMTA%-TEST%-SCORE=(%-?[%d%.]+)')
    if value then
      task:insert_result('EXMTA_TEST_SCORE', tonumber(value), value)
    end
    if string.find(content, 'EXMTA-TEST-SOFT-REJECT', 1, true) then
      task:set_pre_result('soft reject', 'exmta test soft reject', 'exmta')
    end
  end,
})
"""


def available() -> bool:
    return os.path.exists(RSPAMD)


class Rspamd:
    """One rspamd; ``endpoint`` is the Twisted client endpoint string of its normal worker."""

    def __init__(self, directory: Path, unix: bool = False, milter: bool = False,
                 cache_dir: Path | None = None) -> None:
        self.dir = Path(directory)
        self.unix = unix
        self.milter = milter
        self.cache_dir = Path(cache_dir) if cache_dir else None
        # a Unix socket path must be short (108 octets): its own short directory under /tmp
        self.sockdir = tempfile.mkdtemp(prefix="rspamd", dir="/tmp")
        self.socket = os.path.join(self.sockdir, "normal.sock")
        self.port = 0
        self.milter_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"unix:{self.socket}" if self.unix else f"tcp:127.0.0.1:{self.port}"

    @property
    def milter_endpoint(self) -> str:
        """``inet:127.0.0.1:PORT`` (Postfix's form) of the proxy worker in milter mode."""
        return f"inet:127.0.0.1:{self.milter_port}"

    def _write(self) -> None:
        etc = self.dir / "etc"
        local = etc / "local.d"
        for d in (local, self.dir / "db", self.dir / "run", self.dir / "log"):
            d.mkdir(parents=True, exist_ok=True)
        dead_dns = free_port()  # nothing listens there: every lookup fails at once, nothing leaves the host
        (local / "options.inc").write_text(
            f'dns {{ nameserver = ["127.0.0.1:{dead_dns}"]; timeout = 0.1s; retransmits = 1; }}\n'
            "task_timeout = 20s;\n")
        bind = f'"{self.socket} mode=0666"' if self.unix else f'"127.0.0.1:{self.port}"'
        (local / "worker-normal.inc").write_text(f"bind_socket = {bind};\ncount = 1;\n")
        (local / "worker-controller.inc").write_text("enabled = false;\n")
        if self.milter:
            upstream = self.socket if self.unix else f"127.0.0.1:{self.port}"
            (local / "worker-proxy.inc").write_text(
                f'bind_socket = "127.0.0.1:{self.milter_port}";\nmilter = yes;\ncount = 1;\ntimeout = 120s;\n'
                f'upstream "local" {{ default = yes; self_scan = no; hosts = "{upstream}"; }}\n')
        else:
            (local / "worker-proxy.inc").write_text("enabled = false;\n")
        (local / "actions.conf").write_text("reject = 15;\nadd_header = 6;\nrewrite_subject = 8;\ngreylist = 4;\n")
        (local / "milter_headers.conf").write_text(
            'use = ["x-spamd-bar", "x-spam-level", "x-spam-status", "x-rspamd-queue-id"];\n'
            "skip_local = false;\nskip_authenticated = false;\n")
        for module in OFF:
            (local / f"{module}.conf").write_text("enabled = false;\n")
        (etc / "rspamd.local.lua").write_text(RULES)

    def _copy_cache(self, src: Path, dst: Path) -> None:
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.suffix in (".hs", ".hsmp", ".unser") and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)

    def ping(self) -> bool:
        family = socket.AF_UNIX if self.unix else socket.AF_INET
        address = self.socket if self.unix else ("127.0.0.1", self.port)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(address)
            s.sendall(b"GET /ping HTTP/1.0\r\n\r\n")
            data = b""
            while len(data) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            if b"pong" not in data:
                return False
        if self.milter:
            with socket.create_connection(("127.0.0.1", self.milter_port), timeout=2):
                pass
        return True

    def start(self, deadline: float = 240.0) -> Rspamd:
        for _attempt in range(3):  # a port picked free may be taken by another test meanwhile
            self.port = 0 if self.unix else free_port()
            self.milter_port = free_port() if self.milter else 0
            self._write()
            if self.cache_dir is not None and self.cache_dir.is_dir():
                self._copy_cache(self.cache_dir, self.dir / "db")
            with open(self.dir / "stdout.log", "wb") as out:  # the child keeps its own descriptor
                self.proc = subprocess.Popen(
                        [RSPAMD, "-f", "-i", "-c", "/etc/rspamd/rspamd.conf",
                     f"--var=LOCAL_CONFDIR={self.dir / 'etc'}",
                     f"--var=DBDIR={self.dir / 'db'}", f"--var=RUNDIR={self.dir / 'run'}",
                     f"--var=LOGDIR={self.dir / 'log'}"],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            end = time.monotonic() + deadline
            while time.monotonic() < end and self.proc.poll() is None:
                try:
                    if self.ping():
                        if self.cache_dir is not None:
                            self._copy_cache(self.dir / "db", self.cache_dir)
                        return self
                except OSError:
                    pass
                time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"rspamd did not start: {self.log()[-3000:]}")

    def log(self) -> str:
        text = ""
        for f in (self.dir / "stdout.log", self.dir / "log" / "rspamd.log"):
            if f.exists():
                text += f.read_text(errors="replace")
        return text

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)  # its own group (start_new_session): the main process and workers
            except ProcessLookupError:
                pass

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing answers (a hung scanner)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL to the whole group, as a crash would."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(20)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(20)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.sockdir, ignore_errors=True)
