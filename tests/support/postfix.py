"""A private Postfix instance under a test directory, on free loopback ports.

The instance has its own config_directory, queue_directory, data_directory
and log file; the system /etc/postfix is never read or changed.  Postfix
does no DNS (``smtp_dns_support_level = disabled``, literal ``[127.0.0.1]``
next hops, ``smtpd_peername_lookup = no``).

Two roles:

* **next hop / server** for exmta: smtpd on ``127.0.0.1:port`` relays every
  message from 127.0.0.0/8 to ``relayhost`` (e.g. an aiosmtpd sink) and/or
  delivers the ``maildir_domains`` to Maildirs (Postfix virtual(8), owned by
  the postfix user): ``ROOT/mail/<domain>/<local>/`` for each address in
  ``maildir_users``, ``ROOT/mail/<domain>/_all/`` for every other recipient
  of those domains (:meth:`PostfixInstance.maildir_messages` picks a
  recipient's messages out by ``Delivered-To``);
* **client** of exmta: ``relayhost = [127.0.0.1]:<exmta port>``; inject with
  :meth:`PostfixInstance.send` and watch :meth:`PostfixInstance.queue` drain.

The master daemon runs in the foreground as our child and is stopped by PID
(SIGTERM; master terminates its own children).
"""
from __future__ import annotations

import functools
import grp
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from email.message import EmailMessage
from pathlib import Path

from .procs import LOOPBACK, ManagedProcess, free_port, make_traversable, stop_group, wait_until

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"


def available() -> bool:
    """True if the Postfix binaries are installed."""
    return os.path.exists(POSTFIX) and os.path.exists(POSTCONF)


@functools.lru_cache(maxsize=None)
def _postconf_default(name: str) -> str:
    return subprocess.run(
        [POSTCONF, "-d", "-h", name], check=True, capture_output=True, text=True, timeout=30,
    ).stdout.strip()


def _user_ids(user: str) -> tuple[int, int]:
    import pwd
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


#: queue sub-directory, owned by postfix?, group postdrop?, mode
QUEUE_DIRS = [
    *((name, True, False, 0o700) for name in (
        "active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming",
        "private", "saved", "trace")),
    ("maildrop", True, True, 0o730),
    ("public", True, True, 0o710),
    ("pid", False, False, 0o755),
]

