"""One assembly for every process: receive workers get the main process's filters and limits, and SIGHUP.

A real ``twistd exmta`` with ``receive_workers``: its TCP listener is served
only by the worker processes, a ``unix:`` listener of the same connector only
by the main process. A test filter plugin (installed for the test through a
``.dist-info`` entry point on PYTHONPATH) refuses ``blocked@`` and names the
process that refused, so each reply says which process served it.
"""
from __future__ import annotations

import os
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support import procs
from support.exmta_proc import REPO_ROOT, ExmtaProcess, exmta_toml

pytestmark = pytest.mark.integration

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy

PLUGIN = '''
import os

from zope.interface import implementer, provider

from exmta.filters.base import FilterBase
from exmta.interfaces import IFilterFactory, IMessageFilter
from exmta.model import Verdict


@implementer(IMessageFilter)
@provider(IFilterFactory)
class RefuseBlocked(FilterBase):
    def __init__(self, name):
        self.name = name

    @classmethod
    def from_config(cls, name, config, env):
        return cls(name)

    def on_rcpt(self, session, txn, rcpt, params):
        if str(rcpt).lower().startswith("blocked@"):
            return Verdict.reject(550, "5.7.1", f"refused by {self.name} in pid {os.getpid()}")
        return Verdict.CONTINUE
'''

FILTER = '\n[filters.refuse]\nplugin = "refusetest"\n'
LISTEN_TCP = 'listen = ["tcp:{port}:interface=127.0.0.1"]'
LISTEN_BOTH = 'listen = ["tcp:{port}:interface=127.0.0.1", "unix:{workdir}/main.sock"]'


def _install_plugin(root: Path) -> str:
    """A test filter plugin ``refusetest`` (entry point group exmta.filters) under ``root``; -> PYTHONPATH."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "refusetest.py").write_text(PLUGIN)
    info = root / "refusetest-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: refusetest\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[exmta.filters]\nrefusetest = refusetest:RefuseBlocked\n")
    return os.pathsep.join([str(REPO_ROOT), str(root), *filter(None, [os.environ.get("PYTHONPATH")])])


def _config(workers: int, *, filtered: bool, size: str) -> str:
    toml = exmta_toml(receive_workers=workers,
                      receive_extra=f'max_message_size = "{size}"\n'
                                    + ('filters = ["refuse"]\n' if filtered else ""),
                      extra=('[metrics]\nlisten = "tcp:{mport}:interface=127.0.0.1"\n'
                             + (FILTER if filtered else "")))
    assert LISTEN_TCP in toml
    return toml.replace(LISTEN_TCP, LISTEN_BOTH)


def _lines(sock: socket.socket, buf: bytearray) -> bytes:
    """One complete SMTP reply (all its lines)."""
    start = 0
    while True:
        end = buf.find(b"\r\n", start)
        if end < 0:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
            continue
        line = bytes(buf[start:end])
        start = end + 2
        if len(line) < 4 or line[3:4] != b"-":
            reply = bytes(buf[:start])
            del buf[:start]
            return reply


def _probe(family: int, address: object) -> tuple[str, bytes]:
    """EHLO, MAIL, RCPT blocked@: -> (the SIZE the EHLO offered, the RCPT reply)."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(address)
        buf = bytearray()
        replies = []
        _lines(sock, buf)  # banner
        for command in (b"EHLO client.test", b"MAIL FROM:<a@example.test>", b"RCPT TO:<blocked@example.test>",
                        b"QUIT"):
            sock.sendall(command + b"\r\n")
            replies.append(_lines(sock, buf))
    size = next(line.split()[1].decode() for line in replies[0].split(b"\r\n") if line[4:].startswith(b"SIZE"))
    return size, replies[2]


def _via_workers(exmta: ExmtaProcess) -> tuple[str, bytes]:
    return _probe(socket.AF_INET, ("127.0.0.1", exmta.port))


def _via_main(exmta: ExmtaProcess) -> tuple[str, bytes]:
    return _probe(socket.AF_UNIX, str(exmta.workdir / "main.sock"))


