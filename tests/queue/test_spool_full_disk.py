"""Issue 10 item 8: on a real, full tmpfs a writer that cannot write leaves no temp file behind."""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from exmta.model import Envelope, Recipient
from exmta.queue.spool import SpoolStore
from support.sync import SyncPool, SyncReactor, failure

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (the tests run as root; a failure to mount is a failure, not a skip)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], check=True, timeout=10)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True, timeout=10)


def tmp_files(store: SpoolStore) -> list[str]:
    return sorted(os.listdir(os.path.join(store.root, "tmp")))


@pytest.mark.parametrize("io_mode", ["inline", "threads"])
def test_writer_that_fills_the_disk_is_unlinked_on_abort(tiny_fs: Path, io_mode: str) -> None:
    store = SpoolStore(str(tiny_fs / "spool"), SyncReactor(), SyncPool(), Clock(), io=io_mode)
    writer = store.open_writer()
    chunk = b"x" * 998 + b"\r\n"
    with pytest.raises(OSError) as e:
        for _ in range(4 * MiB // len(chunk)):  # four times the file system
            writer.write(chunk)
    assert e.value.errno == 28  # ENOSPC
    assert tmp_files(store)  # the partial file is there...
    writer.abort()
    assert tmp_files(store) == []  # ...and gone after abort, though its buffer could not be flushed
    writer.abort()  # harmless when repeated
    # the space is back: a normal message fits again
    again = store.open_writer()
    again.write(b"Subject: s\r\n\r\nb\r\n")
    again.abort()
    assert tmp_files(store) == []
    print(f"\nissue10 item 8 ({io_mode}): temp files left after abort on a full 1 MiB tmpfs: "
          f"{len(tmp_files(store))}")


def test_commit_on_a_full_disk_leaves_no_temp_file(tiny_fs: Path) -> None:
    clock = Clock()
    store = SpoolStore(str(tiny_fs / "spool"), SyncReactor(), SyncPool(), clock, io="inline")
    ballast = tiny_fs / "ballast"
    free = os.statvfs(tiny_fs)
    ballast.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 16 * KiB))
    writer = store.open_writer()
    writer.write(b"Subject: s\r\n\r\n" + b"y" * (12 * KiB) + b"\r\n")  # buffered: fits in memory
    env = Envelope("a@x.test", [Recipient("b@y.test")])
    # the content fits (or not); the envelope or the flush fails: either way nothing stays in tmp/
    filler = tiny_fs / "filler"
    free = os.statvfs(tiny_fs)
    filler.write_bytes(b"\0" * max(0, free.f_bavail * free.f_frsize))
    d = store.commit(writer, env)
    clock.advance(0)  # the group-commit round
    f = failure(d)
    assert f.check(OSError) and f.value.errno == 28
    writer.abort()
    assert tmp_files(store) == []
    assert os.listdir(os.path.join(store.root, "incoming")) == []