MASTER_CF_SERVICES = """\
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
tlsmgr     unix  -       -       n       1000?   1       tlsmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
local      unix  -       n       n       -       -       local
virtual    unix  -       n       n       -       -       virtual
lmtp       unix  -       -       n       -       -       lmtp
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""


class PostfixInstance:
    """One private Postfix: ``write_config()`` + ``start()`` ... ``stop()``.

    Args:
        root: directory that will hold etc/, queue/, data/, log/, mail/.
        port: smtpd port on 127.0.0.1 (default: a free port).
        relayhost: next hop for everything not delivered here, e.g.
            ``"[127.0.0.1]:2525"``; None = no relay (mail to other domains
            is deferred).
        maildir_domains: domains delivered to Maildirs under ``root/mail/``.
        maildir_users: addresses (in those domains) with their own Maildir
            ``root/mail/<domain>/<local>/``; the others share ``<domain>/_all/``.
        routes: per-domain next hops (``{"example.net": "[127.0.0.1]:2600"}``,
            or with a transport: ``"lmtp:inet:127.0.0.1:2400"``), written as an
            inline transport map.
        main_cf: extra main.cf settings (override the defaults).
        hostname: myhostname (the 220 greeting and Received header).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        port: int | None = None,
        relayhost: str | None = None,
        maildir_domains: Sequence[str] = (),
        maildir_users: Sequence[str] = (),
        routes: Mapping[str, str] | None = None,
        main_cf: Mapping[str, str] | None = None,
        hostname: str = "postfix.example.test",
        smtpd_maxproc: int = 100,
    ) -> None:
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self.relayhost = relayhost
        self.maildir_domains = [d.lower() for d in maildir_domains]
        self.maildir_users = [a.lower() for a in maildir_users]
        for addr in self.maildir_users:
            if addr.rsplit("@", 1)[-1] not in self.maildir_domains:
                raise ValueError(f"{addr} is not in maildir_domains")
        self.routes = dict(routes or {})
        self.extra = dict(main_cf or {})
        self.hostname = hostname
        self.smtpd_maxproc = smtpd_maxproc
        self.etc = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.log_dir = self.root / "log"
        self.mail_dir = self.root / "mail"
        self.maillog = self.log_dir / "maillog"
        self.process: ManagedProcess | None = None

    # ------------------------------------------------------------- config
    def main_cf_settings(self) -> dict[str, str]:
        """Every main.cf parameter this instance sets."""
        daemon_dir = _postconf_default("daemon_directory")
        s: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "daemon_directory": daemon_dir,
            "meta_directory": _postconf_default("meta_directory"),
            "shlib_directory": _postconf_default("shlib_directory"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.log_dir}",
            "syslog_name": f"postfix-{self.port}",
            "myhostname": self.hostname,
            "mydomain": "example.test",
            "myorigin": "$myhostname",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "local_transport": "error:5.1.1 local delivery disabled",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": "",
            "relayhost": self.relayhost or "",
            "relay_domains": "",
            # no DNS at all: the host resolver is off-machine
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "biff": "no",
            # fast, bounded retries in tests
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "5s",
            "smtpd_error_sleep_time": "0",
            "in_flow_delay": "0",
            "delay_warning_time": "0",
        }
        if self.maildir_domains:
            uid, gid = _user_ids("postfix")
            # user@domain first, then the @domain catch-all (no regexp: virtual(8)
            # refuses $1 substitutions); the trailing slash selects Maildir
            entries = [f"{a}={a.split('@')[1]}/{a.split('@')[0]}/" for a in self.maildir_users]
            entries += [f"@{d}={d}/_all/" for d in self.maildir_domains]
            s.update({
                "virtual_mailbox_domains": ", ".join(self.maildir_domains),
                "virtual_mailbox_base": str(self.mail_dir),
                "virtual_mailbox_maps": "inline:{ " + ", ".join(entries) + " }",
                "virtual_minimum_uid": str(min(uid, 100)),
                "virtual_uid_maps": f"static:{uid}",
                "virtual_gid_maps": f"static:{gid}",
            })
        if self.routes:
            entries = ", ".join(
                f"{dom}={hop if hop.startswith(('smtp:', 'lmtp:', 'error:')) else 'smtp:' + hop}"
                for dom, hop in self.routes.items())
            s["transport_maps"] = f"inline:{{ {entries} }}"
        s.update(self.extra)
        return s

    def write_config(self) -> None:
        """Create the directory tree and write main.cf / master.cf."""
        for d in (self.etc, self.queue_dir, self.data_dir, self.log_dir, self.mail_dir):
            d.mkdir(parents=True, exist_ok=True)
        make_traversable(self.root)
        uid, gid = _user_ids("postfix")
        for d in (self.data_dir, self.mail_dir):
            os.chown(d, uid, gid)
        main = "".join(f"{k} = {v}\n" for k, v in self.main_cf_settings().items())
        (self.etc / "main.cf").write_text("# private test instance, generated\n" + main)
        smtpd = f"{LOOPBACK}:{self.port} inet n - n - {self.smtpd_maxproc} smtpd\n"
        (self.etc / "master.cf").write_text(smtpd + MASTER_CF_SERVICES)
        # Postfix waits (in 0.3 s steps, ~2 s) while a config file looks
        # freshly edited; backdating the files lets master start in ~15 ms.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.etc / name, (past, past))

    def create_queue(self) -> None:
        """Create the queue sub-directories as ``postfix check`` would (it takes 2 s)."""
        uid, _ = _user_ids("postfix")
        postdrop = grp.getgrnam("postdrop").gr_gid
        for name, owner, group, mode in QUEUE_DIRS:
            d = self.queue_dir / name
            d.mkdir(exist_ok=True)
            os.chown(d, uid if owner else 0, postdrop if group else 0)
            d.chmod(mode)

    def postfix_cmd(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        """Run ``postfix -c ETC ARGS``; return stdout+stderr."""
        r = subprocess.run(
            [POSTFIX, "-c", str(self.etc), *args], capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )
        if check and r.returncode:
            raise RuntimeError(f"postfix {' '.join(args)} rc={r.returncode}: {r.stdout}{r.stderr}")
        return r.stdout + r.stderr

    # --------------------------------------------------------- lifecycle
    def start(self, timeout: float = 30.0) -> "PostfixInstance":
        """Write the config if needed, create the queue, start master, wait for 220."""
        if not (self.etc / "main.cf").exists():
            self.write_config()
        self.create_queue()
        master = Path(_postconf_default("daemon_directory")) / "master"
        self.process = ManagedProcess(
            [master, "-s", "-c", self.etc], log_path=self.log_dir / "master.out",
            name=f"postfix-master:{self.port}", stop_signal=signal.SIGTERM, stop_timeout=15.0,
        ).start()
        try:
            self.process.wait_smtp(self.port, timeout=timeout)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n--- maillog ---\n{self.log_text()[-3000:]}") from exc
        return self

    @property
    def pid(self) -> int:
        """PID of the master daemon."""
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM the master by PID (it stops its children), SIGKILL if needed, and wait until
        every process of the instance is gone, so that its port is free when this returns.

        The master is a session leader and every daemon it forks stays in its process group, also
        one forked after any snapshot of its children and one already reparented; waiting only
        for the children seen before the stop left an smtpd holding the port now and then."""
        if self.process is not None:
            master = self.process.pid
            self.process.stop()
            stop_group(master)

    def __enter__(self) -> "PostfixInstance":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------- using it
    def send(
        self,
        mail_from: str,
        rcpt_tos: Iterable[str],
        msg: EmailMessage | bytes | str,
        ehlo: str = "client.example.test",
        timeout: float = 30.0,
    ) -> dict[str, tuple[int, bytes]]:
        """Submit one message to this instance's smtpd; return refused recipients."""
        with smtplib.SMTP(LOOPBACK, self.port, local_hostname=ehlo, timeout=timeout) as smtp:
            if isinstance(msg, EmailMessage):
                return smtp.send_message(msg, mail_from, list(rcpt_tos))
            return smtp.sendmail(mail_from, list(rcpt_tos), msg)

    def queue(self) -> list[dict]:
        """Messages in the queue (``postqueue -j``), one dict each."""
        r = subprocess.run(
            ["postqueue", "-c", str(self.etc), "-j"], capture_output=True, text=True,
            timeout=30, check=True,
        )
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def flush(self) -> None:
        """Ask the queue manager to retry deferred mail now (``postqueue -f``)."""
        subprocess.run(["postqueue", "-c", str(self.etc), "-f"], capture_output=True,
                       timeout=30, check=True)

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        """Wait until every message has left the queue."""
        wait_until(lambda: not self.queue(), timeout, f"postfix:{self.port} queue empty",
                   interval=0.2)

    def log_text(self) -> str:
        """The instance's maillog (written by postlogd) so far."""
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Wait until *pattern* (a regex) appears in the maillog; return the match."""
        found: list[re.Match[str]] = []

        def probe() -> bool:
            m = re.search(pattern, self.log_text(), re.MULTILINE)
            if m:
                found.append(m)
            return m is not None
        wait_until(probe, timeout, f"maillog /{pattern}/", interval=0.1)
        return found[0]

    def maildir(self, address: str) -> Path:
        """The Maildir that receives *address* (own or the domain's ``_all``)."""
        addr = address.lower()
        local, domain = addr.rsplit("@", 1)
        if addr in self.maildir_users:
            return self.mail_dir / domain / local
        return self.mail_dir / domain / "_all"

    def maildir_messages(self, address: str) -> list[bytes]:
        """Contents of the messages delivered to *address*, oldest first."""
        addr = address.lower()
        new = self.maildir(addr) / "new"
        files = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime, p.name)) \
            if new.is_dir() else []
        out = [p.read_bytes() for p in files]
        if addr not in self.maildir_users:
            out = [m for m in out if addr in _delivered_to(m)]
        return out

    def wait_maildir(self, address: str, count: int = 1, timeout: float = 30.0) -> list[bytes]:
        """Wait until *address* has *count* messages; return them."""
        wait_until(lambda: len(self.maildir_messages(address)) >= count, timeout,
                   f"{count} message(s) for {address}", interval=0.1)
        return self.maildir_messages(address)


def _delivered_to(message: bytes) -> set[str]:
    """The Delivered-To addresses in *message*'s header block (lower case)."""
    head = message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    return {line.split(b":", 1)[1].strip().decode("utf-8", "replace").lower()
            for line in head.split(b"\n") if line.lower().startswith(b"delivered-to:")}


def wait_deliveries(instance: PostfixInstance, count: int, timeout: float = 30.0) -> None:
    """Wait until the maillog shows *count* ``status=sent`` deliveries."""
    wait_until(lambda: instance.log_text().count("status=sent") >= count, timeout,
               f"{count} deliveries by postfix:{instance.port}", interval=0.1)

