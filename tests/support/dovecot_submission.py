"""A private Dovecot submission server that checks XOAUTH2 tokens by introspection and relays to a sink.

As ../shared/COMPONENTS.md section 7 found: ``passdb oauth2`` asks the token
endpoint's introspection URL whether a token is active, and matches its
``email`` claim against the XOAUTH2 ``user=``; ``ssl = required`` with a test
certificate gives STARTTLS.  Dovecot counts loopback as secure and would take
AUTH before STARTTLS, so the tests check on the wire that exmta never does.
Accepted mail goes to ``relay_port`` (an aiosmtpd sink).  Runs in the
foreground as our child, stopped by PID.
"""
from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

from .dovecot import DOVECOT
from .procs import LOOPBACK, ManagedProcess, free_port, make_traversable

SUBMISSION_BINARY = "/usr/lib/dovecot/submission"


def available() -> bool:
    return os.path.exists(DOVECOT) and os.path.exists(SUBMISSION_BINARY)


CONF = """\
# private test instance, generated
base_dir = {base_dir}
state_dir = {state_dir}
instance_name = exmta-sub-{port}
log_path = {log}
info_log_path = {log}
protocols = submission
listen = {host}
hostname = {hostname}
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = yes
auth_mechanisms = xoauth2 oauthbearer
auth_verbose = yes
auth_failure_delay = 0
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {uid}
last_valid_uid = 0
submission_relay_host = {host}
submission_relay_port = {relay_port}
submission_relay_trusted = yes
mail_location = maildir:~/Maildir
service submission-login {{
  inet_listener submission {{
    address = {host}
    port = {port}
  }}
}}
service anvil {{
  chroot =
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {oauth2_conf}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={home}/%u
}}
"""

OAUTH2 = """\
introspection_mode = post
introspection_url = {introspection_url}
username_attribute = email
active_attribute = active
active_value = true
scope = https://outlook.office365.com/.default
"""


class DovecotSubmission:
    """``start()`` ... ``stop()``; ``log_text()`` has the auth results."""

    def __init__(self, root: str | Path, cert: Path, key: Path, introspection_url: str, relay_port: int,
                 hostname: str = "submission.example.test", port: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.cert, self.key = cert, key
        self.introspection_url = introspection_url
        self.relay_port = relay_port
        self.hostname = hostname
        self.port = port or free_port()
        self.host = LOOPBACK
        self.log_path = self.root / "dovecot.log"
        self._base_dir: Path | None = None
        self.process: ManagedProcess | None = None

    def start(self, timeout: float = 30.0) -> "DovecotSubmission":
        nobody = pwd.getpwnam("nobody")
        home = self.root / "home"
        for d in (self.root, self.root / "state", home):
            d.mkdir(parents=True, exist_ok=True)
        make_traversable(self.root)
        home.chmod(0o1777)
        self._base_dir = Path(tempfile.mkdtemp(prefix="dvs-"))
        self._base_dir.chmod(0o755)
        oauth2_conf = self.root / "dovecot-oauth2.conf.ext"
        oauth2_conf.write_text(OAUTH2.format(introspection_url=self.introspection_url))
        conf = self.root / "dovecot.conf"
        conf.write_text(CONF.format(
            base_dir=self._base_dir, state_dir=self.root / "state", port=self.port, log=self.log_path,
            host=self.host, hostname=self.hostname, cert=self.cert, key=self.key, uid=nobody.pw_uid,
            relay_port=self.relay_port, oauth2_conf=oauth2_conf, home=home,
        ))
        self.process = ManagedProcess([DOVECOT, "-F", "-c", conf], log_path=self.root / "dovecot.out",
                                      name=f"dovecot-submission:{self.port}", stop_timeout=15.0).start()
        try:
            self.process.wait_smtp(self.port, timeout=timeout)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n--- dovecot.log ---\n{self.log_text()[-3000:]}") from exc
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
        if self._base_dir is not None:
            shutil.rmtree(self._base_dir, ignore_errors=True)
            self._base_dir = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "DovecotSubmission":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
