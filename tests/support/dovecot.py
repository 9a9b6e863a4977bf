"""A private Dovecot delivering over LMTP (127.0.0.1:free port) into Maildirs.

Users come from a passwd-file; mail goes to ``ROOT/mail/<domain>/<local>/``
(Maildir, owned by ``nobody``).  The config is self-contained (the system
/etc/dovecot is not read), Dovecot runs in the foreground (``dovecot -F``) as
our child and is stopped by PID.
"""
from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from .procs import LOOPBACK, ManagedProcess, free_port, make_traversable, wait_until

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
LMTP_BINARY = "/usr/lib/dovecot/lmtp"


def available() -> bool:
    """True if dovecot-core and dovecot-lmtpd are installed."""
    return os.path.exists(DOVECOT) and os.path.exists(LMTP_BINARY)


CONF_TEMPLATE = """\
# private test instance, generated
base_dir = {base_dir}
state_dir = {state_dir}
instance_name = exmta-test-{port}
log_path = {log}
info_log_path = {log}
debug_log_path = {log}
protocols = lmtp
listen = {host}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
auth_failure_delay = 0
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {uid}
last_valid_uid = 0
mail_location = maildir:{mail}/%d/%n
mail_fsync = always
lmtp_rcpt_check_quota = no
recipient_delimiter =
postmaster_address = postmaster@example.test
hostname = lmtp.example.test
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
}}
service lmtp {{
  inet_listener lmtp {{
    address = {host}
    port = {port}
  }}
}}
service anvil {{
  chroot =
}}
"""


class DovecotLmtp:
    """One private Dovecot LMTP server: ``start()`` ... ``stop()``.

    Args:
        root: directory for the config, log and ``mail/``.
        users: addresses that exist (others get ``550 5.1.1``).
        port: LMTP port on 127.0.0.1 (default: a free one).
    """

    def __init__(
        self, root: str | os.PathLike[str], users: Sequence[str] = ("alice@example.net",),
        port: int | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.users = [u.lower() for u in users]
        self.port = port or free_port()
        self.host = LOOPBACK
        self.conf = self.root / "dovecot.conf"
        self.log_path = self.root / "dovecot.log"
        self.mail_dir = self.root / "mail"
        self.passwd = self.root / "passwd"
        # unix sockets live in base_dir: keep its path short (sun_path is 108 bytes)
        self._base_dir: Path | None = None
        self.process: ManagedProcess | None = None

    def write_config(self) -> None:
        """Write dovecot.conf, the passwd-file and the mail directory."""
        nobody = pwd.getpwnam("nobody")
        for d in (self.root, self.mail_dir, self.root / "state"):
            d.mkdir(parents=True, exist_ok=True)
        make_traversable(self.root)
        os.chown(self.mail_dir, nobody.pw_uid, nobody.pw_gid)
        self._base_dir = Path(tempfile.mkdtemp(prefix="dv-"))
        self._base_dir.chmod(0o755)
        lines = [f"{u}::{nobody.pw_uid}:{nobody.pw_gid}::{self.maildir(u)}::" for u in self.users]
        self.passwd.write_text("\n".join(lines) + "\n")
        self.conf.write_text(CONF_TEMPLATE.format(
            base_dir=self._base_dir, state_dir=self.root / "state", log=self.log_path,
            host=self.host, port=self.port, uid=nobody.pw_uid, mail=self.mail_dir,
            passwd=self.passwd,
        ))

    def start(self, timeout: float = 30.0) -> "DovecotLmtp":
        """Write the config, start ``dovecot -F``, wait for the LMTP 220."""
        self.write_config()
        self.process = ManagedProcess(
            [DOVECOT, "-F", "-c", self.conf], log_path=self.root / "dovecot.out",
            name=f"dovecot:{self.port}", stop_timeout=15.0,
        ).start()
        try:
            self.process.wait_smtp(self.port, timeout=timeout)
            self._wait_userdb(timeout)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n--- dovecot.log ---\n{self.log_text()[-3000:]}") from exc
        return self

    def _wait_userdb(self, timeout: float) -> None:
        """Wait until RCPT for a known user gets 250 (auth/userdb answers).

        The LMTP banner comes before Dovecot's auth process is ready; under
        load an early RCPT gets ``451 4.3.0 Temporary internal error``.
        """
        if not self.users:
            return

        def rcpt_ok() -> bool:
            with smtplib.LMTP(self.host, self.port, local_hostname="probe.example.test",
                              timeout=5) as lmtp:
                lmtp.ehlo_or_helo_if_needed()
                lmtp.mail("")
                code, text = lmtp.rcpt(self.users[0])
                lmtp.rset()
                if code != 250:
                    raise RuntimeError(f"RCPT {self.users[0]}: {code} {text!r}")
                return True
        wait_until(rcpt_ok, timeout, f"dovecot:{self.port} userdb", interval=0.1,
                   proc=self.process.proc if self.process else None)

    @property
    def pid(self) -> int:
        """PID of the dovecot master."""
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM the dovecot master by PID (SIGKILL after 15 s)."""
        if self.process is not None:
            self.process.stop()
        if self._base_dir is not None:
            shutil.rmtree(self._base_dir, ignore_errors=True)
            self._base_dir = None

    def __enter__(self) -> "DovecotLmtp":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def next_hop(self) -> str:
        """``[127.0.0.1]:PORT``."""
        return f"[{self.host}]:{self.port}"

    def send(self, mail_from: str, rcpt_tos: Iterable[str], msg: bytes | str,
             timeout: float = 30.0) -> dict[str, tuple[int, bytes]]:
        """Deliver one message over LMTP; return refused recipients."""
        with smtplib.LMTP(self.host, self.port, local_hostname="client.example.test",
                          timeout=timeout) as lmtp:
            return lmtp.sendmail(mail_from, list(rcpt_tos), msg)

    def maildir(self, address: str) -> Path:
        """The Maildir of *address*."""
        local, domain = address.lower().rsplit("@", 1)
        return self.mail_dir / domain / local

    def maildir_messages(self, address: str) -> list[bytes]:
        """Messages in *address*'s ``new/`` and ``cur/``, oldest first."""
        md = self.maildir(address)
        files = [p for sub in ("new", "cur") if (md / sub).is_dir() for p in (md / sub).iterdir()]
        files.sort(key=lambda p: (p.stat().st_mtime, p.name))
        return [p.read_bytes() for p in files]

    def wait_maildir(self, address: str, count: int = 1, timeout: float = 30.0) -> list[bytes]:
        """Wait until *address* has *count* messages; return them."""
        wait_until(lambda: len(self.maildir_messages(address)) >= count, timeout,
                   f"{count} message(s) for {address} in Dovecot", interval=0.05)
        return self.maildir_messages(address)

    def log_text(self) -> str:
        """dovecot.log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
