"""Start exmta as a real process: ``twistd -n exmta (-c FILE.toml | --data DIR)``.

The contract (from the lead's service wiring):

* ``twistd -n exmta --data DIR``: embedded default config, receive connector
  on 127.0.0.1:2525, local domains ``example.test`` and ``localhost``
  delivered to Maildir under ``DIR/mail/<domain>/<local>/``;
* ``twistd -n exmta -c FILE.toml``: everything from the file.

:class:`ExmtaProcess` writes the TOML (``{port}``, ``{workdir}``,
``{data_dir}`` and any ``subst`` keys are replaced; TOML's own braces are
left alone), starts twistd with the same interpreter as the tests and the
repository first on PYTHONPATH (so ``twisted/plugins/exmta_plugin.py`` and
``exmta`` come from this tree whatever the install mode), waits for the 220
banner, and stops it with SIGTERM by PID.  Its log is ``log_text()``.
"""
from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .procs import LOOPBACK, ManagedProcess, ProcessError, free_port, port_in_use

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_PORT = 2525
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; "
          "sys.argv[0] = 'twistd'; run()"]


def clean_exit(code: int | None) -> bool:
    """True for the exit codes of a clean ``twistd`` stop on SIGTERM."""
    return code in (0, -signal.SIGTERM)


def exmta_toml(
    *,
    hostname: str = "mx.example.test",
    local_domains: Sequence[str] = ("example.test",),
    relay_networks: Sequence[str] = ("127.0.0.0/8",),
    smarthost: str | None = None,
    lmtp: str | None = None,
    lmtp_domains: Sequence[str] = (),
    retry: str = "1s",
    receive_workers: int | None = 0,
    receive_extra: str = "",
    extra: str = "",
) -> str:
    """A TOML config for tests, with ``{port}`` / ``{data_dir}`` placeholders.

    Listens on 127.0.0.1:{port}; *local_domains* are authoritative and go to
    Maildir under ``{data_dir}/mail/``; *lmtp_domains* (internal relay) go to
    the LMTP server *lmtp* (``"127.0.0.1:PORT"``); everything else goes to
    *smarthost* (``"[127.0.0.1]:PORT"``) if given.  *receive_extra* is added
    to ``[receive.default]``, *extra* at the end.
    """
    q = lambda xs: "[" + ", ".join(f'"{x}"' for x in xs) + "]"  # noqa: E731
    out = [
        "[server]",
        f'hostname = "{hostname}"',
        'data_dir = "{data_dir}"',
        *([f"receive_workers = {receive_workers}"] if receive_workers is not None else []),
        "",
        "[accepted_domains]",
        *[f'"{d}" = "authoritative"' for d in local_domains],
        *[f'"{d}" = "internal_relay"' for d in lmtp_domains],
        "",
        "[receive.default]",
        'listen = ["tcp:{port}:interface=127.0.0.1"]',
        f"relay_networks = {q(relay_networks)}",
        receive_extra,
        "",
        "[send.local]",
        'type = "maildir"',
        'root = "mail"',
        "",
    ]
    if smarthost:
        out += ["[send.relay]", 'type = "smtp"', f"smarthosts = {q([smarthost])}",
                'tls = "none"', 'connect_timeout = "5s"', ""]
    if lmtp:
        out += ["[send.lmtp]", 'type = "lmtp"', f'lmtp = "{lmtp}"', ""]
    out += ["[[route]]", f"domains = {q(local_domains)}", 'connector = "local"', ""]
    if lmtp and lmtp_domains:
        out += ["[[route]]", f"domains = {q(lmtp_domains)}", 'connector = "lmtp"', ""]
    if smarthost:
        out += ["[[route]]", 'domains = ["*"]', 'connector = "relay"', ""]
    out += ["[queue]", f'retry_schedule = ["{retry}"]', "", extra]
    return "\n".join(out) + "\n"


