"""etc/exmta.service and docs/security.rst's "Running without root", checked as written.

* The unit: parsed (every ``ExecStart`` word), ``systemd-analyze verify``
  where systemd is installed (scripts/deps-systemd.sh), and its
  ``ExecStart`` run with ``--check`` against etc/exmta.toml: twistd and the
  exmta plugin accept that command line.
* The documented ``twistd --uid/--gid`` command, run as root in a network
  namespace of its own (so that port 25 is free and nothing else is
  touched): it binds port 25, becomes ``nobody``, and accepts and delivers
  mail as that user.
"""
from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support import procs
from support.exmta_proc import REPO_ROOT

UNIT = REPO_ROOT / "etc" / "exmta.service"
DOC = REPO_ROOT / "docs" / "security.rst"
TWISTD = str(Path(sys.executable).parent / "twistd")


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=True, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def exec_start(parser: configparser.RawConfigParser, data: Path, config: Path) -> list[str]:
    argv = shlex.split(parser["Service"]["ExecStart"])
    assert argv[0] == "/opt/exmta/.venv/bin/twistd"
    return [TWISTD] + [{"/etc/exmta/exmta.toml": str(config), "/var/lib/exmta": str(data)}.get(a, a)
                       for a in argv[1:]]


def test_unit_runs_twistd_unprivileged_with_one_capability(tmp_path: Path) -> None:
    parser = unit()
    service = parser["Service"]
    assert service["User"] == "exmta" and service["Group"] == "exmta"
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE" == service["CapabilityBoundingSet"]
    assert service["NoNewPrivileges"] == "yes" and service["UMask"] == "0027"
    assert service["StateDirectory"] == "exmta" and service["ReadWritePaths"] == "/var/lib/exmta"
    assert parser["Install"]["WantedBy"] == "multi-user.target"

    argv = exec_start(parser, tmp_path / "data", REPO_ROOT / "etc" / "exmta.toml")
    assert "--nodaemon" in argv and "exmta" in argv
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    checked = subprocess.run(argv + ["--check"], capture_output=True, text=True, timeout=120, env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "configuration OK" in checked.stdout

    analyze = shutil.which("systemd-analyze")
    if analyze:  # the real parser too (scripts/deps-systemd.sh installs it)
        copy = tmp_path / "exmta.service"
        copy.write_text(UNIT.read_text().replace("/opt/exmta/.venv/bin/twistd", TWISTD))
        verified = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True,
                                  timeout=120)
        assert verified.returncode == 0 and verified.stderr.strip() == "", verified.stderr


def documented_twistd() -> list[str]:
    line = next(x.strip() for x in DOC.read_text().splitlines() if x.strip().startswith("twistd --nodaemon --uid"))
    return shlex.split(line)


RUN_IN_NAMESPACE = textwrap.dedent('''
    import os, smtplib, socket, subprocess, sys, time
    argv, log = sys.argv[1:], open(os.environ["EXMTA_LOG"], "wb")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", 25), timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    sys.exit("exmta did not listen on port 25")
                time.sleep(0.1)
        with smtplib.SMTP("127.0.0.1", 25, timeout=30) as c:
            c.sendmail("alice@example.test", ["bob@example.test"], b"Subject: unprivileged\\r\\n\\r\\nhi\\r\\n")
        uids = [x for x in open(f"/proc/{proc.pid}/status") if x.startswith(("Uid:", "Gid:"))]
        print("".join(uids), end="")
        new = os.environ["EXMTA_MAILDIR"]
        while not (os.path.isdir(new) and os.listdir(new)):
            if time.monotonic() > deadline:
                sys.exit("not delivered")
            time.sleep(0.1)
        print("delivered")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
''')


@pytest.mark.integration
def test_documented_uid_gid_binds_port_25_then_runs_as_nobody(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "run the tests as root, as scripts/install-test-deps.sh does"
    base = tmp_path / "unpriv"
    base.mkdir()
    procs.make_traversable(base)
    data = base / "data"  # does not exist yet: created by root, handed over to nobody
    config = base / "exmta.toml"
    config.write_text(textwrap.dedent(f'''
        [server]
        hostname = "mx.example.test"
        data_dir = "{data}"
        [accepted_domains]
        "example.test" = "authoritative"
        [receive.default]
        listen = ["tcp:25:interface=127.0.0.1"]
        [send.local]
        type = "maildir"
        root = "mail"
        [[route]]
        domains = ["example.test"]
        connector = "local"
        [admin]
        enabled = false
    '''))
    argv = documented_twistd()
    assert argv[:2] == ["twistd", "--nodaemon"] and "--uid" in argv and "--gid" in argv
    argv = [{"twistd": TWISTD, "exmta": "exmta", "/etc/exmta/exmta.toml": str(config)}.get(a, a) for a in argv]
    argv[argv.index("--uid") + 1] = "nobody"
    argv[argv.index("--gid") + 1] = "nogroup"
    script = base / "run.py"
    script.write_text(RUN_IN_NAMESPACE)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), EXMTA_LOG=str(base / "exmta.log"),
               EXMTA_MAILDIR=str(data / "mail" / "example.test" / "bob" / "new"))
    done = subprocess.run(["unshare", "--net", sys.executable, str(script), *argv], capture_output=True, text=True,
                          timeout=180, env=env)
    log = (base / "exmta.log").read_text(errors="replace")
    assert done.returncode == 0, done.stdout + done.stderr + log[-3000:]
    nobody = str(int(subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True).stdout))
    uid_line = next(x for x in done.stdout.splitlines() if x.startswith("Uid:"))
    assert uid_line.split()[1:] == [nobody] * 4  # real, effective, saved, filesystem: no way back to root
    assert "delivered" in done.stdout
    mail = next((data / "mail" / "example.test" / "bob" / "new").iterdir())
    assert mail.stat().st_uid == int(nobody) and (mail.stat().st_mode & 0o077) == 0
    assert "Traceback" not in log
