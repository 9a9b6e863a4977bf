"""Issue 11 item 8: what a pickup directory writer can put there must not stall the server or leak files.

Against a running ``twistd -n exmta``: a FIFO (it froze the reactor thread in
``open``), symbolic links to ``admin.token`` (its text ended up in a log
line) and ``/dev/zero`` (memory grew without bound), a hard link to the
token and a name with terminal escapes. The server keeps answering, the good
file is delivered, the others are set aside as ``.bad`` and the log holds
neither the token nor a raw escape character. Unit tests below check
:func:`read_pickup_file` alone.
"""
from __future__ import annotations

import os
import smtplib
from pathlib import Path

import pytest

from exmta.queue.pickup import PickupError, read_pickup_file
from support import procs
from support.exmta_proc import ExmtaProcess, exmta_toml

GOOD = b"From: alice@example.test\r\nTo: bob@example.test\r\nSubject: picked up\r\n\r\nhello\r\n"


@pytest.mark.integration
def test_pickup_writer_cannot_stall_or_read_through_the_server(tmp_path: Path) -> None:
    extra = 'pickup_interval = "0.2s"\n[admin]\nlisten = ["tcp:{admin_port}:interface=127.0.0.1"]\n'
    ex = ExmtaProcess(tmp_path / "ex", toml=exmta_toml(extra=extra), subst={"admin_port": procs.free_port()})
    ex.start()
    try:
        token_file = ex.data_dir / "admin.token"
        procs.wait_until(token_file.exists, 20, "the admin token")
        token = token_file.read_text().strip()
        pickup = ex.data_dir / "pickup"
        staging = ex.data_dir / "staging"
        staging.mkdir()
        os.mkfifo(staging / "a.eml")
        os.symlink(token_file, staging / "b.eml")
        os.symlink("/dev/zero", staging / "c.eml")
        os.link(token_file, staging / "d.eml")
        (staging / "\x1b[2Jevil.eml").write_bytes(b"not a header\r\n\r\n")
        (staging / "z.eml").write_bytes(GOOD)
        for p in sorted(staging.iterdir()):
            os.rename(p, pickup / p.name)  # all appear at once, the FIFO first in name order

        maildir = ex.data_dir / "mail" / "example.test" / "bob" / "new"
        procs.wait_until(lambda: maildir.is_dir() and any(maildir.iterdir()), 30, "the good pickup file delivered")
        code, _ = procs.smtp_banner(procs.LOOPBACK, ex.port, timeout=10)  # the reactor is not stuck
        assert code == 220
        with smtplib.SMTP(procs.LOOPBACK, ex.port, timeout=10) as c:
            assert c.noop()[0] == 250
        procs.wait_until(lambda: sum(1 for p in pickup.iterdir() if p.name.endswith(".bad")) == 5, 20,
                         "every bad file set aside")
        assert sorted(p.name for p in pickup.iterdir()) == sorted(
            ["a.bad", "b.bad", "c.bad", "d.bad", "\x1b[2Jevil.bad"])
        assert token_file.read_text().strip() == token  # the hard link was renamed, not the token
        log = ex.log_text()
        assert token not in log
        assert "\x1b" not in log and "\\x1b[2Jevil.eml" in log
        assert "a symbolic link" in log and "not a regular file" in log and "hard links" in log
    finally:
        ex.stop()


def test_read_pickup_file_refuses_links_and_special_files(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"token")
    os.symlink(secret, tmp_path / "link.eml")
    os.mkfifo(tmp_path / "fifo.eml")
    os.link(secret, tmp_path / "hard.eml")
    (tmp_path / "dir.eml").mkdir()
    for name, why in (("link.eml", "symbolic link"), ("fifo.eml", "not a regular file"),
                      ("hard.eml", "hard links"), ("dir.eml", "not a regular file")):
        with pytest.raises(PickupError, match=why):
            read_pickup_file(str(tmp_path / name), 1000)
    (tmp_path / "ok.eml").write_bytes(b"x" * 1000)
    assert read_pickup_file(str(tmp_path / "ok.eml"), 1000) == b"x" * 1000
    with pytest.raises(PickupError, match="larger than 999"):
        read_pickup_file(str(tmp_path / "ok.eml"), 999)