class ExmtaProcess:
    """One ``twistd -n exmta`` subprocess.

    Args:
        workdir: directory for the TOML file, twistd's pid file and the log.
        toml: config text (placeholders ``{port}``, ``{workdir}``,
            ``{data_dir}``, plus ``subst``).
        data_dir: with ``toml``: the value of ``{data_dir}`` (default
            ``workdir/data``; give the same one to a second process to restart
            on the same queue); without: run ``--data DIR`` (embedded default
            config, port 2525).
        port: the port to wait on (default: a free port for ``toml``, 2525
            for ``data_dir``).
        subst: extra placeholder values for the TOML text.
        extra_args: more arguments after ``exmta``.
        env: extra environment variables.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        toml: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        subst: Mapping[str, object] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ) -> None:
        if toml is None and data_dir is None:
            raise ValueError("give toml= (data_dir= optional) or data_dir= alone")
        self.workdir = Path(workdir).resolve()
        self.data_dir = Path(data_dir).resolve() if data_dir is not None else self.workdir / "data"
        self.port = port or (DEFAULT_DATA_PORT if toml is None else free_port())
        self.host = LOOPBACK
        self.toml_template = toml
        self.subst = dict(subst or {})
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.config_path: Path | None = None
        self.log_path = self.workdir / "exmta.log"
        self.process: ManagedProcess | None = None
        self.banner: list[str] = []

    def render_toml(self) -> str:
        """The TOML text with the placeholders filled in."""
        assert self.toml_template is not None
        values = {"port": self.port, "workdir": self.workdir, "data_dir": self.data_dir,
                  **self.subst}
        return re.sub(
            r"\{(\w+)\}",
            lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0),
            self.toml_template,
        )

    def argv(self) -> list[str]:
        """The command line (twistd with the tests' interpreter)."""
        argv = [*TWISTD, "-n", "--pidfile", str(self.workdir / "twistd.pid"), "exmta"]
        if self.toml_template is not None:
            assert self.config_path is not None
            argv += ["-c", str(self.config_path)]
        else:
            argv += ["--data", str(self.data_dir)]
        return argv + self.extra_args

    def start(self) -> "ExmtaProcess":
        """Write the config, start twistd, wait for the 220 banner on the port."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.toml_template is not None:
            self.config_path = self.workdir / "exmta.toml"
            text = self.render_toml()
            if not re.search(r"^\s*\[admin\]", text, re.M):
                # the admin API's default port (8025) is one for the whole machine: every test
                # server would compete for it and an `exmta queue` could reach another test's server
                text += f'\n[admin]\nlisten = ["tcp:{free_port()}:interface=127.0.0.1"]\n'
            self.config_path.write_text(text)
        if port_in_use(self.port, self.host):
            raise ProcessError(f"127.0.0.1:{self.port} is already in use; not starting exmta")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
        env.update(self.env)
        self.process = ManagedProcess(
            self.argv(), log_path=self.log_path, env=env, cwd=self.workdir,
            stop_signal=signal.SIGTERM, stop_timeout=self.stop_timeout, name=f"exmta:{self.port}",
        ).start()
        try:
            self.banner = self.process.wait_smtp(self.port, self.host, timeout=self.start_timeout)
        except ProcessError:
            self.process.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        """PID of the twistd process."""
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        """True while twistd has not exited."""
        return self.process is not None and self.process.running()

    def stop(self) -> int | None:
        """SIGTERM by PID (SIGKILL after stop_timeout); return the exit code.

        A clean twistd shutdown on SIGTERM ends with 0 or -SIGTERM (twistd
        re-raises the signal it stopped on); see :func:`clean_exit`.
        """
        return self.process.stop() if self.process is not None else None

    def log_text(self) -> str:
        """twistd's log (stdout and stderr) so far."""
        return self.process.log_text() if self.process is not None else ""

    def error_lines(self) -> list[str]:
        """Log lines that report an unhandled error or a traceback."""
        keys = ("Traceback (most recent call last)", "Unhandled Error", "Unhandled error")
        return [line for line in self.log_text().splitlines() if any(k in line for k in keys)]

    def maildir(self, address: str) -> Path:
        """``DATA/mail/<domain>/<local>/`` (the --data contract)."""
        local, domain = address.rsplit("@", 1)
        return self.data_dir / "mail" / domain.lower() / local

    def maildir_messages(self, address: str) -> list[bytes]:
        """Messages in *address*'s Maildir (new/ and cur/), oldest first."""
        md = self.maildir(address)
        files = [p for sub in ("new", "cur") if (md / sub).is_dir() for p in (md / sub).iterdir()]
        files.sort(key=lambda p: (p.stat().st_mtime, p.name))
        return [p.read_bytes() for p in files]

    def __enter__(self) -> "ExmtaProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