def _readyz(mport: int) -> tuple[int, str]:
    try:
        with _OPENER.open(f"http://127.0.0.1:{mport}/readyz", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return 0, str(e)


def _start(tmp_path: Path, workers: int, mport: int) -> ExmtaProcess:
    path = _install_plugin(tmp_path / "plugins")
    exmta = ExmtaProcess(tmp_path / "run", _config(workers, filtered=True, size="1MiB"), subst={"mport": mport},
                         env={"PYTHONPATH": path}).start()
    procs.wait_until(lambda: "SIGHUP reloads" in exmta.log_text(), timeout=20, what="the SIGHUP handler")
    procs.wait_until(lambda: _readyz(mport)[0] == 200, timeout=30, what="/readyz 200 (workers ready)", interval=0.1)
    return exmta


def _worker_pids(exmta: ExmtaProcess) -> set[int]:
    return {pid for pid, _ in procs.descendants(exmta.pid)}


def _refused_by(reply: bytes) -> int:
    assert reply.startswith(b"550"), reply
    return int(reply.rsplit(b"pid ", 1)[1].split()[0])


def _sighup(exmta: ExmtaProcess, done: str, count: int) -> None:
    exmta.process.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    procs.wait_until(lambda: exmta.log_text().count(done) >= count, timeout=30, what=f"{count}x {done!r} in the log")


def test_workers_and_main_get_the_same_filters_and_limits_and_the_same_after_sighup(tmp_path: Path) -> None:
    mport = procs.free_port()
    exmta = _start(tmp_path, 2, mport)
    try:
        workers = _worker_pids(exmta)
        assert len(workers) == 2
        # one config, the same filters and limits in every process
        size, reply = _via_main(exmta)
        assert size == str(1024 * 1024) and _refused_by(reply) == exmta.pid
        served = set()
        for _ in range(6):
            size, reply = _via_workers(exmta)
            assert size == str(1024 * 1024)
            served.add(_refused_by(reply))
        assert served and served <= workers, (served, workers)

        # SIGHUP: the filter removed, the size limit changed; every process applies it
        assert exmta.config_path is not None
        exmta.config_path.write_text(exmta.render_toml().replace(FILTER, "").replace('filters = ["refuse"]\n', "")
                                     .replace('max_message_size = "1MiB"', 'max_message_size = "2MiB"'))
        _sighup(exmta, "reloaded (", 3)  # the main process and both workers
        log = exmta.log_text()
        assert "asked the 2 receive worker process(es) to apply the same file" in log
        for name in ("receive worker 0", "receive worker 1", "the main process"):
            assert f"in {name}" in log, name
        assert log.count("receive.default: policy, filters and limits applied") == 3
        size, reply = _via_main(exmta)
        assert size == str(2 * 1024 * 1024) and reply.startswith(b"250"), reply
        for _ in range(6):
            size, reply = _via_workers(exmta)
            assert size == str(2 * 1024 * 1024) and reply.startswith(b"250"), reply
        assert _worker_pids(exmta) == workers  # applied in place, no worker restarted
        assert exmta.error_lines() == []
    finally:
        exmta.stop()


def test_a_reload_with_a_broken_plugin_changes_nothing_in_any_process(tmp_path: Path) -> None:
    mport = procs.free_port()
    exmta = _start(tmp_path, 1, mport)
    try:
        workers = _worker_pids(exmta)
        good = exmta.render_toml()
        # a valid file apart from a plugin typo, with a size and a route change that must not apply either
        assert exmta.config_path is not None
        exmta.config_path.write_text(good.replace('plugin = "refusetest"', 'plugin = "refusetst"')
                                     .replace('max_message_size = "1MiB"', 'max_message_size = "2MiB"')
                                     .replace('retry_schedule = ["1s"]', 'retry_schedule = ["2s"]'))
        _sighup(exmta, "nothing changed", 1)
        log = exmta.log_text()
        assert "refusetst" in log and "refused in the main process" in log
        assert "reloaded (" not in log and "queue settings applied" not in log
        assert "asked the" not in log  # the workers were not asked
        size, reply = _via_main(exmta)
        assert size == str(1024 * 1024) and _refused_by(reply) == exmta.pid
        size, reply = _via_workers(exmta)
        assert size == str(1024 * 1024) and _refused_by(reply) in workers
        # the good file again: applied everywhere
        exmta.config_path.write_text(good.replace('max_message_size = "1MiB"', 'max_message_size = "3MiB"'))
        _sighup(exmta, "reloaded (", 2)
        assert _via_main(exmta)[0] == _via_workers(exmta)[0] == str(3 * 1024 * 1024)
    finally:
        exmta.stop()


def test_readyz_fails_while_a_receive_worker_is_dead(tmp_path: Path) -> None:
    mport = procs.free_port()
    exmta = _start(tmp_path, 1, mport)
    try:
        status, body = _readyz(mport)
        assert status == 200 and "receive workers: 1 of 1" in body, body
        (worker,) = _worker_pids(exmta)
        # without its file a restarted worker cannot start: the pool stays short of a worker
        assert exmta.config_path is not None
        aside = exmta.config_path.with_suffix(".aside")
        exmta.config_path.rename(aside)
        os.kill(worker, signal.SIGKILL)
        procs.wait_until(lambda: _readyz(mport)[0] == 503, timeout=30, what="/readyz 503", interval=0.1)
        status, body = _readyz(mport)
        assert status == 503 and "FAIL receive workers: 0 of 1" in body, body
        aside.rename(exmta.config_path)
        procs.wait_until(lambda: _readyz(mport)[0] == 200, timeout=30, what="/readyz 200 again", interval=0.1)
        assert worker not in _worker_pids(exmta)
    finally:
        exmta.stop()
